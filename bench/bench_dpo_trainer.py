"""DPO LoRA Trainer step cost against the same ComfyUI's core TrainLoraNode, same model and images.

    .venv/bin/python bench/bench_dpo_trainer.py [--size 256] [--pairs 1] [--steps 5]
        [--rank 8] [--checkpoint PATH | --unet PATH --clip CLIP_L,CLIP_G] [--modes bypass,weight]
        [--checkpoint-depth D] [--methods core,ours] [--devices cpu,cuda] [--dtype fp32|bf16] [--references N]
        [--model sd15|sd3|flux|flux2_klein|z_image|qwen_image|chroma|lumina2|auraflow|flux2] [--tokens 16]
        [--objectives]

One pair is two images, so the baseline is TrainLoraNode training on 2 * pairs latents with
batch size 2 * pairs (plain supervised finetuning: one forward + backward of those images);
our step is one optimiser step on ``pairs`` pairs: a reference forward without gradients plus a
policy forward + backward on the same 2 * pairs images. TrainLoraNode gives each latent its
caption, and ComfyUI applies every conditioning entry to the whole batch, so for one pair its
step runs the model on 4 rows (profiled; see BENCHMARKS.md): that is what a core step costs.

Both run in the same LoRA mode: ``bypass`` (the LoRA beside each layer) and ``weight`` (W + BA
rebuilt per forward); core rows exist for the modes the running ComfyUI's TrainLoraNode has
(0.3.75: weight only). ``--checkpoint-depth D`` turns on gradient checkpointing at depth D for
both (0: off). Each run trains 1 + ``steps`` steps and every step's seconds are printed (core's
through ComfyUI's progress-bar hook), so a slow step cannot hide; the ratio compares the means
of the steps after the first (which includes set-up). Peak memory is what the whole run adds
over what was resident before it. Each device runs in a worker process of its own.

``--objectives`` adds a step with the supervised term on the winners (weight 0.25) and a
preview as the trainer node takes one (2 images, 8 euler steps, after step 2, timed apart from
the steps), each as a ratio of a plain step of ours in the first mode.

``--references N`` adds a row for joint-set training: the same pairs carrying N reference
latents, on the MODEL through Joint Attention (every forward then holds N more images).

``--model sd3`` / ``flux``: the tests' tiny random-weight DiT (``harness.tiny_dit``; SD3 MMDiT
depth 2, 128 wide; Flux one double and one single block at the full 3072 width) through Load
Diffusion Model (``--unet`` or ``--checkpoint``: another diffusion-model file of the family),
16-channel latents and CONDITIONING made as tensors with ``--tokens`` text tokens (Flux: guidance
3.5 in it). Where core TrainLoraNode cannot train the model with the given settings (Flux
without gradient checkpointing: its blocks add to inputs that autograd saved, in place), its row
says why instead of a ratio. With checkpointing core runs on Flux, on wrong gradients (its
non-reentrant checkpoint recomputes the blocks from inputs they have since updated; see
BENCHMARKS.md): its time and memory are still a core step's.

``--model flux2_klein`` (and the other 2026 families of ``harness.dit_families``): that family's
tiny random-weight DiT, its latents (Flux.2: 128 channels on a /16 grid) and CONDITIONING of its
text encoder's width. Where core cannot train a family at all, its row gives core's error.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DIT_MODELS,
    PeakMemory,
    add_model_options,
    base_parser,
    bench_main,
    dit_conditioning,
    family_models,
    load_comfyui,
    software,
    tiny_checkpoint,
    tiny_dit,
)


def parse_args(argv=None):
    parser = base_parser(__doc__)
    parser.set_defaults(steps=5)
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step (images = 2 x pairs)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--references", type=int, default=0, help="also time joint-set training with N references")
    parser.add_argument("--unet", default=None, help="a diffusion-model file (UNETLoader) instead of --checkpoint")
    parser.add_argument("--clip", default=None, help="with --unet: text encoder files, comma-separated")
    parser.add_argument("--modes", default="bypass,weight", help="LoRA modes to compare, comma-separated")
    parser.add_argument("--methods", default="core,ours", help="core, ours or both (a model too big for one)")
    parser.add_argument("--profile", type=int, default=0, help="also print each run's N costliest torch ops")
    parser.add_argument("--checkpoint-depth", type=int, default=0, help="gradient checkpointing depth (0: off)")
    parser.add_argument(
        "--objectives",
        action="store_true",
        help="also time the supervised term (weight 0.25) and a preview (2 images, 8 steps) against a plain step",
    )
    add_model_options(parser, families=True)
    return parser.parse_args(argv)


def core_schema() -> set[str]:
    from comfy_extras.nodes_train import TrainLoraNode

    return {entry.id for entry in TrainLoraNode.define_schema().inputs}


def core_inputs(**given) -> dict:
    """TrainLoraNode's inputs as its list-input schema takes them: ``given`` (``latents`` is
    already a list; names this ComfyUI's schema lacks are dropped) and every other input of the
    running ComfyUI's schema at its default, so inputs added in later versions (offloading, ...)
    take core's default."""
    from comfy_extras.nodes_train import TrainLoraNode

    inputs = TrainLoraNode.define_schema().inputs
    values = {entry.id: entry.default for entry in inputs if getattr(entry, "default", None) is not None}
    values.update({name: value for name, value in given.items() if name in core_schema()})
    return {name: value if name == "latents" else [value] for name, value in values.items()}


