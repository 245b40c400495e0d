"""The 2026 DiT families ``harness.tiny_dit`` builds as tiny random-weight files, and their
CONDITIONING as tensors: what ComfyUI's ``model_detection`` reads for each, and what each
family's ``model_base`` ``extra_conds`` takes (checked in ComfyUI 0.3.75 and 0.33).

Each family is the fewest blocks of each kind it has (one double and one single block for the
Flux-style ones, one main layer for the single-stream ones) at the widths detection fixes:

- ``flux2`` (``model_base.Flux2``, Flux.2 dev-shaped): detected by
  ``double_stream_modulation_img.lin.weight``; 0.3.75 fixes 48 heads of 128, so the width is
  6144 (2.29 B parameters, 4.6 GB bf16). 128 latent channels, patch 1 on a /16 latent; text
  15360 wide (Mistral Small 3's layers 10, 20, 30 stacked), ``guidance_in`` present (dev).
- ``flux2_klein`` (``Flux2``, Klein 4B-shaped): 3072 wide, 24 heads, text 7680 (Qwen3-4B's
  layers 9, 18, 27), no ``guidance_in``; 0.56 B. Only 0.33 reads the head count off the width:
  0.3.75 builds 48 heads and refuses it (positional dim 64, not 128).
- ``z_image`` (``ZImage``, a Lumina2 config on ``NextDiT``): detection requires width 3840;
  ``n_layers`` is counted (1 here), the noise and context refiners stay 2 + 2; text 2560
  (Qwen3-4B); ``cap_pad_token`` present as in the real file; 0.91 B.
- ``qwen_image`` (``QwenImage``): widths fixed (3072, text 3584, Qwen2.5-VL 7B), one block;
  0.38 B. Latents are Wan 2.1's (16 channels, /8; KSampler's ``fix_empty_latent_channels``
  adds a frame axis, ``[B, 16, 1, H, W]``). Qwen-Image-Edit's weights have the same keys:
  neither version tells it apart (0.33 only marks the 2511 edit by a ``__index_timestep_zero__``
  key, which sets the reference method); editing comes from ``reference_latents`` in the
  conditioning.
- ``chroma`` (``Chroma``): Flux.1's 3072 width and 24 heads, the fixed 5-layer, 5120-wide
  ``distilled_guidance_layer`` instead of modulation layers; T5-XXL text (4096), no pooled
  vector; 0.63 B.
- ``lumina2`` (``Lumina2``): width 2304 (24 heads, 8 kv heads), one main layer, refiners 2 + 2,
  text 2304 (Gemma 2 2B); 0.43 B.
- ``auraflow`` (``AuraFlow``): detected by ``double_layers.0.attn.w1q.weight``; the width stays
  the module's default 3072, one double and one single layer, ``positional_encoding`` for
  64 x 64 patches, text 2048 (Pile-T5-XL); SDXL's 4-channel latents; 0.56 B.

HiDream is not built: its detection fixes 16 double and 32 single MoE layers (no block is
counted), so the smallest file ComfyUI detects as HiDream is the full 17.1 B model (34 GB bf16).
``family_conditioning("hidream")`` still gives its CONDITIONING shapes.

Files use the layout real files have, whichever ComfyUI builds them: the Flux-style RMSNorm
scales are ``*.scale`` (0.3.75 detects Flux only by that name; 0.33 renames them on load), and
Lumina2 / Z-Image carry ``norm_final.weight`` (0.3.75's ``NextDiT`` has it, 0.33's dropped it
and ignores the key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DitFamily:
    """One family's recipe: the keys detection reads (``skeleton``), the ComfyUI module class
    built from the detected config, and what the file and the conditioning look like."""

    module: str  # dotted path of ComfyUI's diffusion-model class
    skeleton: dict[str, tuple[int, ...]]
    model_base: str  # comfy.model_base class the loader builds
    config: str  # comfy.supported_models class detection picks
    latent_shape: tuple[int, int, int]  # [C, H, W] of a 64 px image
    context_dim: int  # text states width
    bfl_norms: bool = False  # RMSNorm scales saved as ``*.scale``
    extra_keys: dict[str, tuple[int, ...]] = field(default_factory=dict)  # keys some versions need
    pooled_dim: int | None = None  # None: the stock encoder gives no pooled vector
    guidance: float | None = None  # Flux-style distilled guidance in the conditioning
    taesd: str | None = None  # VAELoader's tiny autoencoder for the latents, if ComfyUI has one
    vae: str = ""  # the full VAE the family needs


FLUX2_HIDDEN = 6144  # 0.3.75 fixes 48 heads x 128 (sum of the RoPE axes)
KLEIN_HIDDEN = 3072  # Klein 4B: 24 heads x 128; 0.33 reads the heads off the width
FLUX2_CHANNELS = 128
FLUX2_CONTEXT_DIM = 3 * 5120  # Mistral Small 3 24B, three layers stacked
KLEIN_CONTEXT_DIM = 3 * 2560  # Qwen3-4B, three layers stacked
FLUX2_GUIDANCE = 4.0
CHROMA_HIDDEN = 3072
ZIMAGE_DIM = 3840  # what detection calls Z-Image
ZIMAGE_CONTEXT_DIM = 2560  # Qwen3-4B
LUMINA2_DIM = 2304  # what detection calls Lumina 2
LUMINA2_CONTEXT_DIM = 2304  # Gemma 2 2B
QWEN_HIDDEN = 3072
QWEN_CONTEXT_DIM = 3584  # Qwen2.5-VL 7B
AURA_HIDDEN = 3072  # the MMDiT default; detection reads no width
AURA_CONTEXT_DIM = 2048  # Pile-T5-XL
AURA_MAX_SEQ = 64 * 64  # positional_encoding for 64 x 64 patches (1024 px)
T5XXL_DIM = 4096

FAMILIES = {
    "flux2": DitFamily(
        module="comfy.ldm.flux.model.Flux",
        skeleton={
            "img_in.weight": (FLUX2_HIDDEN, FLUX2_CHANNELS),
            "txt_in.weight": (FLUX2_HIDDEN, FLUX2_CONTEXT_DIM),
            "guidance_in.in_layer.weight": (FLUX2_HIDDEN, 256),
            "double_stream_modulation_img.lin.weight": (6 * FLUX2_HIDDEN, FLUX2_HIDDEN),
            "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
            "single_blocks.0.linear1.weight": (1, FLUX2_HIDDEN),
        },
        model_base="Flux2",
        config="Flux2",
        latent_shape=(FLUX2_CHANNELS, 4, 4),
        context_dim=FLUX2_CONTEXT_DIM,
        bfl_norms=True,
        guidance=FLUX2_GUIDANCE,
        taesd="taef2",
        vae="the Flux.2 VAE (128 channels after its 2 x 2 patching)",
    ),
    "flux2_klein": DitFamily(
        module="comfy.ldm.flux.model.Flux",
        skeleton={
            "img_in.weight": (KLEIN_HIDDEN, FLUX2_CHANNELS),
            "txt_in.weight": (KLEIN_HIDDEN, KLEIN_CONTEXT_DIM),
            "double_stream_modulation_img.lin.weight": (6 * KLEIN_HIDDEN, KLEIN_HIDDEN),
            "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
            "single_blocks.0.linear1.weight": (1, KLEIN_HIDDEN),
        },
        model_base="Flux2",
        config="Flux2",
        latent_shape=(FLUX2_CHANNELS, 4, 4),
        context_dim=KLEIN_CONTEXT_DIM,
        bfl_norms=True,
        taesd="taef2",
        vae="the Flux.2 VAE",
    ),
    "z_image": DitFamily(
        module="comfy.ldm.lumina.model.NextDiT",
        skeleton={
            "cap_embedder.1.weight": (ZIMAGE_DIM, ZIMAGE_CONTEXT_DIM),
            "cap_pad_token": (1, ZIMAGE_DIM),
            "layers.0.attention.qkv.weight": (3 * ZIMAGE_DIM, ZIMAGE_DIM),
            "noise_refiner.0.attention.k_norm.weight": (128,),
        },
        model_base="Lumina2",
        config="ZImage",
        latent_shape=(16, 8, 8),
        context_dim=ZIMAGE_CONTEXT_DIM,
        extra_keys={"norm_final.weight": (ZIMAGE_DIM,)},
        taesd="taef1",
        vae="Flux.1's 16-channel VAE (ae.safetensors)",
    ),
    "qwen_image": DitFamily(
        module="comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",
        skeleton={
            "img_in.weight": (QWEN_HIDDEN, 64),
            "txt_norm.weight": (QWEN_CONTEXT_DIM,),
            "transformer_blocks.0.attn.to_q.weight": (QWEN_HIDDEN, QWEN_HIDDEN),
        },
        model_base="QwenImage",
        config="QwenImage",
        latent_shape=(16, 8, 8),
        context_dim=QWEN_CONTEXT_DIM,
        vae="the Wan 2.1 VAE (qwen_image_vae.safetensors); VAELoader has no image TAESD for it",
    ),
    "chroma": DitFamily(
        module="comfy.ldm.chroma.model.Chroma",
        skeleton={
            "img_in.weight": (CHROMA_HIDDEN, 64),
            "txt_in.weight": (CHROMA_HIDDEN, T5XXL_DIM),
            "distilled_guidance_layer.norms.0.scale": (5120,),
            "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
            "single_blocks.0.linear1.weight": (1, CHROMA_HIDDEN),
        },
        model_base="Chroma",
        config="Chroma",
        latent_shape=(16, 8, 8),
        context_dim=T5XXL_DIM,
        bfl_norms=True,
        taesd="taef1",
        vae="Flux.1's 16-channel VAE",
    ),
    "lumina2": DitFamily(
        module="comfy.ldm.lumina.model.NextDiT",
        skeleton={
            "cap_embedder.1.weight": (LUMINA2_DIM, LUMINA2_CONTEXT_DIM),
            "layers.0.attention.qkv.weight": ((24 + 2 * 8) * 96, LUMINA2_DIM),
            "noise_refiner.0.attention.k_norm.weight": (96,),
        },
        model_base="Lumina2",
        config="Lumina2",
        latent_shape=(16, 8, 8),
        context_dim=LUMINA2_CONTEXT_DIM,
        extra_keys={"norm_final.weight": (LUMINA2_DIM,)},
        taesd="taef1",
        vae="Flux.1's 16-channel VAE",
    ),
    "auraflow": DitFamily(
        module="comfy.ldm.aura.mmdit.MMDiT",
        skeleton={
            "double_layers.0.attn.w1q.weight": (AURA_HIDDEN, AURA_HIDDEN),
            "single_layers.0.attn.w1q.weight": (AURA_HIDDEN, AURA_HIDDEN),
            "positional_encoding": (1, AURA_MAX_SEQ, AURA_HIDDEN),
            "cond_seq_linear.weight": (AURA_HIDDEN, AURA_CONTEXT_DIM),
        },
        model_base="AuraFlow",
        config="AuraFlow",
        latent_shape=(4, 8, 8),
        context_dim=AURA_CONTEXT_DIM,
        taesd="taesdxl",
        vae="SDXL's VAE",
    ),
}
FAMILY_KINDS = tuple(FAMILIES)

# Learned tokens and tables that the module draws at a small scale rather than fan-in (fan-in
# over 1 x 4096 x 3072 would make AuraFlow's positions ~3e-4, no positions at all).
SMALL_INIT_STD = 0.02
SMALL_INIT = re.compile(r"(^|\.)(positional_encoding|register_tokens|x_pad_token|cap_pad_token)$")

# --- conditioning ---

# Token counts: HiDream's encoders give 128 T5 tokens (ComfyUI's zeros stand in with 128);
# the others follow the prompt, so a short prompt's count stands in. Flux.2's model_base pads the
# text to 512 tokens whatever it gets.
DEFAULT_FAMILY_TOKENS = 32
HIDREAM_T5_TOKENS = 128
HIDREAM_LLAMA_LAYERS = 32  # Llama 3.1 8B's hidden states, every layer
HIDREAM_POOLED_DIM = 768 + 1280  # CLIP-L + CLIP-G pooled
CONDITIONING_KINDS = (*FAMILY_KINDS, "hidream")


def family_conditioning(kind: str, batch: int = 1, tokens: int | None = None, seed: int = 0) -> list:
    """CONDITIONING for a ``kind`` model of ``FAMILIES`` (or ``hidream``) as the stock encoders
    shape it: ``[batch, tokens, context_dim]`` states and ``pooled_output`` (``None`` where the
    stock encoder gives none, as ``CLIPTextEncode`` passes it), plus Flux.2 dev's ``guidance``
    and HiDream's ``conditioning_llama3`` (``[batch, 32, tokens, 4096]``, its states are T5's 128
    tokens). Values are unit normal."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "hidream":
        cond = torch.randn(batch, HIDREAM_T5_TOKENS, T5XXL_DIM, generator=generator)
        llama_tokens = tokens or DEFAULT_FAMILY_TOKENS
        llama = torch.randn(batch, HIDREAM_LLAMA_LAYERS, llama_tokens, T5XXL_DIM, generator=generator)
        pooled = torch.randn(batch, HIDREAM_POOLED_DIM, generator=generator)
        return [[cond, {"pooled_output": pooled, "conditioning_llama3": llama}]]
    if kind not in FAMILIES:
        raise ValueError(f"unknown family {kind!r}; one of {CONDITIONING_KINDS}")
    family = FAMILIES[kind]
    cond = torch.randn(batch, tokens or DEFAULT_FAMILY_TOKENS, family.context_dim, generator=generator)
    pooled = None if family.pooled_dim is None else torch.randn(batch, family.pooled_dim, generator=generator)
    extras = {"pooled_output": pooled}
    if family.guidance is not None:
        extras["guidance"] = family.guidance
    return [[cond, extras]]
