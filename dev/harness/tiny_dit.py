"""Random-weight DiT diffusion models that ComfyUI's stock ``UNETLoader``
(``comfy.sd.load_diffusion_model``) detects, with the TAESD files its ``VAELoader`` offers for
them and CONDITIONING made directly as tensors.

No model hub is reachable, so tests make their own files at a fixed seed, as ``tiny_checkpoint``
does, and with its init (fan-in normal, norms at 1, biases 0). The key set comes from ComfyUI's
own module classes built from the config ComfyUI's ``model_detection`` reads off a skeleton of
the keys it looks at, so it is exactly what the loader of the ComfyUI at hand expects:

- ``sd3`` (``model_base.SD3``, MMDiT): the hidden size is 64 x depth (detection reads the depth
  as width / 64), so depth 2 makes it 128 wide, 1.9 M parameters (plus a 0.5 M ``pos_embed``
  buffer), fp16 on disk (4.8 MB); patch 2, 16 latent channels, ``context_embedder`` from 4096
  (what ComfyUI's SD3 text encoder pads to), pooled ``y`` of 2048 (CLIP-L + CLIP-G), no qk norm
  (SD3 medium's layout), and a 2-D sin-cos ``pos_embed`` for up to 64 x 64 patches (1024 px).
- ``flux`` (``model_base.Flux``, Flux dev layout: ``guidance_in`` present): one double and one
  single block. ComfyUI 0.3.x fixes 24 heads and needs ``hidden / heads == sum(axes_dim) == 128``,
  so the hidden size stays 3072 and the model is ~0.55 B parameters; bf16 on disk (~1.1 GB).
  Its RMSNorm scales are saved as ``*_norm.scale`` (the BFL layout): older ComfyUI detects Flux
  only by that name, newer ComfyUI renames it to ``.weight`` on load.

Tensors are drawn in sorted key order, so a seed gives the same file whichever ComfyUI builds it.

Text encoders (T5-XXL, 4.7 B parameters, is too big to make here): ``dit_conditioning`` gives
CONDITIONING of the shapes the stock encoders give. The cheapest stock graph for both families is
``CLIPLoader`` type ``sd3`` with a CLIP-L file alone (``tiny_checkpoint``'s ``sdxl_clip_l``): it
pads CLIP-L's states to ``[B, 77, 4096]`` and its pooled output with zeros to ``[B, 2048]``,
which SD3 takes as is and Flux too (its forward keeps ``y[:, :768]``, the CLIP-L part; add
``FluxGuidance`` or the guidance defaults to 3.5).

TAESD: ``VAELoader`` lists ``taesd3`` / ``taef1`` once ``models/vae_approx/`` holds
``<name>_encoder.*`` and ``<name>_decoder.*``; ``ensure_taesd`` makes a folder with both.

Run as a module (``python -m harness.tiny_dit COMFYUI_PATH OUT KIND SEED {dit,taesd}``, ``dev/``
on ``PYTHONPATH``) so ComfyUI's modules load in a process of their own; ``ensure_dit`` and
``ensure_taesd`` do that.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from .tiny_checkpoint import _init_like, _state_dict_shapes

# Bump when the recipe changes so cached files are rebuilt.
DIT_RECIPE_VERSION = 1

DIT_KINDS = ("sd3", "flux")
LATENT_CHANNELS = 16
DIT_LATENT_SHAPE = (LATENT_CHANNELS, 8, 8)  # 64 px
# VAELoader's names for the TAESD of each family (its files: ``<name>_encoder.*``, ``<name>_decoder.*``).
TAESD_NAMES = {"sd3": "taesd3", "flux": "taef1"}

SD3_DEPTH = 2
SD3_PATCH = 2
SD3_POS_EMBED_MAX = 64  # patches per side: up to 1024 px
SD3_CONTEXT_DIM = 4096
SD3_POOLED_DIM = 2048

FLUX_HIDDEN = 3072
FLUX_PATCH = 2
FLUX_VEC_IN_DIM = 768
FLUX_CONTEXT_DIM = 4096
FLUX_GUIDANCE = 3.5

# Token counts of the stock encoders' output: SD3's CLIP-only encoders give 77 (with T5: 154),
# Flux's T5 pads to at least 256.
DEFAULT_TOKENS = {"sd3": 77, "flux": 256}
CONDITIONING_DIMS = {"sd3": (SD3_CONTEXT_DIM, SD3_POOLED_DIM), "flux": (FLUX_CONTEXT_DIM, FLUX_VEC_IN_DIM)}
DISK_DTYPES = {"sd3": torch.float16, "flux": torch.bfloat16}


def _check_kind(kind: str) -> str:
    if kind not in DIT_KINDS:
        raise ValueError(f"unknown DiT kind {kind!r}; one of {DIT_KINDS}")
    return kind


def _comfy_cpu() -> None:
    """Keep ComfyUI off any GPU probing: this process only builds tensors."""
    from comfy.cli_args import args

    args.cpu = True


def _detected_config(skeleton: dict[str, tuple[int, ...]]) -> dict:
    """The config ComfyUI's ``model_detection`` reads from a state dict holding only the keys
    (and shapes) it looks at, so the module built from it is what this ComfyUI's loader builds."""
    import comfy.model_detection

    state = {name: torch.empty(shape, device="meta") for name, shape in skeleton.items()}
    config = comfy.model_detection.detect_unet_config(state, "")
    if config is None:
        raise RuntimeError(f"ComfyUI detects no model from {sorted(skeleton)}")
    return config


