"""Headless trainer step time on 1 and N processes (tools/train_dpo.py through accelerate launch):
the scaling of data-parallel training, same global batch and seed.

    .venv/bin/python bench/bench_data_parallel.py [--size 64] [--batch-size 4] [--steps 6]
        [--processes 1,2] [--checkpoint PATH] [--devices cpu|cuda]

Each process count trains twice, 2 and 2 + ``steps`` steps; the difference of the two wall times
over ``steps`` is the time per step without start-up (imports, model loading, process group).
The baseline is 1 process: speedup = its step time / N's, efficiency = speedup / N. On a CPU
each process gets cores / N threads, so there the ratio shows the cost of splitting a batch
and all-reducing the LoRA, not what N GPUs gain.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO_ROOT, base_parser, bench_main, load_comfyui, tiny_checkpoint  # noqa: E402

TOOL = os.path.join(REPO_ROOT, "tools", "train_dpo.py")
WARM_STEPS = 2


def parse_args(argv=None):
    parser = base_parser(__doc__)
    parser.set_defaults(size=64)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (pairs per step)")
    parser.add_argument("--processes", default="1,2", help="process counts, comma-separated (first: baseline)")
    return parser.parse_args(argv)


def timed_run(job: str, output: str, processes: int, steps: int, cpu: bool) -> float:
    command = [sys.executable, TOOL, job, "--steps", str(steps), "--output", output, "--processes", str(processes)]
    command += ["--cpu"] if cpu else []
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
    if run.returncode != 0:
        raise RuntimeError(f"{processes} processes failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return time.perf_counter() - start


def worker(args) -> dict:
    import torch

    comfyui = load_comfyui(args.worker)
    import comfy.sd

    from harness.pairs import uniform_pairs
    from prefpersonalize.trainers.jobs import export_job

    checkpoint = args.checkpoint or tiny_checkpoint(comfyui, args.cache)
    model = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False)[0]
    channels, side = model.model.latent_format.latent_channels, args.size // 8
    generator = torch.Generator().manual_seed(0)
    count = max(args.batch_size, 4)
    latents = torch.randn(2 * count, channels, side, side, generator=generator)
    context = model.model.model_config.unet_config["context_dim"]
    conditioning = [[torch.randn(1, 77, context, generator=generator), {}]]
    pairs = uniform_pairs(conditioning, latents[:count], latents[count:])
    options = {"batch_size": args.batch_size, "rank": 8, "alpha": 8.0, "loss_mode": "dpo"}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        job = export_job(
            pairs,
            model,
            os.path.join(folder, "job"),
            model_kind="checkpoint",
            model_path=checkpoint,
            options=options,
            layout="comfyui",
        )
        os.environ["COMFYUI_PATH"] = comfyui
        for processes in [int(n) for n in args.processes.split(",")]:
            output = os.path.join(folder, f"out{processes}")
            short = timed_run(job, output, processes, WARM_STEPS, args.worker == "cpu")
            long = timed_run(job, output, processes, WARM_STEPS + args.steps, args.worker == "cpu")
            rows.append({"processes": processes, "step_s": (long - short) / args.steps, "start_s": short})
    return {"rows": rows, "batch": args.batch_size, "size": args.size, "model": os.path.basename(checkpoint)}


def report(result: dict, args) -> str:
    rows = result["rows"]
    base = rows[0]
    lines = [
        f"[{args.worker or args.devices or 'cpu'}] {result['model']}, {result['size']} px, global batch "
        f"{result['batch']} pairs; baseline: {base['processes']} process",
        f"{'processes':>9} {'s/step':>8} {'x 1 process':>12} {'speedup':>8} {'efficiency':>10} {'start-up s':>10}",
    ]
    for row in rows:
        speedup = base["step_s"] / row["step_s"]
        lines.append(
            f"{row['processes']:>9} {row['step_s']:>8.2f} {row['step_s'] / base['step_s']:>12.2f} "
            f"{speedup:>8.2f} {speedup / row['processes'] * base['processes']:>10.2f} {row['start_s']:>10.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(bench_main(__file__, parse_args, worker, report))
