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

Text encoders: ``dit_conditioning`` gives CONDITIONING of the shapes the stock encoders give. The
cheapest stock graph for both families is ``CLIPLoader`` type ``sd3`` with a CLIP-L file alone
(``tiny_checkpoint``'s ``sdxl_clip_l``): it pads CLIP-L's states to ``[B, 77, 4096]`` and its
pooled output with zeros to ``[B, 2048]``, which SD3 takes as is and Flux too (its forward keeps
``y[:, :768]``, the CLIP-L part; add ``FluxGuidance`` or the guidance defaults to 3.5).

The stock Flux graph (``DualCLIPLoader`` type ``flux``, ``clip_l.safetensors`` +
``t5xxl_fp8_e4m3fn.safetensors``) needs a T5-XXL, whose config ComfyUI fixes (4.76 B
parameters): ``ensure_t5xxl`` makes a full-size random one, every tensor float8_e4m3fn as in the
real file (4.76 GB; ComfyUI then keeps it in fp8 and computes in fp32), and
``ensure_flux_text_encoders`` a folder linking both files under those stock names. Its keys are
``T5XXLModel``'s ``transformer`` (``shared.weight``, ``encoder.block.*``,
``encoder.final_layer_norm.weight``; real files also carry ``encoder.embed_tokens.weight``, a
copy of ``shared.weight`` that ComfyUI ignores). Fan-in init would put the weights at fp8's
smallest normal (2^-6) and flush many to zero, so they are drawn at std 1 or 1/8 and the RMS
norms before them (2^-6, exact in fp8) take the fan-in scale; see ``T5XXL_INIT``. The file is
written tensor by tensor in chunks, so building it takes little memory (0.75 GB peak).

The 2026 families (Flux.2 dev and Klein, Z-Image, Qwen-Image, Chroma, Lumina 2, AuraFlow;
``FAMILY_KINDS``) come the same way from ``harness.dit_families``, which holds their recipes,
sizes and ``family_conditioning``; ``dit_conditioning`` hands those kinds (and ``hidream``,
which is not built: its detection fixes the full 17 B model) to it.

TAESD: ``VAELoader`` lists ``taesd3`` / ``taef1`` (and ``taesdxl``; 0.33: ``taef2``) once
``models/vae_approx/`` holds ``<name>_encoder.*`` and ``<name>_decoder.*``; ``ensure_taesd``
makes a folder with both.

Z-Image and Flux.2 Klein take a Qwen3-4B (``CLIPLoader`` type ``lumina2`` / ``flux2``; 0.3.75
has no Klein), again fixed in size: ``ensure_full_text_encoder(..., "qwen3_4b")`` makes it the
same way (4.02 B parameters, fp8, fan-in init: its RMS and q/k norms keep activations in range).

Run as a module (``python -m harness.tiny_dit COMFYUI_PATH OUT KIND SEED {dit,taesd,text_encoder}``,
``dev/`` on ``PYTHONPATH``) so ComfyUI's modules load in a process of their own; ``ensure_dit``,
``ensure_taesd`` and ``ensure_full_text_encoder`` do that.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .dit_families import (
    CONDITIONING_KINDS,
    FAMILIES,
    FAMILY_KINDS,
    SMALL_INIT,
    SMALL_INIT_STD,
    DitFamily,
    family_conditioning,
)
from .tiny_checkpoint import _init_like, _state_dict_shapes, ensure_checkpoint

# Bump when the recipe changes so cached files are rebuilt.
DIT_RECIPE_VERSION = 1

DIT_KINDS = ("sd3", "flux")
LATENT_CHANNELS = 16
DIT_LATENT_SHAPE = (LATENT_CHANNELS, 8, 8)  # 64 px
# VAELoader's names for the TAESD of each family (its files: ``<name>_encoder.*``, ``<name>_decoder.*``).
TAESD_NAMES = {"sd3": "taesd3", "flux": "taef1"}
# Latent channels of each TAESD VAELoader builds (taef2's modules fold 2 x 2 of 32 into 128).
TAESD_CHANNELS = {"taesd3": 16, "taef1": 16, "taesdxl": 4, "taef2": 128}
ALL_DIT_KINDS = (*DIT_KINDS, *FAMILY_KINDS)

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
DISK_DTYPES = {"sd3": torch.float16, "flux": torch.bfloat16, **dict.fromkeys(FAMILY_KINDS, torch.bfloat16)}


