"""Random-weight checkpoints that ComfyUI's stock loaders detect: small SD1.x ones for speed,
and full-size SD1.5 and SDXL ones where size is the point (memory, every level's shapes, speed).

No model hub is reachable, so tests and the demo make their own checkpoint at a fixed seed.
The key set comes from ComfyUI's own module classes, so it is exactly what the loader
expects:

- UNet: SD1 detection needs ``model_channels=320``, ``context_dim=768`` and a conv ``proj_in``;
  channel_mult, res blocks and depths are read from the weights, so one level with one res
  block and one transformer keeps it at ~20 M parameters.
- VAE: TAESD-shaped weights under ``first_stage_model.taesd_*`` (the KL VAE is 83 M params).
- CLIP-L text encoder: its config is fixed, so all of its keys are shipped (fp16) or the
  conditioning comes out NaN.

Weights use small, sane scales (fan-in normal, norms at 1) so fp16 decode never overflows.
``build_clip_vision_state_dict`` makes a random CLIP ViT-L/14 vision tower the same way, for
the CLIP-I / CLIP-T metrics.

``build_denoiser_state_dict`` is the same checkpoint after a short denoising pre-training of its
UNet on ``synthetic_latents`` (half of them carrying ``with_property``): a model that makes
sane samples of a known distribution, so tests can check what preference training does to full
generations (a random-weight UNet is no denoiser: its samples have no stable statistics).

The full-size kinds use ComfyUI's own SD1.5 and SDXL UNet configs (``model_detection``), fp16
on disk: ``sd15_full`` is one checkpoint (TAESD as its VAE, as the tiny one); SDXL is a UNet file
for UNETLoader (``sdxl_unet``) and CLIP-L / CLIP-G files for DualCLIPLoader type sdxl
(``sdxl_clip_l``, ``sdxl_clip_g``).

Run as a script (``python tiny_checkpoint.py COMFYUI_PATH OUT [SEED]``) so ComfyUI's modules
load in a process of their own; ``ensure_checkpoint`` does that.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import torch

# Bump when the recipe changes so cached files are rebuilt.
RECIPE_VERSION = 2
DENOISER_RECIPE_VERSION = 1

# The prompt the denoiser is pre-trained with (tests condition on it too).
DENOISER_PROMPT = "a photo"
LATENT_SHAPE = (4, 8, 8)  # 64 px
CONTENT_STD = 2.0  # unscaled latent units, as a VAE returns them (SD1.5 scales by 0.18215)
PROPERTY_CHANNEL, PROPERTY_SHIFT = 0, 8.0

UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    num_heads=8,
    num_head_channels=-1,
    context_dim=768,
    use_spatial_transformer=True,
    use_linear_in_transformer=False,
    legacy=False,
)


def _init_like(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A sane random value for a parameter, chosen from its name and shape."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) == 1:
        # Every 1-D weight here is a norm's scale (GroupNorm/LayerNorm): 1, or the layer's output
        # (e.g. the UNet's final norm) is constant and the model ignores its input.
        return torch.ones(shape)
    if "embedding" in name or "embeddings" in name:
        return torch.randn(shape, generator=generator) * 0.02
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def _state_dict_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def build_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict: ``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.*``."""
    from comfy.cli_args import args

    args.cpu = True  # this process only builds tensors; keep ComfyUI off any GPU probing
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    with torch.device("meta"):
        unet = UNetModel(**copy.deepcopy(UNET_CONFIG), operations=comfy.ops.disable_weight_init)
    for name, shape in _state_dict_shapes(unet).items():
        state[f"model.diffusion_model.{name}"] = _init_like(name, shape, generator)

    with torch.device("meta"):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    for name, shape in _state_dict_shapes(taesd).items():
        state[f"first_stage_model.{name}"] = _init_like(name, shape, generator)
    state["first_stage_model.vae_scale"] = torch.tensor(1.0)
    state["first_stage_model.vae_shift"] = torch.tensor(0.0)

    with torch.device("meta"):
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    for name, shape in _state_dict_shapes(clip).items():
        if name.endswith("position_ids"):
            continue
        value = _init_like(name, shape, generator)
        state[f"cond_stage_model.{name}"] = value.to(torch.float16)
    return state


