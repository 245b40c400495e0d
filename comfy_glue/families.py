"""The model families the pack knows, as data: one ``ModelFamily`` per family says which of its
layers get a LoRA, which blocks update their inputs in place, how the community's LoRA files name
its layers (``LoraNaming``), and where joint attention hooks into it. The trainer, the LoRA files
and joint attention all read it, so a new family is one entry in ``FAMILIES``.

A model is matched by ComfyUI's own name for its family, the ``supported_models`` class of its
config (``Flux2``, ``ZImage``, ...), most specific first along that class's bases, so a
``FluxSchnell`` model is Flux.1 and a ``ZImagePixelSpace`` one Z-Image. Any other image model
ComfyUI loads gets ``generic_family``: its blocks are found from the model's structure. Models
whose latents are not images (audio, 3D) are refused. ``latent_layout`` says whether a model takes
its latents with a frame axis (Qwen-Image, the video models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..pure.errors import InputError

# Layers inside a block that are not trained: the timestep modulation (adaLN, img_mod, ...).
MODULATION_PARTS = ("mod", "adaLN")


@dataclass(frozen=True)
class LoraNaming:
    """How one LoRA file layout names a family's layers: ``prefix``, then the layer's name.

    That name is the model's own module name as ComfyUI builds it (kohya's ``lora_unet_`` files
    join its parts with ``_``) or, with ``diffusers``, the name ComfyUI's LoRA key map
    (``comfy.lora.model_lora_keys_unet``) gives the layer under ``prefix``: the diffusers
    model's module names, where a fused ``qkv`` becomes ``to_q`` / ``to_k`` / ``to_v``. The pack
    writes only names that map reads, and uses layouts it reads in ComfyUI 0.3.75 and 0.33 alike.
    """

    prefix: str
    diffusers: bool = False


# sd-scripts and musubi-tuner: the model's module names (BFL's for Flux, SAI's for SD3, ...).
KOHYA = LoraNaming("lora_unet_")
# sd-scripts on SD1.x/SD2.x: the diffusers UNet's module names.
KOHYA_DIFFUSERS_UNET = LoraNaming("lora_unet_", diffusers=True)
# diffusers' trainers, SimpleTuner, ai-toolkit's Flux.1 files: diffusers names under ``transformer.``.
DIFFUSERS = LoraNaming("transformer.", diffusers=True)
# ai-toolkit's Z-Image files: diffusers names under ``diffusion_model.`` (0.3.75 reads no other).
DIFFUSERS_UNDER_DIFFUSION_MODEL = LoraNaming("diffusion_model.", diffusers=True)
# core Save LoRA Weights (and the trainer's own keys): ComfyUI reads it for every model.
COMFYUI = LoraNaming("diffusion_model.")
COMFYUI_ONLY = (("comfyui", COMFYUI),)


@dataclass(frozen=True)
class ModelFamily:
    """What the pack needs to know about one family of diffusion models.

    Attributes:
        name: the family as artists call it.
        configs: ComfyUI's ``supported_models`` class names that mean this family.
        blocks: the diffusion model's block lists (``double_blocks``, ...) in depth order, whose
            attention and MLP linears get a LoRA; ``None`` for a UNet, where every layer does.
        in_place: whether its blocks update their inputs in place (Flux's ``img += ...``),
            which training must guard (``trainers.checkpointing.saving_copies``).
        kohya_version: ``ss_base_model_version`` as the family's kohya-style trainer (sd-scripts,
            musubi-tuner) writes it; ``None`` where none is known.
        kohya_versions: ``(width, version)`` pairs where the version depends on the model's width
            (``hidden_size``: Flux.2 dev and the Klein sizes); they win over ``kohya_version``.
        lora_layouts: ``(layout, LoraNaming)`` for each LoRA file layout the family's LoRAs come in,
            in the order they are offered.
        joint_blocks: block list -> ``patches_replace["dit"]`` key of its blocks, where joint
            attention hooks into this DiT (empty where joint attention does not support it).
        joint_by_attention: ComfyUI has no block replacements for this DiT (Z-Image), so joint
            attention rides on the attention override for the whole model call, which tells
            the ``joint_blocks`` layers by their token count and order.
        latent_downscale: image pixels per latent cell along a side (Flux.2's VAE folds 2 x 2
            cells into its 128 channels: 16); newer ComfyUI says it on the latent format.
    """

    name: str
    configs: tuple[str, ...]
    blocks: tuple[str, ...] | None
    in_place: bool = False
    kohya_version: str | None = None
    kohya_versions: tuple[tuple[int, str], ...] = ()
    lora_layouts: tuple[tuple[str, LoraNaming], ...] = COMFYUI_ONLY
    joint_blocks: tuple[tuple[str, str], ...] = ()
    joint_by_attention: bool = False
    latent_downscale: int = 8

    @property
    def is_dit(self) -> bool:
        return self.blocks is not None

    def block_modules(self, diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
        """Every block of ``blocks``, in depth order (empty for a UNet)."""
        return [block for name in self.blocks or () for block in getattr(diffusion_model, name, ())]

    def adapted(self, name: str) -> bool:
        """Whether the layer ``name`` (``diffusion_model.…``) gets a LoRA: on a UNet every layer;
        on a DiT the linears inside its blocks, not the modulation, the embedders or the final
        layer (as the family's usual LoRAs)."""
        if self.blocks is None:
            return True
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in self.blocks:
            return False
        return not any(marker in part for part in parts[3:] for marker in MODULATION_PARTS)

    def in_place_blocks(self, diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
        return self.block_modules(diffusion_model) if self.in_place else []

    def lora_naming(self, layout: str) -> LoraNaming:
        """How ``layout`` names this family's layers.

        Raises:
            InputError: a layout without a naming for this family; the message names those with one.
        """
        namings = dict(self.lora_layouts)
        if layout not in namings:
            raise InputError(
                f"the {layout} layout has no naming for {self.name} models; save in the "
                f"{' or '.join(namings)} layout, which ComfyUI's LoRA loaders read for {self.name}"
            )
        return namings[layout]

    def base_model_version(self, unet_config: dict) -> str | None:
        """``ss_base_model_version`` for a model of this family with ``unet_config``."""
        return dict(self.kohya_versions).get(unet_config.get("hidden_size"), self.kohya_version)


FLUX_BLOCKS = ("double_blocks", "single_blocks")
FLUX_JOINT = (("double_blocks", "double_block"), ("single_blocks", "single_block"))

UNET_LAYOUTS = (("kohya", KOHYA), ("comfyui", COMFYUI))
DIT_LAYOUTS = (("kohya", KOHYA), ("diffusers", DIFFUSERS), ("comfyui", COMFYUI))
# ComfyUI 0.3.75 has no diffusers names for Flux.2's MLPs and fused single-block linear1.
FLUX2_LAYOUTS = UNET_LAYOUTS
# Flux.2 widths (hidden_size) -> musubi-tuner's names of the variants.
FLUX2_VERSIONS = ((6144, "flux_2_dev"), (4096, "flux_2_klein_9b"), (3072, "flux_2_klein_4b"))

FAMILIES = (
    ModelFamily(
        "SD1.x",
        ("SD15",),
        None,
        kohya_version="sd_v1",
        lora_layouts=(("kohya", KOHYA_DIFFUSERS_UNET), ("comfyui", COMFYUI)),
    ),
    ModelFamily(
        "SD2.x",
        ("SD20",),
        None,
        kohya_version="sd_v2",
        lora_layouts=(("kohya", KOHYA_DIFFUSERS_UNET), ("comfyui", COMFYUI)),
    ),
    ModelFamily("SDXL", ("SDXL", "SDXLRefiner"), None, kohya_version="sdxl_base_v1-0", lora_layouts=UNET_LAYOUTS),
    ModelFamily(
        "SD3/SD3.5",
        ("SD3",),
        ("joint_blocks",),
        kohya_version="sd3",
        lora_layouts=DIT_LAYOUTS,
        joint_blocks=(("joint_blocks", "double_block"),),
    ),
    ModelFamily(
        "Flux.1",
        ("Flux",),
        FLUX_BLOCKS,
        in_place=True,
        kohya_version="flux1",
        lora_layouts=DIT_LAYOUTS,
        joint_blocks=FLUX_JOINT,
    ),
    ModelFamily(
        "Flux.2",
        ("Flux2",),
        FLUX_BLOCKS,
        in_place=True,
        kohya_versions=FLUX2_VERSIONS,
        lora_layouts=FLUX2_LAYOUTS,
        joint_blocks=FLUX_JOINT,
        latent_downscale=16,
    ),
    ModelFamily("Chroma", ("Chroma",), FLUX_BLOCKS, in_place=True, lora_layouts=DIT_LAYOUTS, joint_blocks=FLUX_JOINT),
    ModelFamily(
        "Qwen-Image",
        ("QwenImage",),
        ("transformer_blocks",),
        kohya_version="qwen_image",
        lora_layouts=DIT_LAYOUTS,
        joint_blocks=(("transformer_blocks", "double_block"),),
    ),
    # musubi-tuner's kohya-style Z-Image files use diffusers names, which ComfyUI's map does not read.
    ModelFamily(
        "Z-Image",
        ("ZImage",),
        ("layers",),
        kohya_version="z_image",
        lora_layouts=(("diffusers", DIFFUSERS_UNDER_DIFFUSION_MODEL), ("comfyui", COMFYUI)),
        joint_blocks=(("layers", "layer"),),
        joint_by_attention=True,
    ),
    ModelFamily(
        "HiDream",
        ("HiDream",),
        ("double_stream_blocks", "single_stream_blocks"),
        lora_layouts=(("diffusers", DIFFUSERS), ("comfyui", COMFYUI)),
    ),
)
NAMED_FAMILIES = ", ".join(family.name for family in FAMILIES)


def config_names(model) -> list[str]:
    """ComfyUI's family names of ``model`` (a ``model_base.BaseModel``), most specific first."""
    return [cls.__name__ for cls in type(model.model_config).__mro__]


def attention_blocks(diffusion_model: torch.nn.Module) -> tuple[str, ...]:
    """The diffusion model's own block lists: its ``ModuleList`` children whose every entry holds
    an attention module (a submodule named ``attn…`` or ``attention…``) and a linear layer."""

    def is_block(module: torch.nn.Module) -> bool:
        names = [name.rsplit(".", 1)[-1].lower() for name, _ in module.named_modules()]
        has_linear = any(isinstance(m, torch.nn.Linear) for m in module.modules())
        return has_linear and any(name.startswith(("attn", "attention")) for name in names)

    return tuple(
        name
        for name, child in diffusion_model.named_children()
        if isinstance(child, torch.nn.ModuleList) and len(child) and all(map(is_block, child))
    )


def generic_family(model) -> ModelFamily:
    """Any other image model ComfyUI loads: a UNet trains every layer, as SD1.x does; a
    transformer its blocks found from its structure (in-place updates assumed: guarding costs
    little, and a wrong guess would break training). Their LoRAs are saved in the comfyui layout
    (``COMFYUI_ONLY``, the default).
    """
    name = config_names(model)[0]
    if isinstance(model.diffusion_model, UNetModel):
        return ModelFamily(name, (name,), None)
    blocks = attention_blocks(model.diffusion_model)
    if not blocks:
        raise InputError(
            f"the pack finds no transformer blocks in this {name} model; "
            f"it trains {NAMED_FAMILIES} and other transformer image models"
        )
    return ModelFamily(name, (name,), blocks, in_place=True)


def named_family(model) -> ModelFamily | None:
    """The entry of ``FAMILIES`` for ``model`` (a ``model_base.BaseModel``), or None."""
    for name in config_names(model):
        for family in FAMILIES:
            if name in family.configs:
                return family
    return None


# Audio models whose latents ComfyUI keeps 2-D, as an image's (ACE-Step's [B, 8, 16, T]).
AUDIO_CONFIGS = ("ACEStep",)


def model_family(model) -> ModelFamily:
    """The family of ``model`` (a ``model_base.BaseModel``): a named one, or ``generic_family``.

    Raises:
        InputError: a model whose latents are not images (audio, 3D), or without blocks to train.
    """
    names = config_names(model)
    if model.latent_format.latent_dimensions < 2 or set(names) & set(AUDIO_CONFIGS):
        raise InputError(
            f"this is a {names[0]} model, which does not make images; the pack trains "
            f"{NAMED_FAMILIES} and other image models"
        )
    return named_family(model) or generic_family(model)


# The layer that first reads the text encoder's states, by ComfyUI's module names: Flux's,
# Chroma's and Qwen-Image's ``txt_in``, Lumina 2's and Z-Image's ``cap_embedder``, AuraFlow's
# ``cond_seq_linear``, SD3's ``context_embedder``.
TEXT_INPUTS = ("txt_in", "cap_embedder", "cond_seq_linear", "context_embedder")


def text_width(model) -> int | None:
    """How wide the text encoder's states are that ``model`` (a ``model_base.BaseModel``) reads:
    a UNet's cross-attention ``context_dim``, else the input of its first text layer
    (``TEXT_INPUTS``); None where the pack does not know it."""
    if isinstance(model.diffusion_model, UNetModel):
        width = model.model_config.unet_config.get("context_dim")
        return width if isinstance(width, int) else None
    for name in TEXT_INPUTS:
        module = getattr(model.diffusion_model, name, None)
        if isinstance(module, torch.nn.Sequential):  # Lumina 2's and Z-Image's: a norm, then the linear
            module = next((layer for layer in module if isinstance(layer, torch.nn.Linear)), None)
        if isinstance(module, torch.nn.Linear):
            return module.in_features
    return None


@dataclass(frozen=True)
class LatentLayout:
    """How a model takes the pack's image latents ``[B, C, h, w]``: as they are, or with a frame
    axis ``[B, C, 1, h, w]`` where its latent format has one (``latent_dimensions == 3``: Wan 2.1's
    latents of Qwen-Image, and the video models), as ComfyUI's sampler gives them
    (``comfy.sample.fix_empty_latent_channels``). Pair sets, noise, errors and weight maps stay on
    the image grid; only what goes into and comes out of the model changes layout."""

    frame_axis: bool = False

    def to_model(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> the model's layout."""
        return latents.unsqueeze(2) if self.frame_axis else latents

    def to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's layout (one frame) -> ``[B, C, h, w]``."""
        return latents.squeeze(2) if self.frame_axis else latents


def latent_downscale(model) -> int:
    """Image pixels per latent cell along a side for ``model`` (a ``model_base.BaseModel``): its
    latent format's ``spacial_downscale_ratio`` (ComfyUI 0.33), else its family's (0.3.75)."""
    ratio = getattr(model.latent_format, "spacial_downscale_ratio", None)
    if ratio is not None:
        return ratio
    family = named_family(model)
    return family.latent_downscale if family else 8


def latent_layout(model) -> LatentLayout:
    """The layout ``model`` (a ``model_base.BaseModel``) takes its latents in."""
    return LatentLayout(frame_axis=model.latent_format.latent_dimensions == 3)