def _sd3_skeleton() -> dict[str, tuple[int, ...]]:
    hidden = 64 * SD3_DEPTH
    return {
        "x_embedder.proj.weight": (hidden, LATENT_CHANNELS, SD3_PATCH, SD3_PATCH),
        "final_layer.linear.weight": (SD3_PATCH * SD3_PATCH * LATENT_CHANNELS, hidden),
        "y_embedder.mlp.0.weight": (hidden, SD3_POOLED_DIM),
        "context_embedder.weight": (hidden, SD3_CONTEXT_DIM),
        "pos_embed": (1, SD3_POS_EMBED_MAX**2, hidden),
        "joint_blocks.0.context_block.attn.qkv.weight": (3 * hidden, hidden),
    }


def _flux_skeleton() -> dict[str, tuple[int, ...]]:
    return {
        "img_in.weight": (FLUX_HIDDEN, LATENT_CHANNELS * FLUX_PATCH * FLUX_PATCH),
        "txt_in.weight": (FLUX_HIDDEN, FLUX_CONTEXT_DIM),
        "vector_in.in_layer.weight": (FLUX_HIDDEN, FLUX_VEC_IN_DIM),
        "guidance_in.in_layer.weight": (FLUX_HIDDEN, 256),
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
        "single_blocks.0.linear1.weight": (1, FLUX_HIDDEN),
    }


def _bfl_key(name: str) -> str:
    """Flux's on-disk name: newer ComfyUI calls the qk RMSNorm scales ``*_norm.weight``."""
    return f"{name[: -len('weight')]}scale" if name.endswith("_norm.weight") else name


def _dit_shapes(kind: str) -> dict[str, torch.Size]:
    """The diffusion model's weight shapes, keyed as its file is."""
    _comfy_cpu()
    import comfy.ops

    if _check_kind(kind) == "sd3":
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper as model_class

        config, rename = _detected_config(_sd3_skeleton()), str
    else:
        from comfy.ldm.flux.model import Flux as model_class

        config, rename = _detected_config(_flux_skeleton()), _bfl_key
    with torch.device("meta"):
        model = model_class(**config, operations=comfy.ops.disable_weight_init)
    return {rename(name): shape for name, shape in _state_dict_shapes(model).items()}


def _sd3_pos_embed(shape: torch.Size) -> torch.Tensor:
    """SD3's fixed 2-D sin-cos position table (random values would be no positions at all)."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    grid = round(shape[1] ** 0.5)
    return torch.from_numpy(get_2d_sincos_pos_embed(shape[2], grid)).float().reshape(shape)


def _random_dit(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in sorted key order, made and cast tensor by tensor (Flux is 2 GB in fp32)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = DISK_DTYPES[kind]
    state = {}
    for name, shape in sorted(_dit_shapes(kind).items()):
        value = _sd3_pos_embed(shape) if name == "pos_embed" else _init_like(name, shape, generator)
        state[name] = value.to(dtype)
    return state


def build_sd3_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny SD3 (MMDiT, depth 2) diffusion-model file's state dict, fp16."""
    return _random_dit("sd3", seed)


def build_flux_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-double, one-single block Flux dev diffusion-model file's state dict, bf16."""
    return _random_dit("flux", seed)


def taesd_file_names(kind: str) -> tuple[str, str]:
    """The encoder and decoder file names ``VAELoader`` needs for ``kind``'s TAESD."""
    name = TAESD_NAMES[_check_kind(kind)]
    return f"{name}_encoder.safetensors", f"{name}_decoder.safetensors"


