"""Joint attention on UNets (SD1.x, SD2.x, SDXL): an ``attn1`` replacement on every block with
image self-attention, through ComfyUI's own ``set_model_attn1_replace``.

How it plugs into ComfyUI: docs/algorithms.md, section 'Kernels and ComfyUI integration'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from comfy.ldm.modules.attention import SpatialTransformer, SpatialVideoTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..pure.joint_attention import (
    AttentionKernel,
    AttentionKernels,
    JointAttentionSettings,
    active_call,
    joint_attention,
    with_subject_masks,
)
from .joint_kernels import comfy_attention, joint_attention_kernel


class JointUnetAttention:
    """A self-attention replacement (ComfyUI ``attn1_replace`` signature) doing joint attention.

    ``patch(q, k, v, extra_options) -> out`` with projected ``[B, T, H * D]`` tensors. Reads
    ``n_heads``, ``activations_shape`` (the token grid of subject masks), ``attn_precision`` and
    what ``active_call`` reads from ``extra_options``.

    Args:
        settings: the Joint Attention node's settings.
        kernel: the plain attention kernel, ``kernel(q, k, v, heads, extra_options)``.
        previous: an attention replacement that was already on this block; it keeps computing
            the plain attention (references, and everything while the patch is inactive), so
            patches compose instead of replacing each other.
        joint_kernel: kernel for the targets' attention over own + reference tokens.
    """

    def __init__(
        self,
        settings: JointAttentionSettings,
        *,
        kernel: AttentionKernel = comfy_attention,
        previous: Callable | None = None,
        joint_kernel: AttentionKernel = joint_attention_kernel,
    ):
        self.settings = settings
        self.kernel = kernel
        self.previous = previous
        self.joint_kernel = joint_kernel

    def plain(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return self.kernel(q, k, v, extra_options["n_heads"], extra_options)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        call = active_call(self.settings, q.shape[0], extra_options)
        if call is None:
            return self.plain(q, k, v, extra_options)
        shape = extra_options.get("activations_shape")
        grid = None if shape is None or shape[-2] * shape[-1] != k.shape[1] else (shape[-2], shape[-1])
        heads = extra_options["n_heads"]
        kernels = AttentionKernels(
            heads=heads,
            attention=lambda q_, k_, v_: self.kernel(q_, k_, v_, heads, extra_options),
            joint=lambda q_, k_, v_: self.joint_kernel(q_, k_, v_, heads, extra_options),
            upcast=extra_options.get("attn_precision") == torch.float32,
        )
        plain = self.plain(q, k, v, extra_options) if self.previous is not None else None
        call = with_subject_masks(call, extra_options, grid)
        return joint_attention(q, k, v, call=call, kernels=kernels, plain=plain)


def has_image_self_attention(block) -> bool:
    """Whether a UNet block holds a (non-video) ``SpatialTransformer``."""
    image = [layer for layer in block if not isinstance(layer, SpatialVideoTransformer)]
    return any(isinstance(layer, SpatialTransformer) for layer in image)


def unet_attention_blocks(diffusion_model: torch.nn.Module) -> list[tuple[str, int]]:
    """``(block name, index)`` of every UNet block with image self-attention (the keys of ComfyUI's
    ``attn1`` replacements); empty for other models."""
    if not isinstance(diffusion_model, UNetModel):
        return []
    middle = [diffusion_model.middle_block] if diffusion_model.middle_block is not None else []
    groups = (("input", diffusion_model.input_blocks), ("middle", middle), ("output", diffusion_model.output_blocks))
    found = []
    for name, blocks in groups:
        found += [(name, index) for index, block in enumerate(blocks) if has_image_self_attention(block)]
    return found


def attn1_replacements(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})


def unet_joint_patches(model) -> list[JointUnetAttention]:
    """The Joint Attention patches on ``model``'s UNet blocks (empty when it has none)."""
    return [patch for patch in attn1_replacements(model).values() if isinstance(patch, JointUnetAttention)]


def apply_unet_joint_attention(model, settings: JointAttentionSettings, blocks: list[tuple[str, int]]):
    """A clone of ``model`` with the joint attention patch on the UNet ``blocks`` (from
    ``unet_attention_blocks``) whose name is in ``settings.blocks``.

    An ``attn1`` replacement already on a block (from another node) becomes the patch's
    ``previous`` and keeps computing the plain attention; an earlier Joint Attention is
    replaced (its own ``previous`` is kept)."""
    patched = model.clone()
    existing = attn1_replacements(model)

    def wrap(previous):
        if isinstance(previous, JointUnetAttention):
            previous = previous.previous
        return JointUnetAttention(settings, previous=previous)

    for name, index in blocks:
        if name not in settings.blocks:
            continue
        patched.set_model_attn1_replace(wrap(existing.get((name, index))), name, index)
        for key, previous in existing.items():  # per-transformer replacements take precedence in ComfyUI
            if len(key) == 3 and (key[0], key[1]) == (name, index):
                patched.set_model_attn1_replace(wrap(previous), name, index, key[2])
    return patched