class CoreCannotTrain(Exception):
    """Core TrainLoraNode failed to train the model; the message says why."""


def core_failure(error: RuntimeError, model: str) -> str:
    """Why core failed, for the report: the error's first line and, where known, its cause."""
    message = f"{type(error).__name__}: {str(error).splitlines()[0].split(' Hint:')[0]}"
    if "modified by an inplace operation" in message and model == "flux":
        message += (
            " [cause: Flux's double and single blocks add to their input in place (img += ..., x += ... in "
            "comfy/ldm/flux/layers.py) after its LayerNorm saved it for backward, and core trains the blocks "
            "as they are; with gradient checkpointing it runs (see the note below)]"
        )
    return message


def load_model(args, comfyui: str):
    """(MODEL, positive CONDITIONING, a name for the report) from --model, --unet/--clip or a checkpoint."""
    import comfy.sd

    if args.model in DIT_MODELS + family_models():
        model, name = tiny_dit(comfyui, args.model, args.cache, args.unet or args.checkpoint)
        return model, dit_conditioning(args.model, args.tokens), f"{name} + {args.tokens} text tokens"
    if args.unet:
        clip = comfy.sd.load_clip(args.clip.split(","), embedding_directory=None)
        names = ", ".join(os.path.basename(path) for path in [args.unet, *args.clip.split(",")])
        model = comfy.sd.load_diffusion_model(args.unet)
    else:
        checkpoint = args.checkpoint or tiny_checkpoint(comfyui, args.cache)
        model, clip = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:2]
        names = os.path.basename(checkpoint)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    return model, [[cond, {"pooled_output": pooled}]], names


def latent_grid(model: str, size: int) -> tuple[int | None, int]:
    """(channels or None for the model's own, grid side) of ``model``'s latents for ``size`` px
    images: a 2026 family's from its recipe (Flux.2: 128 channels on a /16 grid), else /8."""
    if model in family_models():
        from harness.dit_families import FAMILIES

        channels, side, _ = FAMILIES[model].latent_shape  # for a 64 px image
        return channels, size * side // 64
    return None, size // 8


