"""DPO LoRA Trainer step cost against core TrainLoraNode on the same model and images.

    .venv/bin/python bench/bench_dpo_trainer.py [--size 256] [--pairs 1] [--steps 6]
        [--rank 8] [--checkpoint PATH] [--devices cpu,cuda] [--dtype fp32|bf16] [--references N]

One pair is two images, so the baseline is TrainLoraNode training on 2 * pairs latents with
batch size 2 * pairs (plain supervised finetuning: one forward + backward of those images);
our step is one optimiser step on ``pairs`` pairs: a reference forward without gradients plus a
policy forward + backward on the same 2 * pairs images. Ideal ratio: about 1.33x (two extra
forwards without gradients). Each device runs in a worker process of its own; per method it
reports the median seconds per step after one warm-up step (``steps`` timed) and the peak memory
the training adds over what was resident before it.

``--references N`` adds a row for joint-set training: the same pairs carrying N reference
latents, on the MODEL through Joint Attention (every forward then holds N more images).
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
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step (images = 2 x pairs)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--references", type=int, default=0, help="also time joint-set training with N references")
    return parser.parse_args(argv)


def core_inputs(**given) -> dict:
    """TrainLoraNode's inputs as its list-input schema takes them: ``given`` (``latents`` is
    already a list) and every other input of the running ComfyUI's schema at its default, so
    inputs added in later versions (bypass_mode, offloading, ...) take core's default."""
    from comfy_extras.nodes_train import TrainLoraNode

    inputs = TrainLoraNode.define_schema().inputs
    values = {entry.id: entry.default for entry in inputs if getattr(entry, "default", None) is not None}
    values.update(given)
    return {name: value if name == "latents" else [value] for name, value in values.items()}


def worker(args) -> dict:
    device = args.worker
    comfyui = load_comfyui(device)
    import comfy.sd
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    from pack.comfy_glue.trainer import DPOTrainingConfig, train_dpo_lora
    from pack.pure.pairs import PreferencePairs

    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    checkpoint = args.checkpoint or tiny_checkpoint(comfyui, args.cache)
    model, clip = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:2]
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    positive = [[cond, {"pooled_output": pooled}]]
    grid = args.size // 8
    generator = torch.Generator().manual_seed(0)
    count = args.pairs
    latents = torch.randn(2 * count, 4, grid, grid, generator=generator)
    ones = torch.ones(count, grid, grid)
    pairs = PreferencePairs(
        winners=latents[:count],
        losers=latents[count:],
        conditionings=[positive],
        condition_index=torch.zeros(count, dtype=torch.long),
        winner_weights=ones,
        loser_weights=ones,
        winner_quality=ones,
        loser_quality=ones,
        winner_complexity=ones,
        loser_complexity=ones,
        thumbnails_winner=torch.zeros(count, 3, 8, 8),
        thumbnails_loser=torch.zeros(count, 3, 8, 8),
        metadata=[{}] * count,
        latent_channels=4,
    )

    def time_ours(steps, trained_model=model, pair_set=pairs):
        marks = []
        config = DPOTrainingConfig(
            loss_mode="patch_dpo", steps=steps, rank=args.rank, alpha=args.rank, batch_size=count, dtype=dtype
        )

        def on_step(step, metrics, lora):
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        marks.append(time.perf_counter())
        train_dpo_lora(trained_model, pair_set, config, on_step=on_step)
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def time_core(steps):
        # TrainLoraNode reports no per-step hook: time whole runs of 1 and 1 + steps steps.
        def run(n):
            start = time.perf_counter()
            TrainLoraNode.execute(
                **core_inputs(
                    model=model,
                    latents=[{"samples": latents[i : i + 1]} for i in range(2 * count)],
                    positive=positive,
                    batch_size=2 * count,
                    grad_accumulation_steps=1,
                    steps=n,
                    learning_rate=1e-4,
                    rank=args.rank,
                    optimizer="AdamW",
                    loss_function="MSE",
                    seed=0,
                    training_dtype=dtype_name,
                    lora_dtype="fp32",
                    algorithm="LoRA",
                    gradient_checkpointing=False,
                    existing_lora="[None]",
                )
            )
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        single, full = run(1), run(1 + steps)
        return [(full - single) / steps]

    timers = [("TrainLoraNode (2 x pairs images)", time_core), ("DPO LoRA Trainer", time_ours)]
    if args.references:
        from dataclasses import replace

        from pack.comfy_glue.joint import apply_joint_attention
        from pack.pure.joint_attention import JointAttentionSettings

        joint_model = apply_joint_attention(model, JointAttentionSettings())
        joint_pairs = replace(pairs, references=torch.randn(args.references, 4, grid, grid, generator=generator))
        timers.append(
            (
                f"DPO LoRA Trainer, joint (+{args.references} refs)",
                lambda steps: time_ours(steps, joint_model, joint_pairs),
            )
        )
    results = {}
    for name, timer in timers:
        timer(1)  # warm-up: weights, allocator, kernels
        with PeakMemory(device) as peak:
            seconds = timer(args.steps)
        results[name] = {
            "seconds": statistics.median(seconds[1:] if len(seconds) > 2 else seconds),
            "peak_mib": peak.added_mib,
        }
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "checkpoint": os.path.basename(checkpoint),
        "results": results,
    }


def report(result: dict, args) -> str:
    results = result["results"]
    base = results["TrainLoraNode (2 x pairs images)"]
    lines = [
        f"device: {result['device']} ({result['threads']} threads), {result['dtype']}, checkpoint "
        f"{result['checkpoint']}, {args.size}x{args.size} px, {args.pairs} pair(s) = {2 * args.pairs} "
        f"images per step, rank {args.rank}",
        f"{'method':34s} {'s/step':>8s} {'x core':>7s} {'peak +MiB':>10s} {'x core':>7s}",
    ]
    for name, values in results.items():
        lines.append(
            f"{name:34s} {values['seconds']:8.3f} {values['seconds'] / base['seconds']:7.2f} "
            f"{values['peak_mib']:10.1f} {values['peak_mib'] / max(base['peak_mib'], 1e-9):7.2f}"
        )
    lines.append("targets: time <= 1.5x (ideal ~1.33x), peak memory <= 1.1x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(bench_main(__file__, parse_args, worker, report))
