"""What the pack needs to know about ComfyUI's DiT families (Flux.1, SD3/SD3.5 MMDiT): their
blocks, which of their layers get LoRA adapters, and which blocks update their inputs in place."""

from __future__ import annotations

import torch
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

from ..pure.joint_attention import BLOCK_NAMES

DIT_FAMILIES = "Flux.1 and SD3/SD3.5"
BLOCK_LISTS = ("double_blocks", "single_blocks", "joint_blocks")


def is_dit(diffusion_model: torch.nn.Module) -> bool:
    return isinstance(diffusion_model, (Flux, MMDiT))


def dit_blocks(diffusion_model: torch.nn.Module) -> list[tuple[tuple[str, int], str]]:
    """``(patches_replace["dit"] key, block name)`` of every block of a supported DiT (empty for
    other models). Names split the blocks in depth order into thirds: ``input``, ``middle``,
    ``output``, so the Joint Attention block switches mean early, middle and late layers."""
    if isinstance(diffusion_model, Flux):
        keys = [("double_block", i) for i in range(len(diffusion_model.double_blocks))]
        keys += [("single_block", i) for i in range(len(diffusion_model.single_blocks))]
    elif isinstance(diffusion_model, MMDiT):
        keys = [("double_block", i) for i in range(len(diffusion_model.joint_blocks))]
    else:
        return []
    return [(key, BLOCK_NAMES[min(2, 3 * depth // len(keys))]) for depth, key in enumerate(keys)]


def adapted_dit_layer(name: str) -> bool:
    """Whether a DiT's layer ``name`` (``diffusion_model.…``) gets a LoRA: the attention and MLP
    linears of the transformer blocks (Flux's fused ``linear1``/``linear2`` included), not the
    timestep modulation, the embedders or the final layer (as the usual Flux and SD3 LoRAs)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[1] not in BLOCK_LISTS:
        return False
    return not any(part.endswith("mod") or part.endswith("modulation") for part in parts[3:])


def in_place_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks that update their inputs in place (``img += ...``): Flux's double and single
    stream blocks. Other families' blocks compute out of place."""
    if isinstance(diffusion_model, Flux):
        return [*diffusion_model.double_blocks, *diffusion_model.single_blocks]
    return []
