"""Where joint attention hooks into a DiT: its blocks by ``patches_replace["dit"]`` key, from
the family's description (``families.ModelFamily.joint_blocks``)."""

from __future__ import annotations

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..pure.joint_attention import BLOCK_NAMES
from .families import FAMILIES, named_family

_JOINT_NAMES = tuple(family.name for family in FAMILIES if family.joint_blocks)
DIT_FAMILIES = ", ".join(_JOINT_NAMES[:-1]) + " and " + _JOINT_NAMES[-1]


def is_dit(model) -> bool:
    """Whether ``model`` (a ModelPatcher) is a transformer (DiT) rather than a UNet."""
    return not isinstance(model.get_model_object("diffusion_model"), UNetModel)


def dit_blocks(model) -> list[tuple[tuple[str, int], str]]:
    """``(patches_replace["dit"] key, block name)`` of every block of a DiT joint attention
    supports (empty for other models). Names split the blocks in depth order into thirds:
    ``input``, ``middle``, ``output``, so the Joint Attention block switches mean early, middle
    and late layers."""
    family = named_family(model.model)
    diffusion_model = model.get_model_object("diffusion_model")
    keys = [
        (key, index)
        for blocks, key in (family.joint_blocks if family else ())
        for index in range(len(getattr(diffusion_model, blocks)))
    ]
    return [(key, BLOCK_NAMES[min(2, 3 * depth // len(keys))]) for depth, key in enumerate(keys)]