def build_taesd_state_dicts(kind: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random 16-channel TAESD encoder and decoder state dicts, keyed by the file names
    ``VAELoader`` looks for (``taesd3_encoder.safetensors``, ...); fp16 as the real ones."""
    _comfy_cpu()
    import comfy.taesd.taesd

    generator = torch.Generator().manual_seed(seed)
    files = {}
    parts = (comfy.taesd.taesd.Encoder, comfy.taesd.taesd.Decoder)
    for file_name, module_class in zip(taesd_file_names(kind), parts, strict=True):
        with torch.device("meta"):
            module = module_class(latent_channels=LATENT_CHANNELS)
        shapes = sorted(_state_dict_shapes(module).items())
        files[file_name] = {key: _init_like(key, shape, generator).to(torch.float16) for key, shape in shapes}
    return files


def _save_atomically(state: dict[str, torch.Tensor], path: str) -> None:
    import safetensors.torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        safetensors.torch.save_file(state, tmp, metadata={"recipe": str(DIT_RECIPE_VERSION)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_dit(path: str, kind: str, seed: int = 0) -> str:
    """Write the diffusion-model file of ``kind`` atomically to ``path`` and return it."""
    builders = {"sd3": build_sd3_state_dict, "flux": build_flux_state_dict}
    _save_atomically(builders[_check_kind(kind)](seed), path)
    return path


def write_taesd(folder: str, kind: str, seed: int = 0) -> str:
    """Write the TAESD encoder and decoder files of ``kind`` into ``folder`` and return it."""
    for name, state in build_taesd_state_dicts(kind, seed).items():
        _save_atomically(state, os.path.join(folder, name))
    return folder


def dit_path(cache_dir: str, kind: str, seed: int = 0) -> str:
    """Where ``ensure_dit`` keeps this recipe's diffusion model of ``kind`` and ``seed``."""
    return os.path.join(cache_dir, f"tiny_{_check_kind(kind)}_dit_r{DIT_RECIPE_VERSION}_s{seed}.safetensors")


def taesd_dir(cache_dir: str, kind: str, seed: int = 0) -> str:
    """The folder where ``ensure_taesd`` keeps this recipe's TAESD files of ``kind`` and ``seed``."""
    return os.path.join(cache_dir, f"tiny_{TAESD_NAMES[_check_kind(kind)]}_r{DIT_RECIPE_VERSION}_s{seed}")


def _build_in_subprocess(comfyui_path: str, out: str, kind: str, seed: int, what: str) -> None:
    """Run this module as a script, importing ComfyUI from ``comfyui_path``."""
    dev = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [dev, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "harness.tiny_dit", os.path.abspath(comfyui_path), out, kind, str(seed), what]
    subprocess.run(command, check=True, cwd=comfyui_path, env=env)


def ensure_dit(comfyui_path: str, cache_dir: str, kind: str, seed: int = 0) -> str:
    """Return a cached diffusion-model file (``sd3`` or ``flux``) for this recipe and seed,
    building it on first use in a subprocess that imports ComfyUI from ``comfyui_path``."""
    path = dit_path(cache_dir, kind, seed)
    if not os.path.exists(path):
        _build_in_subprocess(comfyui_path, path, kind, seed, "dit")
    return path


def ensure_taesd(comfyui_path: str, cache_dir: str, kind: str, seed: int = 0) -> str:
    """Return a cached folder holding ``<name>_encoder.safetensors`` and
    ``<name>_decoder.safetensors`` (name: ``TAESD_NAMES[kind]``). Link them into
    ``models/vae_approx/`` (or add the folder to ``folder_paths``' ``vae_approx``) and
    ``VAELoader`` offers the name as ``vae_name``."""
    folder = taesd_dir(cache_dir, kind, seed)
    if not all(os.path.exists(os.path.join(folder, name)) for name in taesd_file_names(kind)):
        _build_in_subprocess(comfyui_path, folder, kind, seed, "taesd")
    return folder


def dit_conditioning(kind: str, batch: int = 1, tokens: int | None = None, seed: int = 0) -> list:
    """CONDITIONING for a ``kind`` model, as the stock encoders shape it: ``[batch, tokens, 4096]``
    states and a pooled vector (SD3: 2048, CLIP-L + CLIP-G; Flux: 768, CLIP-L), plus Flux's
    ``guidance``. ``tokens`` defaults to the stock encoders' count (``DEFAULT_TOKENS``); any
    count works. Values are unit normal (a random encoder's output has no better statistics)."""
    context_dim, pooled_dim = CONDITIONING_DIMS[_check_kind(kind)]
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens or DEFAULT_TOKENS[kind], context_dim, generator=generator)
    extras = {"pooled_output": torch.randn(batch, pooled_dim, generator=generator)}
    if kind == "flux":
        extras["guidance"] = FLUX_GUIDANCE
    return [[cond, extras]]


def main(argv: list[str]) -> None:
    comfyui_path, out, kind, seed, what = argv
    sys.path.insert(0, os.path.abspath(comfyui_path))
    if what == "dit":
        write_dit(out, kind, int(seed))
    elif what == "taesd":
        write_taesd(out, kind, int(seed))
    else:
        raise ValueError(f"unknown target {what!r}; 'dit' or 'taesd'")


if __name__ == "__main__":
    main(sys.argv[1:])