def worker(args) -> dict:
    device = args.worker
    comfyui = load_comfyui(device)
    import comfy.utils
    import torch
    import torch.profiler
    from comfy_extras.nodes_train import TrainLoraNode

    from harness.pairs import uniform_pairs
    from prefpersonalize.comfy_glue.families import latent_layout
    from prefpersonalize.trainers.loop import DPOTrainingConfig, train_dpo_lora
    from prefpersonalize.trainers.progress import TrainingProgress

    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, positive, model_name = load_model(args, comfyui)
    modes = args.modes.split(",")
    depth = args.checkpoint_depth
    channels, grid = latent_grid(args.model, args.size)
    channels = channels or model.model.latent_format.latent_channels
    generator = torch.Generator().manual_seed(0)
    count = args.pairs
    latents = torch.randn(2 * count, channels, grid, grid, generator=generator)
    layout = latent_layout(model.model)  # core takes them as ComfyUI's VAE gives them (Qwen: a frame axis)
    pairs = uniform_pairs(positive, latents[:count], latents[count:])

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    def time_ours(mode, steps, trained_model=model, pair_set=pairs, previews=None, **objective):
        marks = []
        config = DPOTrainingConfig(
            loss_mode="patch_dpo",
            steps=steps,
            rank=args.rank,
            alpha=args.rank,
            batch_size=count,
            dtype=dtype,
            lora_mode=mode,
            gradient_checkpointing=depth > 0,
            checkpoint_depth=max(depth, 1),
            **objective,
        )

        def mark(step, history, lora):
            synchronize()
            marks.append(time.perf_counter())
            if previews is not None and previews.due(step):
                # As the trainer node takes them: between steps, with the training patcher.
                previews.take(lora.patcher, step)
                synchronize()
                marks.append(time.perf_counter())  # the next step starts here
                preview_seconds.append(marks[-1] - marks[-2])
                previews_at.add(len(marks) - 2)  # the interval that is the preview, not a step

        previews_at = set()
        marks.append(time.perf_counter())
        train_dpo_lora(trained_model, pair_set, config, progress=TrainingProgress(steps, show=mark, log_every=0))
        return [b - a for i, (a, b) in enumerate(zip(marks, marks[1:], strict=False)) if i not in previews_at]

    def time_core(mode, steps):
        marks = [time.perf_counter()]

        def on_progress(value, total, preview, node_id=None):
            synchronize()
            marks.append(time.perf_counter())

        comfy.utils.set_progress_bar_global_hook(on_progress)
        try:
            TrainLoraNode.execute(
                **core_inputs(
                    model=model,
                    latents=[{"samples": layout.to_model(latents[i : i + 1])} for i in range(2 * count)],
                    positive=positive,
                    batch_size=2 * count,
                    grad_accumulation_steps=1,
                    steps=steps,
                    learning_rate=1e-4,
                    rank=args.rank,
                    optimizer="AdamW",
                    loss_function="MSE",
                    seed=0,
                    training_dtype=dtype_name,
                    lora_dtype="fp32",
                    algorithm="LoRA",
                    gradient_checkpointing=depth > 0,
                    checkpoint_depth=max(depth, 1),
                    bypass_mode=mode == "bypass",
                    existing_lora="[None]",
                )
            )
        except RuntimeError as error:
            raise CoreCannotTrain(core_failure(error, args.model)) from error
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]

    core_modes = {"weight"} | ({"bypass"} if "bypass_mode" in core_schema() else set())
    timers = []
    for mode in modes:
        if mode in core_modes and "core" in args.methods:
            timers.append((f"TrainLoraNode, {mode}", mode, time_core))
        if "ours" in args.methods:
            timers.append((f"DPO LoRA Trainer, {mode}", mode, time_ours))
    if args.references:
        from dataclasses import replace

        from prefpersonalize.comfy_glue.joint import apply_joint_attention
        from prefpersonalize.pure.joint_attention import JointAttentionSettings

        joint_model = apply_joint_attention(model, JointAttentionSettings())
        joint_pairs = replace(pairs, references=torch.randn(args.references, channels, grid, grid, generator=generator))
        timers.append(
            (
                f"DPO LoRA Trainer, {modes[0]}, joint (+{args.references} refs)",
                modes[0],
                lambda mode, steps: time_ours(mode, steps, joint_model, joint_pairs),
            )
        )
    preview_seconds = []
    if args.objectives:
        from prefpersonalize.trainers.previews import PreviewSettings, TrainingPreviews

        mode = modes[0]
        timers.append(
            (
                f"DPO LoRA Trainer, {mode}, supervised 0.25",
                mode,
                lambda mode, steps: time_ours(mode, steps, supervised_weight=0.25),
            )
        )
        # A preview after step 2 (every=2), timed apart from the steps.
        previews = TrainingPreviews(pairs, PreviewSettings(every=2, images=2, steps=8))
        timers.append(
            (f"DPO LoRA Trainer, {mode}, a preview", mode, lambda mode, steps: time_ours(mode, 3, previews=previews))
        )
    results = {}
    for name, mode, timer in timers:
        profiler = torch.profiler.profile() if args.profile else contextlib.nullcontext()
        try:
            with PeakMemory(device) as peak, profiler:
                seconds = timer(mode, 1 + args.steps)
        except CoreCannotTrain as failure:
            results[name] = {"error": str(failure)}
            continue
        results[name] = {"steps": seconds, "peak_mib": peak.added_mib}
        if name.endswith("a preview"):
            results[name]["preview_seconds"] = preview_seconds[:1]
        if args.profile:
            averages = profiler.key_averages()
            results[name]["profile"] = averages.table(sort_by="self_cpu_time_total", row_limit=args.profile)
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "checkpoint": model_name,
        "software": software(),
        "checkpoint_depth": depth,
        "results": results,
    }


