"""JeDi joint-image sampling on ComfyUI: installing the joint attention patch, the attention
kernels, image guidance, and sampling the joint batch with ComfyUI's own ``comfy.sample.sample``
(a per-image noise mask), so every sampler, scheduler and other patch behaves as in KSampler.

How it plugs into ComfyUI: docs/algorithms.md, section 'Joint-image sampling (JeDi)'.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy.ldm.modules.attention import (
    SpatialTransformer,
    SpatialVideoTransformer,
    attention_basic,
    attention_split,
    attention_sub_quad,
    optimized_attention,
)
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..pure.errors import InputError
from ..pure.images import maps_to_grid
from ..pure.joint_attention import (
    LAYOUT_KEY,
    JointAttentionPatch,
    JointAttentionSettings,
    check_strength,
    joint_layout,
    sdpa_kernel,
)
from ..pure.joint_sampling import image_guided_pair, joint_batch
from .dit import DIT_FAMILIES, dit_blocks
from .joint_dit import apply_dit_joint_attention, dit_joint_blocks

SUPPORTED_FAMILIES = (
    "SD1.x, SD2.x and SDXL checkpoints (and other UNet models built from SpatialTransformer self-attention "
    "blocks), " + DIT_FAMILIES + " diffusion models"
)


def comfy_attention(q, k, v, heads, extra_options):
    """ComfyUI's own attention kernel (xformers, SDPA, sage, ... as the user chose)."""
    return optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


# ComfyUI's fallback kernels (chosen where it enables no fused one, e.g. on CPU). They are several
# times slower than PyTorch's fused SDPA there and their memory grows with the key count, which
# joint attention doubles; the targets' joint attention uses SDPA instead of them.
UNFUSED_KERNEL = optimized_attention in (attention_sub_quad, attention_split, attention_basic)


def joint_attention_kernel(q, k, v, heads, extra_options):
    """Kernel for the targets' attention over own + reference tokens: ComfyUI's own when it is a
    fused one (PyTorch SDPA, xformers, sage, flash) or overridden, PyTorch SDPA otherwise."""
    if UNFUSED_KERNEL and "optimized_attention_override" not in extra_options:
        return sdpa_kernel(q, k, v, heads, extra_options)
    return comfy_attention(q, k, v, heads, extra_options)


def self_attention_blocks(model) -> list:
    """The blocks joint attention can patch: ``(block name, index)`` of every UNet block with image
    self-attention (the keys of ComfyUI's ``attn1`` replacements), or a DiT's ``dit_blocks``.
    Raises ``InputError`` for other models."""
    unet = model.get_model_object("diffusion_model")
    found = dit_blocks(unet)
    if isinstance(unet, UNetModel):
        middle = [unet.middle_block] if unet.middle_block is not None else []
        for name, blocks in (("input", unet.input_blocks), ("middle", middle), ("output", unet.output_blocks)):
            for index, block in enumerate(blocks):
                if any(
                    isinstance(layer, SpatialTransformer) and not isinstance(layer, SpatialVideoTransformer)
                    for layer in block
                ):
                    found.append((name, index))
    if not found:
        raise InputError(
            f"this MODEL ({type(model.model).__name__}) has no self-attention blocks that joint attention "
            f"can patch. Supported: {SUPPORTED_FAMILIES}. Load one of those (Load Checkpoint, or Load "
            "Diffusion Model for Flux and SD3)."
        )
    return found


def attn1_replacements(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})


def joint_patches(model) -> list[JointAttentionPatch]:
    """The Joint Attention patches on ``model``'s blocks (empty when it has none)."""
    unet_patches = [patch for patch in attn1_replacements(model).values() if isinstance(patch, JointAttentionPatch)]
    return unet_patches + [block.patch for block in dit_joint_blocks(model)]


def has_joint_attention(model) -> bool:
    """Whether the MODEL went through the Joint Attention node (its attn1 patch is on)."""
    return bool(joint_patches(model))


def apply_joint_attention(model, settings: JointAttentionSettings):
    """A clone of ``model`` with the joint attention patch on the selected blocks.

    An ``attn1`` replacement already on a block (from another node) becomes the patch's
    ``previous`` and keeps computing the plain attention; an earlier Joint Attention is
    replaced (its own ``previous`` is kept). DiTs: ``apply_dit_joint_attention``."""
    found = self_attention_blocks(model)
    if isinstance(found[0][0], tuple):
        return apply_dit_joint_attention(model, settings, found)
    blocks = [key for key in found if key[0] in settings.blocks]
    patched = model.clone()
    existing = attn1_replacements(model)

    def wrap(previous):
        if isinstance(previous, JointAttentionPatch):
            previous = previous.previous
        return JointAttentionPatch(settings, comfy_attention, previous, joint_attention_kernel)

    for name, index in blocks:
        patched.set_model_attn1_replace(wrap(existing.get((name, index))), name, index)
        for key, previous in existing.items():  # per-transformer replacements take precedence in ComfyUI
            if len(key) == 3 and (key[0], key[1]) == (name, index):
                patched.set_model_attn1_replace(wrap(previous), name, index, key[2])
    return patched


