"""JeDi joint-image sampling nodes: Joint Attention (a MODEL patch) and Joint Sampler.

The attention algorithm is ``pure/joint_attention.py`` (with the batch layout contract), the
joint batch and image guidance ``pure/joint_sampling.py``; installing them on ComfyUI and
sampling is ``comfy_glue/joint.py``.
"""

from __future__ import annotations

import logging

import comfy.samplers
import torch
from comfy_api.v0_0_2 import io

from ..comfy_glue.dit import is_dit
from ..comfy_glue.joint import JointSamplerSettings, apply_joint_attention, sample_joint, self_attention_blocks
from ..pure.errors import InputError
from ..pure.images import fit_to_size
from ..pure.joint_attention import (
    BLOCK_NAMES,
    MODES,
    POSITIONS,
    JointAttentionSettings,
    check_strength,
    parse_block_list,
)
from ..pure.joint_sampling import REFERENCE_TIMESTEPS
from .errors import check_number_inputs, node_errors
from .inputs import image_input_fitted, optional_mask
from .types import CATEGORY


class JointAttention(io.ComfyNode):
    TITLE = "Joint Attention"
    ORDERED_INPUTS = (("start_percent", "end_percent"),)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_JointAttention",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "JeDi-style joint attention (training-free): in every chosen self-attention layer the images "
                "being generated also attend to the reference images of the same batch. The references are "
                "the first `reference_count` images of each batch (with the Joint Sampler: its reference "
                "photos; the two nodes' strengths multiply). Works with KSampler, SamplerCustomAdvanced and every "
                "ComfyUI sampler on SD1.x/SD2.x/SDXL and on Flux.1 and .2, Chroma, Qwen-Image, Z-Image and "
                "SD3/SD3.5 (there only the images' tokens attend to the references' image tokens; text tokens "
                "are unchanged); strength 0 = off."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned, never changed)."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-1.0,
                    max=3.0,
                    step=0.05,
                    tooltip="0 = off. joint mode: weight of the reference tokens (1 = plain joint "
                    "attention, >1 follows the references more). blend mode: RefDrop mix "
                    "c in [-1, 1] (negative pushes away from the references).",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default="joint",
                    tooltip="joint: one softmax over own + reference tokens, reference logits "
                    "shifted by log(strength). blend (RefDrop): (1-c)*own attention + "
                    "c*attention to the references.",
                ),
                io.Int.Input(
                    "reference_count",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="How many images at the start of each batch are references when a stock "
                    "sampler is used (StyleAligned-style: the first image leads the others). "
                    "The Joint Sampler sets this itself.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress at which joint attention starts (0 = first step).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress at which joint attention stops (1 = last step).",
                ),
                io.Boolean.Input(
                    "input_blocks",
                    default=True,
                    tooltip="Patch the self-attention of the UNet's input (down) blocks; on a DiT, its first "
                    "third of blocks.",
                ),
                io.Boolean.Input(
                    "middle_block",
                    default=True,
                    tooltip="Patch the self-attention of the UNet's middle block; on a DiT, its middle third.",
                ),
                io.Boolean.Input(
                    "output_blocks",
                    default=True,
                    tooltip="Patch the self-attention of the UNet's output (up) blocks; on a DiT, its last third.",
                ),
                io.Boolean.Input(
                    "adain",
                    default=False,
                    tooltip="StyleAligned AdaIN: match the targets' queries and keys to the "
                    "references' mean and std before attending.",
                ),
                io.Combo.Input(
                    "reference_positions",
                    options=list(POSITIONS),
                    default="offset",
                    optional=True,
                    tooltip="RoPE DiTs (Flux.1 and .2, Chroma, Qwen-Image, Z-Image) only. offset: the "
                    "references' tokens sit at positions of their own (as Flux Kontext places reference "
                    "images), so the new images take the subject, not the references' layout. shared: on the "
                    "new images' own positions (the layout is copied more). UNets and SD3 have no RoPE and "
                    "ignore this.",
                ),
                io.Float.Input(
                    "reference_key_scale",
                    default=1.0,
                    min=0.5,
                    max=2.0,
                    step=0.05,
                    optional=True,
                    tooltip="Multiplies the reference keys the new images attend to: above 1 they attend to the "
                    "references more sharply (FreeCus uses 1.1, Diptych Prompting 1.3); 1 = unchanged.",
                ),
                io.String.Input(
                    "block_list",
                    default="",
                    optional=True,
                    tooltip="DiTs only: the blocks to patch, as indices in depth order and ranges, e.g. "
                    "'0-9, 20'; empty = the input/middle/output switches decide.",
                ),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with joint attention.")],
        )

    @classmethod
    def execute(
        cls,
        model,
        strength,
        mode,
        reference_count,
        start_percent,
        end_percent,
        input_blocks,
        middle_block,
        output_blocks,
        adain,
        reference_positions="offset",
        reference_key_scale=1.0,
        block_list="",
    ) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            check_number_inputs(cls, locals())
            try:
                check_strength(mode, strength)
            except InputError as error:
                raise InputError(f"{error}.") from error
            chosen = [
                name for name, on in zip(BLOCK_NAMES, (input_blocks, middle_block, output_blocks), strict=True) if on
            ]
            if not chosen:
                raise InputError("no blocks chosen; switch on input_blocks, middle_block or output_blocks.")
            block_indices = chosen_block_indices(model, block_list)
            sampling = model.get_model_object("model_sampling")
            settings = JointAttentionSettings(
                strength=strength,
                mode=mode,
                sigma_start=float(sampling.percent_to_sigma(start_percent)),
                sigma_end=float(sampling.percent_to_sigma(end_percent)),
                blocks=frozenset(chosen),
                adain_queries=adain,
                adain_keys=adain,
                reference_count=reference_count,
                positions=reference_positions,
                reference_key_scale=reference_key_scale,
                block_indices=block_indices,
            )
            return io.NodeOutput(apply_joint_attention(model, settings))