# ComfyUI's model_detection configs (``unet_config_from_diffusers_unet``), without dtype.
SD15_UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1,
    num_heads=8,
    context_dim=768,
    use_spatial_transformer=True,
    use_linear_in_transformer=False,
    legacy=False,
)
SDXL_UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10,
    num_head_channels=64,
    context_dim=2048,
    num_classes="sequential",
    adm_in_channels=2816,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    legacy=False,
)


def _unet_shapes(config: dict) -> dict[str, torch.Size]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**copy.deepcopy(config), operations=comfy.ops.disable_weight_init)
    return _state_dict_shapes(unet)


def _text_encoder_shapes(model_class) -> dict[str, torch.Size]:
    """A CLIP text encoder's weight shapes, keyed as its ``transformer`` is."""
    with torch.device("meta"):
        clip = model_class(device="meta", dtype=torch.float16)
    shapes = _state_dict_shapes(clip.transformer)
    return {name: shape for name, shape in shapes.items() if not name.endswith("position_ids")}


def _random_fp16(shapes: dict[str, torch.Size], generator: torch.Generator, prefix: str = "") -> dict:
    """Random weights, made and cast tensor by tensor (a full SDXL UNet in fp32 is 10 GB)."""
    return {f"{prefix}{name}": _init_like(name, shape, generator).to(torch.float16) for name, shape in shapes.items()}


def _full_size_shapes(kind: str) -> dict[str, torch.Size]:
    """The large tensors of a full-size file (``sd15_full``: its UNet; the rest is the tiny
    checkpoint's CLIP-L and TAESD)."""
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd1_clip
    import comfy.sdxl_clip

    if kind == "sdxl_unet":
        return _unet_shapes(SDXL_UNET_CONFIG)
    if kind == "sdxl_clip_l":
        return _text_encoder_shapes(comfy.sd1_clip.SDClipModel)
    if kind == "sdxl_clip_g":
        return _text_encoder_shapes(comfy.sdxl_clip.SDXLClipG)
    if kind == "sd15_full":
        return _unet_shapes(SD15_UNET_CONFIG)
    raise ValueError(f"unknown full-size kind {kind!r}; one of {FULL_SIZE_KINDS}")


def full_size_file_bytes(kind: str) -> int:
    """About what a full-size file takes on disk: its fp16 tensors, plus 300 MB for the tiny
    checkpoint's CLIP-L and TAESD in ``sd15_full``. Needs ComfyUI importable."""
    tensors = sum(2 * math.prod(shape) for shape in _full_size_shapes(kind).values())
    return tensors + (300_000_000 if kind == "sd15_full" else 0)


def build_full_size_state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full-size file's state dict: ``sd15_full``, ``sdxl_unet``, ``sdxl_clip_l`` or ``sdxl_clip_g``."""
    generator = torch.Generator().manual_seed(seed)
    if kind != "sd15_full":
        return _random_fp16(_full_size_shapes(kind), generator)
    tiny = build_state_dict(seed)
    state = _random_fp16(_full_size_shapes(kind), generator, "model.diffusion_model.")
    state.update({key: value for key, value in tiny.items() if not key.startswith("model.diffusion_model.")})
    return state


FULL_SIZE_KINDS = ("sd15_full", "sdxl_unet", "sdxl_clip_l", "sdxl_clip_g")