def layout_without_references(model_options: dict) -> dict:
    """A shallow copy of ``model_options`` whose joint layout is switched off."""
    transformer_options = dict(model_options.get("transformer_options", {}))
    transformer_options[LAYOUT_KEY] = {**transformer_options.get(LAYOUT_KEY, {}), "enabled": False}
    return {**model_options, "transformer_options": transformer_options}


class ImageGuidance:
    """``sampler_calc_cond_batch_function`` for image guidance (see ``image_guided_pair``):
    the usual (cond, uncond) pass with the references, plus one pass of the unconditional (or,
    with CFG off, the conditional) branch with joint attention switched off."""

    def __init__(self, scale: float, previous=None):
        self.scale = scale
        self.previous = previous

    def calc(self, args: dict, conds: list, model_options: dict) -> list:
        if self.previous is not None:
            return self.previous({**args, "conds": conds, "model_options": model_options})
        return comfy.samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"], model_options)

    def __call__(self, args: dict) -> list:
        conds = args["conds"]
        out = self.calc(args, conds, args["model_options"])
        if len(conds) < 1 or conds[0] is None:
            return out
        uncond = conds[1] if len(conds) > 1 else None
        branch = uncond if uncond is not None else conds[0]
        (without,) = self.calc(args, [branch], layout_without_references(args["model_options"]))
        cond, guided_uncond = image_guided_pair(out[0], out[1] if uncond is not None else None, without, self.scale)
        return [cond, out[1] if guided_uncond is None else guided_uncond, *out[2:]]


def sample_joint(
    model,
    positive,
    negative,
    new_images: int,
    size: tuple[int, int],
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    image_guidance: float,
    strength: float,
    encode=None,
    references: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``new_images`` of ``size`` (height, width) in one joint batch with ``references``.

    Args:
        model: the MODEL; a Joint Attention patch on it sets the mode and multiplies ``strength``.
        encode: the VAE's ``encode``, for ``references`` ``[R, H, W, 3]`` already fitted to ``size``.
        masks: subject masks ``[R, H, W]`` at image size (one per reference), or None.

    Returns:
        ``(new latents [N, C, h, w], the whole sampled batch, references first)``. Without
        references this is KSampler with the same seed.

    Raises:
        InputError: a strength outside the mode's range, a VAE of another latent family.
    """
    existing = joint_patches(model)
    mode = existing[0].settings.mode if existing else "joint"
    if existing:  # a Joint Attention node before the sampler: both strengths count
        strength = strength * existing[0].settings.strength
    try:
        check_strength(mode, strength)
    except InputError as error:
        raise InputError(
            f"{error} (the mode is set on the Joint Attention node; with one, the strength is the "
            "product of both nodes' strengths)."
        ) from error
    height, width = size
    targets = comfy.sample.fix_empty_latent_channels(model, torch.zeros([new_images, 4, height // 8, width // 8]))
    target_noise = comfy.sample.prepare_noise(targets, seed)
    patched = model.clone()
    if references is None:
        patched.model_options["transformer_options"][LAYOUT_KEY] = joint_layout(0)
        latent, noise, mask, count = targets, target_noise, None, 0
    else:
        reference_latents = encode(references)
        if reference_latents.shape[1:] != targets.shape[1:]:
            raise InputError(
                f"the VAE makes latents of shape {tuple(reference_latents.shape[1:])} but the model "
                f"samples {tuple(targets.shape[1:])}; use the VAE that belongs to the checkpoint."
            )
        count = reference_latents.shape[0]
        reference_noise = comfy.sample.prepare_noise(reference_latents, (seed + 1) % 2**64)
        latent, noise, mask = joint_batch(reference_latents, target_noise, reference_noise)
        if masks is not None:
            masks = maps_to_grid(masks, tuple(latent.shape[-2:])).contiguous()
        if strength != 0 and not existing:
            patched = apply_joint_attention(patched, JointAttentionSettings(strength=strength))
        patched.model_options["transformer_options"][LAYOUT_KEY] = joint_layout(count, strength, masks)
        if image_guidance != 1.0 and strength != 0:
            previous = patched.model_options.get("sampler_calc_cond_batch_function")
            patched.model_options["sampler_calc_cond_batch_function"] = ImageGuidance(image_guidance, previous)

    preview = latent_preview.prepare_callback(patched, steps)

    def callback(step, x0, x, total_steps):  # previews show the first new image, not a reference
        preview(step, x0[count:], x[count:], total_steps)

    samples = comfy.sample.sample(
        patched,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent,
        denoise=1.0,
        noise_mask=mask,
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    return samples[count:], samples