def chosen_block_indices(model, block_list: str) -> frozenset[int] | None:
    """The Joint Attention node's ``block_list`` for ``model``: None when empty; ``InputError`` on a
    UNet (its blocks are chosen by the switches) or for indices past the DiT's last block."""
    indices = parse_block_list(block_list)
    if indices is None:
        return None
    if not is_dit(model):
        raise InputError(
            "block_list picks a DiT's blocks; on a UNet choose them with input_blocks, "
            "middle_block and output_blocks, and leave block_list empty."
        )
    count = len(self_attention_blocks(model))
    if max(indices) >= count:
        raise InputError(f"block_list names block {max(indices)}, but this model has {count} blocks (0-{count - 1}).")
    return indices


def prepare_references(references: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reference IMAGE -> ``[R, height, width, 3]``: RGB, centre-cropped to the output aspect
    ratio and resized to the output size."""
    return image_input_fitted(references, "references", JointSampler.TITLE, size).clamp(0, 1).movedim(1, -1)


def prepare_masks(masks: torch.Tensor, references: int, image_size: tuple[int, int]) -> torch.Tensor | None:
    """Subject MASK (one for all or one per reference) -> ``[R, height, width]``, cropped and
    resized like the references, or None for an empty (unpainted) mask."""
    masks = optional_mask(
        masks,
        "the subject mask",
        JointSampler.TITLE,
        references,
        "the whole reference images are used",
        "subject masks",
        "reference image(s)",
    )
    if masks is None:
        return None
    return fit_to_size(masks.unsqueeze(1), image_size).squeeze(1).expand(references, -1, -1)


class JointSampler(io.ComfyNode):
    TITLE = "Joint Sampler"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_JointSampler",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "JeDi-style personalization without finetuning: the reference photos and the new images are "
                "denoised as one batch. Reference slots are held to the reference latent noised to the current "
                "step (like inpainting) while the new images attend to them in every self-attention layer. "
                "Put a Joint Attention node before it for blocks, schedule, mode and AdaIN. Without references "
                "it samples exactly like KSampler."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="SD1.x/SD2.x/SDXL, Flux.1 or .2, Chroma, Qwen-Image, Z-Image or SD3/SD3.5 model (LoRAs and "
                    "other patches are kept).",
                ),
                io.Conditioning.Input("positive", tooltip="Prompt for the new images (describe the subject)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Vae.Input("vae", tooltip="Encodes the references and decodes the new images."),
                io.Image.Input(
                    "references",
                    optional=True,
                    tooltip="Photos of the subject (one or a batch). Other sizes are centre-cropped "
                    "to the output aspect ratio and resized; grayscale/RGBA become RGB. "
                    "Without references: a plain sampler.",
                ),
                io.Mask.Input(
                    "subject_mask",
                    optional=True,
                    tooltip="Optional subject mask(s) for the references (one for all or one per "
                    "reference): the new images attend only to the subject, not its "
                    "background. Empty = whole image.",
                ),
                io.Int.Input(
                    "new_images", default=4, min=1, max=64, tooltip="How many new images of the subject to generate."
                ),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Width of the new images."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Height of the new images."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed; the new images get the same noise as KSampler with this seed.",
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input(
                    "cfg",
                    default=7.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale (text).",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.SAMPLER_NAMES,
                    default="euler",
                    tooltip="Sampling algorithm, as in KSampler.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.SCHEDULER_NAMES,
                    default="normal",
                    tooltip="Noise schedule, as in KSampler.",
                ),
                io.Float.Input(
                    "image_guidance",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    tooltip="How strongly the references pull the images: 1 = plain joint sampling; "
                    ">1 strengthens the subject (one extra model pass per step), <1 weakens it.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-1.0,
                    max=3.0,
                    step=0.05,
                    tooltip="Joint attention strength (0 = the references are ignored). With a "
                    "Joint Attention node on the model, its strength is multiplied by this.",
                ),
                io.Combo.Input(
                    "reference_timestep",
                    options=list(REFERENCE_TIMESTEPS),
                    default="noised",
                    optional=True,
                    tooltip="noised: the references are noised to the new images' step at every step (JeDi); "
                    "clean: they stay clean at timestep 0, so the new images see the sharp subject from the "
                    "first step (as core's index_timestep_zero references on edit models).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The new images (decoded)."),
                io.Latent.Output(display_name="latent", tooltip="Latents of the new images."),
                io.Latent.Output(
                    display_name="joint_latent",
                    tooltip="The whole joint batch as sampled: references first (equal to their "
                    "encoded latents), then the new images.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        vae,
        new_images,
        width,
        height,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        image_guidance,
        strength,
        references=None,
        subject_mask=None,
        reference_timestep="noised",
    ) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            check_number_inputs(cls, locals())
            self_attention_blocks(model)  # raises for models without supported attention
            if new_images < 1:
                raise InputError(f"new_images is {new_images}; set it to at least 1.")
            size = (height, width)
            images = masks = None
            if references is None:
                logging.info("%s: no references connected; sampling like KSampler.", cls.TITLE)
            else:
                images = prepare_references(references, size)
                if subject_mask is not None:
                    masks = prepare_masks(subject_mask, images.shape[0], size)
            settings = JointSamplerSettings(
                new_images=new_images,
                size=size,
                seed=seed,
                steps=steps,
                cfg=cfg,
                sampler_name=sampler_name,
                scheduler=scheduler,
                image_guidance=image_guidance,
                strength=strength,
                reference_timestep=reference_timestep,
            )
            generated, samples = sample_joint(
                model, positive, negative, settings=settings, encode=vae.encode, references=images, masks=masks
            )
        decoded = vae.decode(generated)
        if decoded.ndim == 5:
            decoded = decoded.reshape(-1, *decoded.shape[-3:])
        return io.NodeOutput(decoded, {"samples": generated}, {"samples": samples})