def _check_kind(kind: str) -> str:
    if kind not in ALL_DIT_KINDS:
        raise ValueError(f"unknown DiT kind {kind!r}; one of {ALL_DIT_KINDS}")
    return kind


def taesd_name(kind: str) -> str:
    """The name ``VAELoader`` gives ``kind``'s TAESD; ``ValueError`` where ComfyUI has none."""
    name = TAESD_NAMES.get(kind) or FAMILIES[_check_kind(kind)].taesd
    if name is None:
        raise ValueError(f"ComfyUI has no image TAESD for {kind}; it needs {FAMILIES[kind].vae}")
    return name


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


_BFL_NORM = re.compile(r"(_norm|\.norms\.\d+)\.weight$")


def _bfl_key(name: str) -> str:
    """Flux's (and Chroma's) on-disk name: newer ComfyUI calls the RMSNorm scales
    ``*_norm.weight`` (Chroma's approximator: ``norms.<n>.weight``)."""
    return f"{name[: -len('weight')]}scale" if _BFL_NORM.search(name) else name


def _import_class(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def family_config(kind: str) -> dict:
    """The config this ComfyUI's ``model_detection`` reads off ``kind``'s skeleton."""
    _comfy_cpu()
    return _detected_config(FAMILIES[_check_kind(kind)].skeleton)


def unsupported_reason(kind: str) -> str | None:
    """Why this ComfyUI cannot load ``kind`` (``None`` where it can). Only Klein so far: 0.3.75
    fixes Flux.2 at 48 heads, so a 3072-wide model gets heads of 64, not the RoPE's 128."""
    if kind not in FAMILIES:
        return None
    config = family_config(kind)
    if "axes_dim" in config and config["hidden_size"] // config["num_heads"] != sum(config["axes_dim"]):
        return (
            f"this ComfyUI builds {kind} with {config['num_heads']} heads, not width / "
            f"{sum(config['axes_dim'])} (ComfyUI 0.33 reads the head count off the width)"
        )
    return None


def _family_shapes(family: DitFamily) -> dict[str, torch.Size]:
    """The family's file keys and shapes: its module built from the detected config, renamed to
    the real files' layout, plus the keys other ComfyUI versions need. Checks that detection
    reads the same config back off the whole file."""
    import comfy.ops

    config = _detected_config(family.skeleton)
    with torch.device("meta"):
        model = _import_class(family.module)(**config, operations=comfy.ops.disable_weight_init)
    rename = _bfl_key if family.bfl_norms else str
    shapes = {rename(name): shape for name, shape in _state_dict_shapes(model).items()}
    shapes.update({name: torch.Size(shape) for name, shape in family.extra_keys.items() if name not in shapes})
    if _detected_config(shapes) != config:
        raise RuntimeError(f"ComfyUI reads another config off the whole {family.model_base} file than off its skeleton")
    return shapes


def _dit_shapes(kind: str) -> dict[str, torch.Size]:
    """The diffusion model's weight shapes, keyed as its file is."""
    _comfy_cpu()
    import comfy.ops

    if _check_kind(kind) in FAMILIES:
        return _family_shapes(FAMILIES[kind])
    if kind == "sd3":
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
        if name == "pos_embed":
            value = _sd3_pos_embed(shape)
        elif SMALL_INIT.search(name):
            value = torch.randn(shape, generator=generator) * SMALL_INIT_STD
        else:
            value = _init_like(name, shape, generator)
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
    name = taesd_name(kind)
    return f"{name}_encoder.safetensors", f"{name}_decoder.safetensors"


def build_taesd_state_dicts(kind: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random TAESD encoder and decoder state dicts (``TAESD_CHANNELS`` latent channels), keyed
    by the file names ``VAELoader`` looks for (``taesd3_encoder.safetensors``, ...); fp16 as the
    real ones. ``taef2`` needs ComfyUI 0.33's ``EncoderFlux2`` / ``DecoderFlux2``."""
    _comfy_cpu()
    import comfy.taesd.taesd

    generator = torch.Generator().manual_seed(seed)
    files = {}
    channels = TAESD_CHANNELS[taesd_name(kind)]
    parts = (comfy.taesd.taesd.Encoder, comfy.taesd.taesd.Decoder)
    if channels == 128:
        if not hasattr(comfy.taesd.taesd, "EncoderFlux2"):
            raise RuntimeError("this ComfyUI has no taef2 (Flux.2's TAESD came with ComfyUI 0.33)")
        parts = (comfy.taesd.taesd.EncoderFlux2, comfy.taesd.taesd.DecoderFlux2)
    for file_name, module_class in zip(taesd_file_names(kind), parts, strict=True):
        with torch.device("meta"):
            module = module_class(latent_channels=channels)
        shapes = sorted(_state_dict_shapes(module).items())
        files[file_name] = {key: _init_like(key, shape, generator).to(torch.float16) for key, shape in shapes}
    return files


def save_atomically(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file under a temporary name and rename it: no half-written cache file."""
    import safetensors.torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        safetensors.torch.save_file(state, tmp, metadata=metadata or {"recipe": str(DIT_RECIPE_VERSION)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_dit(path: str, kind: str, seed: int = 0) -> str:
    """Write the diffusion-model file of ``kind`` atomically to ``path`` and return it."""
    save_atomically(_random_dit(_check_kind(kind), seed), path)
    return path


def write_taesd(folder: str, kind: str, seed: int = 0) -> str:
    """Write the TAESD encoder and decoder files of ``kind`` into ``folder`` and return it."""
    for name, state in build_taesd_state_dicts(kind, seed).items():
        save_atomically(state, os.path.join(folder, name))
    return folder


def dit_path(cache_dir: str, kind: str, seed: int = 0) -> str:
    """Where ``ensure_dit`` keeps this recipe's diffusion model of ``kind`` and ``seed``."""
    return os.path.join(cache_dir, f"tiny_{_check_kind(kind)}_dit_r{DIT_RECIPE_VERSION}_s{seed}.safetensors")


def taesd_dir(cache_dir: str, kind: str, seed: int = 0) -> str:
    """The folder where ``ensure_taesd`` keeps this recipe's TAESD files of ``kind`` and ``seed``."""
    return os.path.join(cache_dir, f"tiny_{taesd_name(kind)}_r{DIT_RECIPE_VERSION}_s{seed}")


def _build_in_subprocess(comfyui_path: str, out: str, kind: str, seed: int, what: str) -> None:
    """Run this module as a script, importing ComfyUI from ``comfyui_path``."""
    dev = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [dev, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "harness.tiny_dit", os.path.abspath(comfyui_path), out, kind, str(seed), what]
    subprocess.run(command, check=True, cwd=comfyui_path, env=env)


def ensure_dit(comfyui_path: str, cache_dir: str, kind: str, seed: int = 0) -> str:
    """Return a cached diffusion-model file (``ALL_DIT_KINDS``) for this recipe and seed,
    building it on first use in a subprocess that imports ComfyUI from ``comfyui_path``."""
    path = dit_path(cache_dir, kind, seed)
    if not os.path.exists(path):
        _build_in_subprocess(comfyui_path, path, kind, seed, "dit")
    return path


def ensure_taesd(comfyui_path: str, cache_dir: str, kind: str, seed: int = 0) -> str:
    """Return a cached folder holding ``<name>_encoder.safetensors`` and
    ``<name>_decoder.safetensors`` (name: ``taesd_name(kind)``). Link them into
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
    count works. Values are unit normal (a random encoder's output has no better statistics).
    The 2026 families and ``hidream``: ``dit_families.family_conditioning``."""
    if kind in CONDITIONING_KINDS:
        return family_conditioning(kind, batch, tokens, seed)
    context_dim, pooled_dim = CONDITIONING_DIMS[_check_kind(kind)]
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, tokens or DEFAULT_TOKENS[kind], context_dim, generator=generator)
    extras = {"pooled_output": torch.randn(batch, pooled_dim, generator=generator)}
    if kind == "flux":
        extras["guidance"] = FLUX_GUIDANCE
    return [[cond, extras]]


# --- T5-XXL (Flux's and SD3's T5 text encoder), full size, float8_e4m3fn ---

# Bump when the T5-XXL recipe changes so cached files are rebuilt.
T5XXL_RECIPE_VERSION = 1
T5XXL_DTYPE = torch.float8_e4m3fn
# The names ComfyUI's Flux examples give DualCLIPLoader (type flux).
FLUX_CLIP_L_NAME = "clip_l.safetensors"
FLUX_T5XXL_NAME = "t5xxl_fp8_e4m3fn.safetensors"
T5XXL_TOKENS = 256  # Flux's T5 tokenizer pads to at least 256
T5XXL_DIM = 4096

# (key suffix, std of a normal draw or None for a constant, the constant), first match wins.
# T5 has no 1/sqrt(d) anywhere (ComfyUI multiplies k by sqrt(d_head) to undo SDPA's), and fp8
# e4m3fn keeps 3 mantissa bits from 2^-6 to 448 (subnormals to 2^-9, below that 0). Fan-in init
# (std 1/64 at width 4096, 1/101 for wo) would sit at the smallest normal and flush many weights to
# 0, so weights are drawn at std 1 or 1/8 (≤ 0.7 % of them become 0) and the scale goes elsewhere:
# - the pre-norms are 2^-6 = 1/sqrt(4096), so q/k/v and wi_0/wi_1 see unit-fan-in inputs: k, v,
#   wi_0 have unit std outputs; q is 1/8, so scores q.k over d_head 64 have std 1 (plus a std-1
#   relative position bias);
# - v and o at 1/8 give the attention branch std <= 64 / 64 = 1; wi_1 and wo at 1/8 give the FF
#   branch std ~ 0.65 * 101 / 64 ~ 1 (gelu(N(0, 1)) has rms 0.65);
# - the final norm is 1, so the output is unit RMS per token. Embeddings are unit normal.
T5XXL_INIT = (
    ("final_layer_norm.weight", None, 1.0),
    ("layer_norm.weight", None, 2.0**-6),
    ("shared.weight", 1.0, None),
    ("relative_attention_bias.weight", 1.0, None),
    ("SelfAttention.q.weight", 1 / 8, None),
    ("SelfAttention.k.weight", 1.0, None),
    ("SelfAttention.v.weight", 1 / 8, None),
    ("SelfAttention.o.weight", 1 / 8, None),
    ("DenseReluDense.wi_0.weight", 1.0, None),
    ("DenseReluDense.wi_1.weight", 1 / 8, None),
    ("DenseReluDense.wo.weight", 1 / 8, None),
)
_CHUNK_ELEMENTS = 1 << 24  # 64 MB of fp32 at a time
_SAFETENSORS_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.float16: "F16", torch.float32: "F32"}


def _t5xxl_shapes() -> dict[str, torch.Size]:
    """The weight shapes of ComfyUI's T5-XXL text encoder, keyed as its file is (what
    ``T5XXLModel.load_sd`` hands its ``transformer``)."""
    _comfy_cpu()
    import comfy.text_encoders.sd3_clip

    with torch.device("meta"):
        model = comfy.text_encoders.sd3_clip.T5XXLModel(device="meta", dtype=T5XXL_DTYPE)
    return _state_dict_shapes(model.transformer)


def t5xxl_init(name: str) -> tuple[float | None, float | None]:
    """``(std, None)`` for a normal draw or ``(None, value)`` for a constant, from ``T5XXL_INIT``."""
    for suffix, std, value in T5XXL_INIT:
        if name.endswith(suffix):
            return std, value
    raise KeyError(f"no T5-XXL init for {name!r}")


def t5xxl_file_bytes() -> int:
    """The T5-XXL file's tensor bytes (its header adds ~28 kB). Needs ComfyUI importable."""
    return full_text_encoder_bytes("t5xxl")


# --- Qwen3-4B (Z-Image's and Flux.2 Klein's text encoder), full size, float8_e4m3fn ---

QWEN3_4B_NAME = "qwen_3_4b.safetensors"  # the name ComfyUI's Z-Image and Klein examples use


def _qwen3_4b_shapes() -> dict[str, torch.Size]:
    """The weight shapes of ComfyUI's Qwen3-4B (``model.embed_tokens``, ``model.layers.*``,
    ``model.norm``: what ``Qwen3_4BModel.load_sd`` hands its ``transformer``); no ``lm_head``, as
    in the real file (Qwen3-4B ties it to the embeddings)."""
    _comfy_cpu()
    import comfy.text_encoders.z_image

    with torch.device("meta"):
        model = comfy.text_encoders.z_image.Qwen3_4BModel(device="meta", dtype=T5XXL_DTYPE)
    return _state_dict_shapes(model.transformer)


def qwen3_init(name: str, shape: torch.Size) -> tuple[float | None, float | None]:
    """Qwen3 normalises before every projection (RMSNorm, and q/k norms), so plain fan-in init
    keeps activations in range: norms 1, embeddings unit normal, linears std ``fan_in ** -0.5``
    (in fp8 about 4 % of them flush to 0, which a random model does not mind)."""
    if len(shape) == 1:
        return None, 1.0
    if name.endswith("embed_tokens.weight"):
        return 1.0, None
    return shape[1] ** -0.5, None


@dataclass(frozen=True)
class FullTextEncoder:
    """A text encoder whose config ComfyUI fixes, so tests need it full size: random weights,
    every tensor ``T5XXL_DTYPE`` (float8_e4m3fn) as the fp8 files artists use."""

    recipe: int  # bump when the recipe changes so cached files are rebuilt
    shapes: Callable[[], dict[str, torch.Size]]
    init: Callable[[str, torch.Size], tuple[float | None, float | None]]  # (std, None) or (None, value)


FULL_TEXT_ENCODERS = {
    "t5xxl": FullTextEncoder(T5XXL_RECIPE_VERSION, _t5xxl_shapes, lambda name, shape: t5xxl_init(name)),
    "qwen3_4b": FullTextEncoder(1, _qwen3_4b_shapes, qwen3_init),
}


def _text_encoder_chunks(encoder: FullTextEncoder, name: str, shape: torch.Size, generator: torch.Generator):
    """The tensor's values in ``T5XXL_DTYPE``, row blocks of at most ``_CHUNK_ELEMENTS``."""
    std, value = encoder.init(name, shape)
    if std is None:
        yield torch.full(shape, value).to(T5XXL_DTYPE)
        return
    rows, row_shape = shape[0], shape[1:]
    step = max(1, _CHUNK_ELEMENTS // max(1, math.prod(row_shape)))
    for start in range(0, rows, step):
        block = torch.randn((min(step, rows - start), *row_shape), generator=generator)
        yield block.mul_(std).to(T5XXL_DTYPE)


def full_text_encoder_bytes(kind: str) -> int:
    """Tensor bytes of ``kind``'s file (``FULL_TEXT_ENCODERS``). Needs ComfyUI importable."""
    size = torch.empty((), dtype=T5XXL_DTYPE).element_size()
    return sum(size * math.prod(shape) for shape in FULL_TEXT_ENCODERS[kind].shapes().values())


def write_full_text_encoder(path: str, kind: str, seed: int = 0) -> str:
    """Write the random ``kind`` text encoder atomically to ``path`` and return it. The
    safetensors file is streamed (header, then each tensor chunk by chunk, sorted key order),
    never held in memory."""
    encoder = FULL_TEXT_ENCODERS[kind]
    shapes = dict(sorted(encoder.shapes().items()))
    size = torch.empty((), dtype=T5XXL_DTYPE).element_size()
    header: dict = {"__metadata__": {"recipe": str(encoder.recipe), "seed": str(seed)}}
    offset = 0
    for name, shape in shapes.items():
        end = offset + size * math.prod(shape)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[T5XXL_DTYPE], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for name, shape in shapes.items():
                for chunk in _text_encoder_chunks(encoder, name, shape, generator):
                    handle.write(chunk.contiguous().view(torch.uint8).numpy().data)
        if os.path.getsize(tmp) != 8 + len(encoded) + offset:
            raise RuntimeError(f"{tmp} has {os.path.getsize(tmp)} bytes, expected {8 + len(encoded) + offset}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def full_text_encoder_path(cache_dir: str, kind: str, seed: int = 0) -> str:
    """Where ``ensure_full_text_encoder`` keeps this recipe's ``kind`` file of ``seed``."""
    recipe = FULL_TEXT_ENCODERS[kind].recipe
    return os.path.join(cache_dir, f"random_{kind}_fp8_e4m3fn_r{recipe}_s{seed}.safetensors")


def ensure_full_text_encoder(comfyui_path: str, cache_dir: str, kind: str, seed: int = 0) -> str:
    """Return a cached full-size random ``kind`` text encoder (``FULL_TEXT_ENCODERS``; T5-XXL
    4.76 GB, Qwen3-4B 4.02 GB), building it on first use in a subprocess that imports ComfyUI
    from ``comfyui_path`` (about a minute on 2 busy cores; under 1 GB peak memory)."""
    path = os.path.abspath(full_text_encoder_path(cache_dir, kind, seed))  # the builder runs in comfyui_path
    if not os.path.exists(path):
        _build_in_subprocess(comfyui_path, path, kind, seed, "text_encoder")
    return path


def ensure_t5xxl(comfyui_path: str, cache_dir: str, seed: int = 0) -> str:
    """``ensure_full_text_encoder`` for the T5-XXL of Flux.1, SD3 and Chroma."""
    return ensure_full_text_encoder(comfyui_path, cache_dir, "t5xxl", seed)


def _link(target: str, link: str) -> None:
    tmp = f"{link}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(target, os.path.dirname(link)), tmp)
    os.replace(tmp, link)


def ensure_flux_text_encoders(comfyui_path: str, cache_dir: str, seed: int = 0) -> str:
    """Return a folder holding ``clip_l.safetensors`` (``tiny_checkpoint``'s random ``sdxl_clip_l``)
    and ``t5xxl_fp8_e4m3fn.safetensors`` (``ensure_t5xxl``), links into ``cache_dir``. Add it to
    ``folder_paths``' ``text_encoders`` and the stock ``DualCLIPLoader`` loads
    ``(FLUX_CLIP_L_NAME, FLUX_T5XXL_NAME, "flux")``."""
    cache_dir = os.path.abspath(cache_dir)  # the builders run in comfyui_path
    folder = os.path.join(cache_dir, f"flux_text_encoders_r{T5XXL_RECIPE_VERSION}_s{seed}")
    os.makedirs(folder, exist_ok=True)
    targets = {
        FLUX_CLIP_L_NAME: ensure_checkpoint(comfyui_path, cache_dir, seed=seed, kind="sdxl_clip_l"),
        FLUX_T5XXL_NAME: ensure_t5xxl(comfyui_path, cache_dir, seed),
    }
    for name, target in targets.items():
        link = os.path.join(folder, name)
        if not os.path.exists(link) or os.path.realpath(link) != os.path.realpath(target):
            _link(target, link)
    return folder


def main(argv: list[str]) -> None:
    comfyui_path, out, kind, seed, what = argv
    sys.path.insert(0, os.path.abspath(comfyui_path))
    if what == "dit":
        write_dit(out, kind, int(seed))
    elif what == "taesd":
        write_taesd(out, kind, int(seed))
    elif what == "text_encoder":
        write_full_text_encoder(out, kind, int(seed))
    else:
        raise ValueError(f"unknown target {what!r}; 'dit', 'taesd' or 'text_encoder'")


if __name__ == "__main__":
    main(sys.argv[1:])