def report(result: dict, args) -> str:
    results = result["results"]
    depth = result["checkpoint_depth"]
    lines = [
        f"device: {result['device']} ({result['threads']} threads), {result['software']}, {result['dtype']}, model "
        f"{result['checkpoint']}, {args.size}x{args.size} px, {args.pairs} pair(s) = {2 * args.pairs} "
        f"images per step, rank {args.rank}, gradient checkpointing " + (f"at depth {depth}" if depth else "off"),
        f"{'method':44s} {'s/step':>8s} {'x core':>7s} {'peak +MiB':>10s} {'x core':>7s}  every step (s)",
    ]

    def ratio(value, base_value):
        return f"{'-':>7s}" if base_value is None else f"{value / max(base_value, 1e-9):7.2f}"

    for name, values in results.items():
        if "error" in values:
            lines.append(f"{name:44s} {'-':>8s} {'-':>7s} {'-':>10s} {'-':>7s}  cannot train: {values['error']}")
            continue
        mode = name.split(", ")[1]
        base = results.get(f"TrainLoraNode, {mode}") or results.get("TrainLoraNode, weight")
        base = None if base is None or "error" in base else base
        mean = statistics.mean(values["steps"][1:])
        base_mean = statistics.mean(base["steps"][1:]) if base else None
        base_peak = base["peak_mib"] if base else None
        lines.append(
            f"{name:44s} {mean:8.3f} {ratio(mean, base_mean)} {values['peak_mib']:10.1f} "
            f"{ratio(values['peak_mib'], base_peak)}  " + " ".join(f"{s:.2f}" for s in values["steps"])
        )
    plain = results.get(f"DPO LoRA Trainer, {args.modes.split(',')[0]}")
    for name, values in results.items():
        if "preview_seconds" in values and plain:
            step = statistics.mean(plain["steps"][1:])
            preview = values["preview_seconds"][0]
            lines.append(
                f"{name}: {preview:.2f} s = {preview / step:.2f} plain steps; one every 25 steps costs "
                f"{1 + preview / step / 25:.3f}x a plain step"
            )
        if name.endswith("supervised 0.25") and plain:
            ratio_text = statistics.mean(values["steps"][1:]) / statistics.mean(plain["steps"][1:])
            lines.append(f"{name}: {ratio_text:.3f}x a plain step")
    for name, values in results.items():
        if "profile" in values:
            lines += ["", f"{name}: the {args.profile} costliest ops (self CPU time, whole run)", values["profile"]]
    if args.model == "flux":
        lines.append(
            "Flux: core trains it only with gradient checkpointing, and that recomputes each block in backward "
            "(PyTorch's non-reentrant checkpoint) from inputs the block has since updated in place, so its LoRA "
            "gradients are not the model's (BENCHMARKS.md); its time and memory are still what a core step costs"
        )
    lines.append(
        "x core: against TrainLoraNode in the same mode (weight where this ComfyUI's has no bypass); "
        "s/step: mean of the steps after the first; targets: time <= 1.5x, peak memory <= 1.1x"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(bench_main(__file__, parse_args, worker, report))
