"""Joint Sampler cost against the stock KSampler (+ VAE Decode) making the same new images.

    .venv/bin/python bench/bench_joint_sampler.py [--size 256] [--images 4] [--references 1]
        [--steps 8] [--repeats 3] [--checkpoint PATH] [--devices cpu,cuda]
        [--model sd15|sd3|flux|flux2_klein|z_image|chroma|...] [--tokens 16] [--cfg C] [--scheduler S]

Runs in one go on CPU, and on CUDA too when PyTorch sees a GPU: each device in a subprocess
of its own (ComfyUI picks its device at import). The model is the tests' tiny random-weight
SD1.5 checkpoint unless ``--checkpoint`` names a real one; speed does not depend on weights.

``--model sd3`` / ``flux``: the tests' tiny random-weight DiT (``harness.tiny_dit``; SD3 MMDiT
depth 2, 128 wide; Flux one double and one single block at the full 3072 width, ~0.55 B
parameters) through Load Diffusion Model (``--checkpoint``: another diffusion-model file of
the family), CONDITIONING made as tensors of the stock encoders' shapes with ``--tokens`` text
tokens (no T5 here), and the family's TAESD (taesd3 / taef1, random weights) as the VAE of
both arms. Defaults per model: cfg 7 / 4 / 1 (Flux dev is guidance-distilled: guidance 3.5 in
the conditioning, one pass per step), scheduler normal / simple / simple. The 2026 families
(``--model flux2_klein``, ``z_image``, ``chroma``, ...) take cfg 1 and simple, with their TAESD
(taef2 on ComfyUI 0.33, taef1). Qwen-Image has no TAESD: its runs time the sampling alone
(random reference latents, nothing decoded, in every arm), as ``--no-vae`` does for any model.

Per device it times, after a warm-up, the median of ``--repeats`` runs of

- KSampler(N):       an empty latent (N; 16 channels on DiTs) -> KSampler -> VAE Decode (the baseline);
- KSampler(R+N):     the same with R more images: the cost of the reference slots alone;
- Joint Sampler:     R references + N new images, image guidance 1 (default) and 2, and with
                     clean references (``reference_timestep`` clean);

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
from common import (  # noqa: E402
    PeakMemory,
    add_model_options,
    base_parser,
    bench_main,
    dit_conditioning,
    load_comfyui,
    software,
    tiny_checkpoint,
    tiny_dit,
    tiny_taesd,
)

DEFAULT_CFG = {"sd15": 7.0, "sd3": 4.0, "flux": 1.0}  # 1 for the 2026 families
DEFAULT_SCHEDULER = {"sd15": "normal", "sd3": "simple", "flux": "simple"}  # simple for the families


def parse_args(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--images", type=int, default=4, help="new images N")
    parser.add_argument("--references", type=int, default=1, help="reference images R")
    parser.add_argument("--cfg", type=float, default=None, help="default: 7 (sd15), 4 (sd3), 1 (flux)")
    parser.add_argument("--scheduler", default=None, help="default: normal (sd15), simple (DiTs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-vae",
        action="store_true",
        help="time the sampling alone: random reference latents, nothing encoded or decoded (default where the "
        "family has no TAESD: qwen_image)",
    )
    add_model_options(parser, families=True)
    args = parser.parse_args(argv)
    args.cfg = DEFAULT_CFG.get(args.model, 1.0) if args.cfg is None else args.cfg
    args.scheduler = args.scheduler or DEFAULT_SCHEDULER.get(args.model, "simple")
    return args


def load_model(args, comfyui: str):
    """(MODEL, VAE or None for ``--no-vae``, positive, negative, what they are for the report)
    for ``--model``."""
    if args.model != "sd15":
        from harness.tiny_dit import taesd_name

        try:
            vae_name = None if args.no_vae else taesd_name(args.model)
        except ValueError:  # the family has no TAESD
            vae_name = None
        model, name = tiny_dit(comfyui, args.model, args.cache, args.checkpoint)
        vae = None if vae_name is None else tiny_taesd(comfyui, args.model, args.cache)
        positive = dit_conditioning(args.model, args.tokens)
        negative = dit_conditioning(args.model, args.tokens, seed=1)
        what = f"VAE {vae_name}" if vae else "sampling alone (no VAE)"
        return model, vae, positive, negative, f"model {name} + {args.tokens} text tokens, {what}"
    import comfy.sd
    import nodes as comfy_nodes

    checkpoint = args.checkpoint or tiny_checkpoint(comfyui, args.cache)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    what = "sampling alone (no VAE)" if args.no_vae else "its VAE"
    return model, None if args.no_vae else vae, positive, negative, f"checkpoint {os.path.basename(checkpoint)}, {what}"


def worker(args) -> dict:
    device = args.worker
    comfyui = load_comfyui(device)
    import comfy.sample
    import nodes as comfy_nodes
    import torch

    from prefpersonalize.comfy_glue.families import latent_downscale
    from prefpersonalize.comfy_glue.joint import JointSamplerSettings, sample_joint
    from prefpersonalize.nodes.joint import JointSampler

    model, vae, positive, negative, model_name = load_model(args, comfyui)
    generator = torch.Generator().manual_seed(0)
    references = torch.rand(args.references, args.size, args.size, 3, generator=generator)
    side = args.size // latent_downscale(model.model)
    # the model's empty latent (Qwen-Image's carries a frame axis), as KSampler's is made
    empty = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, side, side]))

    def ksampler(batch):
        latent = {"samples": torch.zeros([batch, *empty.shape[1:]])}
        samples = comfy_nodes.common_ksampler(
            model, 1, args.steps, args.cfg, "euler", args.scheduler, positive, negative, latent
        )[0]["samples"]
        return samples if vae is None else vae.decode(samples)

    def joint_sampler(image_guidance, reference_timestep="noised"):
        if vae is None:
            settings = JointSamplerSettings(
                new_images=args.images,
                size=(args.size, args.size),
                seed=1,
                steps=args.steps,
                cfg=args.cfg,
                sampler_name="euler",
                scheduler=args.scheduler,
                image_guidance=image_guidance,
                reference_timestep=reference_timestep,
            )
            reference_latents = torch.randn(args.references, *empty.shape[1:], generator=generator)
            encode = lambda _: reference_latents  # noqa: E731
            return sample_joint(model, positive, negative, settings=settings, encode=encode, references=references)[0]
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
            args.scheduler,
            image_guidance,
            1.0,
            references,
            reference_timestep=reference_timestep,
        ).result[0]

    cases = {
        "KSampler(N)": lambda: ksampler(args.images),
        "KSampler(R+N)": lambda: ksampler(args.images + args.references),
        "Joint Sampler": lambda: joint_sampler(1.0),
        "Joint Sampler, image_guidance 2": lambda: joint_sampler(2.0),
        "Joint Sampler, clean references": lambda: joint_sampler(1.0, "clean"),
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
        "checkpoint": model_name,
        "software": software(),
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "peak_mib": {name: max(values) for name, values in memory.items()},
    }


def report(result: dict, args) -> str:
    seconds, peak = result["seconds"], result["peak_mib"]
    base_s, base_m = seconds["KSampler(N)"], max(peak["KSampler(N)"], 1e-9)
    lines = [
        f"device: {result['device']} ({result['threads']} threads), {result['software']}, {result['checkpoint']}, "
        f"{args.size}x{args.size} px, N={args.images} new images, R={args.references} reference(s), "
        f"{args.steps} steps, euler / {args.scheduler}, cfg {args.cfg:g}, median of {args.repeats}",
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
