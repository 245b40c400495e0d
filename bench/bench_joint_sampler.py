"""Joint Sampler cost against the stock KSampler (+ VAE Decode) making the same new images.

    .venv/bin/python bench/bench_joint_sampler.py [--size 256] [--images 4] [--references 1]
        [--steps 8] [--repeats 3] [--checkpoint PATH] [--devices cpu,cuda]

Runs in one go on CPU, and on CUDA too when PyTorch sees a GPU: each device in a subprocess
of its own (ComfyUI picks its device at import). The model is the tests' tiny random-weight
SD1.5 checkpoint unless ``--checkpoint`` names a real one; speed does not depend on weights.

Per device it times, after a warm-up, the median of ``--repeats`` runs of

- KSampler(N):       EmptyLatentImage(N) -> KSampler -> VAE Decode (the baseline);
- KSampler(R+N):     the same with R more images: the cost of the reference slots alone;
- Joint Sampler:     R references + N new images, image guidance 1 (default) and 2;

and the peak memory each run adds over what was resident before it (CPU: peak RSS, reset with
/proc/self/clear_refs after malloc_trim; CUDA: torch.cuda.max_memory_allocated). Ratios are
to KSampler(N); "joint overhead" divides by KSampler(R+N), i.e. the cost beyond the
reference slots' own (target: <= 1.3).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakMemory, base_parser, bench_main, load_comfyui, tiny_checkpoint  # noqa: E402


def parse_args(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--images", type=int, default=4, help="new images N")
    parser.add_argument("--references", type=int, default=1, help="reference images R")
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def worker(args) -> dict:
    device = args.worker
    comfyui = load_comfyui(device)
    import comfy.sd
    import nodes as comfy_nodes
    import torch

    from pack.nodes.joint import JointSampler

    checkpoint = args.checkpoint or tiny_checkpoint(comfyui, args.cache)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    generator = torch.Generator().manual_seed(0)
    references = torch.rand(args.references, args.size, args.size, 3, generator=generator)

    def ksampler(batch):
        latent = {"samples": torch.zeros([batch, 4, args.size // 8, args.size // 8])}
        samples = comfy_nodes.common_ksampler(
            model, 1, args.steps, args.cfg, "euler", "normal", positive, negative, latent
        )[0]
        return vae.decode(samples["samples"])

    def joint_sampler(image_guidance):
        return JointSampler.execute(
            model,
            positive,
            negative,
            vae,
            args.images,
            args.size,
            args.size,
            1,
            args.steps,
            args.cfg,
            "euler",
            "normal",
            image_guidance,
            1.0,
            references,
        ).result[0]

    cases = {
        "KSampler(N)": lambda: ksampler(args.images),
        "KSampler(R+N)": lambda: ksampler(args.images + args.references),
        "Joint Sampler": lambda: joint_sampler(1.0),
        "Joint Sampler, image_guidance 2": lambda: joint_sampler(2.0),
    }
    times = {name: [] for name in cases}
    memory = {name: [] for name in cases}
    with torch.inference_mode():
        for run in cases.values():  # warm-up: load weights, allocator, kernels
            run()
        for _ in range(args.repeats):
            for name, run in cases.items():  # interleaved, so drifting machine load hits all alike
                with PeakMemory(device) as peak:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    run()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
                memory[name].append(peak.added_mib)
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "threads": torch.get_num_threads(),
        "checkpoint": os.path.basename(checkpoint),
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "peak_mib": {name: max(values) for name, values in memory.items()},
    }


def report(result: dict, args) -> str:
    seconds, peak = result["seconds"], result["peak_mib"]
    base_s, base_m = seconds["KSampler(N)"], max(peak["KSampler(N)"], 1e-9)
    lines = [
        f"device: {result['device']} ({result['threads']} threads), checkpoint {result['checkpoint']}, "
        f"{args.size}x{args.size} px, N={args.images} new images, R={args.references} reference(s), "
        f"{args.steps} steps, euler, cfg {args.cfg}, median of {args.repeats}",
        f"{'run':34s} {'time s':>8s} {'x KSampler(N)':>14s} {'peak +MiB':>10s} {'x KSampler(N)':>14s}",
    ]
    for name in seconds:
        lines.append(
            f"{name:34s} {seconds[name]:8.3f} {seconds[name] / base_s:14.2f} {peak[name]:10.1f} "
            f"{peak[name] / base_m:14.2f}"
        )
    slots = seconds["KSampler(R+N)"]
    lines.append(
        f"joint overhead beyond the reference slots (Joint Sampler / KSampler(R+N)): time "
        f"{seconds['Joint Sampler'] / slots:.2f}x, peak memory "
        f"{peak['Joint Sampler'] / max(peak['KSampler(R+N)'], 1e-9):.2f}x (target <= 1.3)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(bench_main(__file__, parse_args, worker, report))
