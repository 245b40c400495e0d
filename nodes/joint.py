"""JeDi joint-image sampling nodes: Joint Attention (a MODEL patch) and Joint Sampler.

The algorithms live in ``personalize/joint_attention.py`` (the attention patch and the batch
layout contract) and ``personalize/joint_sampling.py`` (the joint batch, image guidance);
these nodes translate ComfyUI types and hooks to them:

- the attention patch is registered with ``set_model_attn1_replace`` on a clone of the MODEL,
  one per UNet block that has self-attention; a replacement already on that block is kept
  and called for the plain attention (compose, not replace); ``attn1_patch`` patches run
  before it as usual;
- the Joint Sampler writes the batch layout into ``transformer_options`` and samples with
  ComfyUI's own machinery (``comfy.sample.sample`` with a per-image noise mask, so every
  ComfyUI sampler and scheduler, LoRAs, other patches, previews, the progress bar,
  interruption and memory management behave as in KSampler);
- image guidance is a ``sampler_calc_cond_batch_function`` (composing with one already set).
"""
from __future__ import annotations

import logging

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy.ldm.modules.attention import (SpatialTransformer, SpatialVideoTransformer, attention_basic,
                                        attention_split, attention_sub_quad, optimized_attention)
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy_api.latest import io

from ..personalize.images import fit_to_size, maps_to_grid
from ..personalize.joint_attention import (BLOCK_NAMES, LAYOUT_KEY, MODES, JointAttentionPatch,
                                           JointAttentionSettings, check_strength, joint_layout, sdpa_kernel)
from ..personalize.joint_sampling import image_guided_pair, joint_batch
from .inputs import image_input_fitted, optional_mask
from .types import CATEGORY

ATTENTION_NODE = "Joint Attention"
SAMPLER_NODE = "Joint Sampler"
SUPPORTED_FAMILIES = ("SD1.x, SD2.x and SDXL checkpoints (and other UNet models built from SpatialTransformer "
                      "self-attention blocks)")


def comfy_attention(q, k, v, heads, extra_options):
    """ComfyUI's own attention kernel (xformers, SDPA, sage, ... as the user chose)."""
    return optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


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


def self_attention_blocks(model, node: str) -> list[tuple[str, int]]:
    """``(block name, index)`` of every UNet block with image self-attention, the keys of
    ComfyUI's ``attn1`` replacements. Raises a node-named ``ValueError`` for other models."""
    unet = model.get_model_object("diffusion_model")
    found = []
    if isinstance(unet, UNetModel):
        middle = [unet.middle_block] if unet.middle_block is not None else []
        for name, blocks in (("input", unet.input_blocks), ("middle", middle), ("output", unet.output_blocks)):
            for index, block in enumerate(blocks):
                if any(isinstance(layer, SpatialTransformer) and not isinstance(layer, SpatialVideoTransformer)
                       for layer in block):
                    found.append((name, index))
    if not found:
        raise ValueError(
            f"{node}: this MODEL ({type(model.model).__name__}) has no UNet self-attention blocks that joint "
            f"attention can patch. Supported: {SUPPORTED_FAMILIES}. Load one of those with Load Checkpoint.")
    return found


def attn1_replacements(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})


def joint_patches(model) -> list[JointAttentionPatch]:
    return [patch for patch in attn1_replacements(model).values() if isinstance(patch, JointAttentionPatch)]


def apply_joint_attention(model, settings: JointAttentionSettings, node: str):
    """A clone of ``model`` with the joint attention patch on the selected blocks.

    An ``attn1`` replacement already on a block (from another node) becomes the patch's
    ``previous`` and keeps computing the plain attention; an earlier Joint Attention is
    replaced (its own ``previous`` is kept)."""
    blocks = [key for key in self_attention_blocks(model, node) if key[0] in settings.blocks]
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


class JointAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_JointAttention",
            display_name=ATTENTION_NODE,
            category=CATEGORY,
            description=(
                "JeDi-style joint attention (training-free): in every chosen self-attention layer the images "
                "being generated also attend to the reference images of the same batch. The references are "
                "the first `reference_count` images of each batch (with the Joint Sampler: its reference "
                "photos; the two nodes' strengths multiply). Works with KSampler, SamplerCustomAdvanced and every "
                "ComfyUI sampler on SD1.x/SD2.x/SDXL; strength 0 = off."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned, never changed)."),
                io.Float.Input("strength", default=1.0, min=-1.0, max=3.0, step=0.05,
                               tooltip="0 = off. joint mode: weight of the reference tokens (1 = plain joint "
                                       "attention, >1 follows the references more). blend mode: RefDrop mix "
                                       "c in [-1, 1] (negative pushes away from the references)."),
                io.Combo.Input("mode", options=list(MODES), default="joint",
                               tooltip="joint: one softmax over own + reference tokens, reference logits "
                                       "shifted by log(strength). blend (RefDrop): (1-c)*own attention + "
                                       "c*attention to the references."),
                io.Int.Input("reference_count", default=1, min=1, max=64,
                             tooltip="How many images at the start of each batch are references when a stock "
                                     "sampler is used (StyleAligned-style: the first image leads the others). "
                                     "The Joint Sampler sets this itself."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which joint attention starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which joint attention stops (1 = last step)."),
                io.Boolean.Input("input_blocks", default=True,
                                 tooltip="Patch the self-attention of the UNet's input (down) blocks."),
                io.Boolean.Input("middle_block", default=True,
                                 tooltip="Patch the self-attention of the UNet's middle block."),
                io.Boolean.Input("output_blocks", default=True,
                                 tooltip="Patch the self-attention of the UNet's output (up) blocks."),
                io.Boolean.Input("adain", default=False,
                                 tooltip="StyleAligned AdaIN: match the targets' queries and keys to the "
                                         "references' mean and std before attending."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with joint attention.")],
        )

    @classmethod
    def execute(cls, model, strength, mode, reference_count, start_percent, end_percent, input_blocks,
                middle_block, output_blocks, adain) -> io.NodeOutput:
        try:
            check_strength(mode, strength)
        except ValueError as error:
            raise ValueError(f"{ATTENTION_NODE}: {error}.") from error
        if start_percent > end_percent:
            raise ValueError(f"{ATTENTION_NODE}: start_percent {start_percent} is after end_percent {end_percent}; "
                             "swap them.")
        chosen = [name for name, on in zip(BLOCK_NAMES, (input_blocks, middle_block, output_blocks)) if on]
        if not chosen:
            raise ValueError(f"{ATTENTION_NODE}: no blocks chosen; switch on input_blocks, middle_block or "
                             "output_blocks.")
        sampling = model.get_model_object("model_sampling")
        settings = JointAttentionSettings(
            strength=strength, mode=mode,
            sigma_start=float(sampling.percent_to_sigma(start_percent)),
            sigma_end=float(sampling.percent_to_sigma(end_percent)),
            blocks=frozenset(chosen), adain_queries=adain, adain_keys=adain, reference_count=reference_count)
        return io.NodeOutput(apply_joint_attention(model, settings, ATTENTION_NODE))


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


def prepare_references(references: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reference IMAGE -> ``[R, height, width, 3]``: RGB, centre-cropped to the output aspect
    ratio and resized to the output size."""
    return image_input_fitted(references, "references", SAMPLER_NODE, size).clamp(0, 1).movedim(1, -1)


def prepare_masks(masks: torch.Tensor, references: int, image_size: tuple[int, int],
                  latent_size: tuple[int, int]) -> torch.Tensor | None:
    """Subject MASK (one for all or one per reference) -> ``[R, h, w]`` on the latent grid, or
    None for an empty (unpainted) mask."""
    masks = optional_mask(masks, "the subject mask", SAMPLER_NODE, references, "the whole reference images are used",
                          "subject masks", "reference image(s)")
    if masks is None:
        return None
    masks = maps_to_grid(fit_to_size(masks.unsqueeze(1), image_size).squeeze(1), latent_size)
    return masks.expand(references, -1, -1).contiguous()


class JointSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_JointSampler",
            display_name=SAMPLER_NODE,
            category=CATEGORY,
            description=(
                "JeDi-style personalization without finetuning: the reference photos and the new images are "
                "denoised as one batch. Reference slots are held to the reference latent noised to the current "
                "step (like inpainting) while the new images attend to them in every self-attention layer. "
                "Put a Joint Attention node before it for blocks, schedule, mode and AdaIN. Without references "
                "it samples exactly like KSampler."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.x/SD2.x/SDXL model (LoRAs and other patches are kept)."),
                io.Conditioning.Input("positive", tooltip="Prompt for the new images (describe the subject)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Vae.Input("vae", tooltip="Encodes the references and decodes the new images."),
                io.Image.Input("references", optional=True,
                               tooltip="Photos of the subject (one or a batch). Other sizes are centre-cropped "
                                       "to the output aspect ratio and resized; grayscale/RGBA become RGB. "
                                       "Without references: a plain sampler."),
                io.Mask.Input("subject_mask", optional=True,
                              tooltip="Optional subject mask(s) for the references (one for all or one per "
                                      "reference): the new images attend only to the subject, not its "
                                      "background. Empty = whole image."),
                io.Int.Input("new_images", default=4, min=1, max=64,
                             tooltip="How many new images of the subject to generate."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Width of the new images."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Height of the new images."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed; the new images get the same noise as KSampler with this seed."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (text)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="Sampling algorithm, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="Noise schedule, as in KSampler."),
                io.Float.Input("image_guidance", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="How strongly the references pull the images: 1 = plain joint sampling; "
                                       ">1 strengthens the subject (one extra model pass per step), <1 weakens it."),
                io.Float.Input("strength", default=1.0, min=-1.0, max=3.0, step=0.05,
                               tooltip="Joint attention strength (0 = the references are ignored). With a "
                                       "Joint Attention node on the model, its strength is multiplied by this."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The new images (decoded)."),
                io.Latent.Output(display_name="latent", tooltip="Latents of the new images."),
                io.Latent.Output(display_name="joint_latent",
                                 tooltip="The whole joint batch as sampled: references first (equal to their "
                                         "encoded latents), then the new images."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, new_images, width, height, seed, steps, cfg, sampler_name,
                scheduler, image_guidance, strength, references=None, subject_mask=None) -> io.NodeOutput:
        self_attention_blocks(model, SAMPLER_NODE)  # raises for models without supported attention
        if new_images < 1:
            raise ValueError(f"{SAMPLER_NODE}: new_images is {new_images}; set it to at least 1.")
        existing = joint_patches(model)
        mode = existing[0].settings.mode if existing else "joint"
        if existing:  # a Joint Attention node before the sampler: both strengths count
            strength = strength * existing[0].settings.strength
        try:
            check_strength(mode, strength)
        except ValueError as error:
            raise ValueError(f"{SAMPLER_NODE}: {error} (the mode is set on the Joint Attention node; with one, "
                             "the strength is the product of both nodes' strengths).") from error

        targets = comfy.sample.fix_empty_latent_channels(model, torch.zeros([new_images, 4, height // 8, width // 8]))
        target_noise = comfy.sample.prepare_noise(targets, seed)
        patched = model.clone()
        if references is None:
            logging.info("%s: no references connected; sampling like KSampler.", SAMPLER_NODE)
            patched.model_options["transformer_options"][LAYOUT_KEY] = joint_layout(0)
            latent, noise, mask, count = targets, target_noise, None, 0
        else:
            images = prepare_references(references, (height, width))
            reference_latents = vae.encode(images)
            if reference_latents.shape[1:] != targets.shape[1:]:
                raise ValueError(f"{SAMPLER_NODE}: the VAE makes latents of shape {tuple(reference_latents.shape[1:])}"
                                 f" but the model samples {tuple(targets.shape[1:])}; use the VAE that belongs to "
                                 "the checkpoint.")
            count = reference_latents.shape[0]
            reference_noise = comfy.sample.prepare_noise(reference_latents, (seed + 1) % 2 ** 64)
            latent, noise, mask = joint_batch(reference_latents, target_noise, reference_noise)
            masks = None
            if subject_mask is not None:
                masks = prepare_masks(subject_mask, count, (height, width), tuple(latent.shape[-2:]))
            if strength != 0 and not existing:
                patched = apply_joint_attention(patched, JointAttentionSettings(strength=strength), SAMPLER_NODE)
            patched.model_options["transformer_options"][LAYOUT_KEY] = joint_layout(count, strength, masks)
            if image_guidance != 1.0 and strength != 0:
                previous = patched.model_options.get("sampler_calc_cond_batch_function")
                patched.model_options["sampler_calc_cond_batch_function"] = ImageGuidance(image_guidance, previous)

        preview = latent_preview.prepare_callback(patched, steps)

        def callback(step, x0, x, total_steps):  # previews show the first new image, not a reference
            preview(step, x0[count:], x[count:], total_steps)

        samples = comfy.sample.sample(
            patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
            noise_mask=mask, callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        generated = samples[count:]
        decoded = vae.decode(generated)
        if decoded.ndim == 5:
            decoded = decoded.reshape(-1, *decoded.shape[-3:])
        return io.NodeOutput(decoded, {"samples": generated}, {"samples": samples})