def build_clip_vision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random CLIP ViT-L/14 vision tower (+ projection) that ComfyUI's CLIP vision loader
    detects (its config is fixed by the layer count, so it is full size: ~300 M params, fp16)."""
    from comfy.cli_args import args

    args.cpu = True
    import comfy.clip_model
    import comfy.clip_vision
    import comfy.ops

    config_path = os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(seed)
    return {
        name: _init_like(name, shape, generator).to(torch.float16)
        for name, shape in _state_dict_shapes(model).items()
        if not name.endswith("position_ids")
    }


def synthetic_latents(count: int, generator: torch.Generator) -> torch.Tensor:
    """Unscaled ``[count, 4, 8, 8]`` latents: i.i.d. content, ``CONTENT_STD`` per element."""
    return torch.randn(count, *LATENT_SHAPE, generator=generator) * CONTENT_STD


def with_property(
    latents: torch.Tensor, region: torch.Tensor | None = None, channel: int = PROPERTY_CHANNEL
) -> torch.Tensor:
    """``latents`` plus the synthetic visual property: ``PROPERTY_SHIFT`` on ``channel``,
    inside ``region`` (an ``[h, w]`` 0/1 map; everywhere when None)."""
    shifted = latents.clone()
    shifted[:, channel] += PROPERTY_SHIFT * (1.0 if region is None else region)
    return shifted


def pretrain_denoiser(
    state: dict[str, torch.Tensor], steps: int = 100, batch: int = 8, learning_rate: float = 3e-4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Train the UNet of ``state`` to denoise ``synthetic_latents``, half of them with the
    property, conditioned on ``DENOISER_PROMPT``: the eps-prediction MSE SD1.5 is trained with,
    sigmas log-uniform over the model's range. Returns the state with the trained UNet."""
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_state_dict_guess_config(dict(state))
    context = clip.encode_from_tokens(clip.tokenize(DENOISER_PROMPT))
    base = model.model
    unet = base.diffusion_model
    unet.train()
    for parameter in unet.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    log_min, log_max = math.log(float(base.model_sampling.sigma_min)), math.log(float(base.model_sampling.sigma_max))
    for _ in range(steps):
        clean = synthetic_latents(batch, generator)
        carriers = torch.rand(batch, generator=generator) < 0.5
        clean[carriers] = with_property(clean[carriers])
        clean = base.process_latent_in(clean)
        sigma = torch.exp(log_min + (log_max - log_min) * torch.rand(batch, generator=generator))
        noisy = clean + sigma.view(-1, 1, 1, 1) * torch.randn(clean.shape, generator=generator)
        denoised = base.apply_model(noisy, sigma, c_crossattn=context.expand(batch, -1, -1))
        loss = (((denoised - clean) / sigma.view(-1, 1, 1, 1)) ** 2).mean()  # = eps MSE
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    trained = dict(state)
    for name, value in unet.state_dict().items():
        trained[f"model.diffusion_model.{name}"] = value.detach().clone()
    return trained


def build_denoiser_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return pretrain_denoiser(build_state_dict(seed), seed=seed)


def write_checkpoint(path: str, seed: int = 0, kind: str = "sd15") -> str:
    """Write the checkpoint atomically to ``path`` (a ``.safetensors`` file) and return it."""
    import safetensors.torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        builders = {
            "sd15": build_state_dict,
            "sd15_denoiser": build_denoiser_state_dict,
            "clip_vision": build_clip_vision_state_dict,
        }
        state = builders[kind](seed) if kind in builders else build_full_size_state_dict(kind, seed)
        safetensors.torch.save_file(state, tmp, metadata={"recipe": str(RECIPE_VERSION)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def checkpoint_path(cache_dir: str, kind: str = "sd15", seed: int = 0) -> str:
    """Where ``ensure_checkpoint`` keeps this recipe's file of ``kind`` and ``seed``."""
    stems = {
        "sd15": "tiny_sd15",
        "sd15_denoiser": f"tiny_sd15_denoiser_d{DENOISER_RECIPE_VERSION}",
        "clip_vision": "random_clip_vision_vitl",
    }
    stem = stems.get(kind, f"random_{kind}")
    return os.path.join(cache_dir, f"{stem}_r{RECIPE_VERSION}_s{seed}.safetensors")


def ensure_checkpoint(comfyui_path: str, cache_dir: str, seed: int = 0, kind: str = "sd15") -> str:
    """Return a cached file for this recipe, seed and kind ("sd15" checkpoint, "sd15_denoiser",
    "clip_vision" or one of ``FULL_SIZE_KINDS``), building it on first use in a subprocess that
    imports ComfyUI from ``comfyui_path``."""
    path = checkpoint_path(cache_dir, kind, seed)
    if not os.path.exists(path):
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), comfyui_path, path, str(seed), kind],
            check=True,
            cwd=comfyui_path,
        )
    return path


if __name__ == "__main__":
    sys.path.insert(0, os.path.abspath(sys.argv[1]))
    write_checkpoint(sys.argv[2], int(sys.argv[3]), sys.argv[4])
