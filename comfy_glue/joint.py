"""JeDi joint-image sampling on ComfyUI: installing joint attention (the UNet patch in
``joint_unet.py``, the DiT one in ``joint_dit.py``), image guidance, and sampling the joint batch
with ComfyUI's own ``comfy.sample.sample`` (a per-image noise mask), so every sampler, scheduler
and other patch behaves as in KSampler.

How it plugs into ComfyUI: docs/algorithms.md, section 'Joint-image sampling (JeDi)'.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..pure.errors import InputError
from ..pure.images import maps_to_grid
from ..pure.joint_attention import LAYOUT_KEY, JointAttentionSettings, check_strength, joint_layout
from ..pure.joint_sampling import image_guided_pair, joint_batch, with_clean_references
from .dit import DIT_FAMILIES, dit_blocks, is_dit
from .families import latent_downscale, named_family
from .joint_dit import apply_dit_joint_attention, dit_joint_settings
from .joint_unet import apply_unet_joint_attention, unet_attention_blocks, unet_joint_patches

SUPPORTED_FAMILIES = (
    "SD1.x, SD2.x and SDXL checkpoints (and other UNet models built from SpatialTransformer self-attention "
    "blocks), " + DIT_FAMILIES + " diffusion models"
)


def self_attention_blocks(model) -> list:
    """The blocks joint attention can patch: a UNet's ``unet_attention_blocks`` or a DiT's
    ``dit_blocks``. Raises ``InputError`` for other models."""
    diffusion_model = model.get_model_object("diffusion_model")
    found = dit_blocks(model) if is_dit(model) else unet_attention_blocks(diffusion_model)
    if not found:
        raise InputError(
            f"this MODEL ({type(model.model).__name__}) has no self-attention blocks that joint attention "
            f"can patch. Supported: {SUPPORTED_FAMILIES}. Load one of those (Load Checkpoint, or Load "
            "Diffusion Model for the DiTs)."
        )
    return found


def joint_settings(model) -> JointAttentionSettings | None:
    """The settings of the Joint Attention on ``model``, or None when it went through none."""
    if is_dit(model):
        return dit_joint_settings(model)
    patches = unet_joint_patches(model)
    return patches[0].settings if patches else None


def has_joint_attention(model) -> bool:
    """Whether the MODEL went through the Joint Attention node (its patch is on)."""
    return joint_settings(model) is not None


def apply_joint_attention(model, settings: JointAttentionSettings):
    """A clone of ``model`` with joint attention on the blocks ``settings`` chooses: a UNet's
    ``attn1`` replacements (``apply_unet_joint_attention``) or a DiT's block replacements
    (``apply_dit_joint_attention``). Other nodes' replacements are kept; an earlier Joint
    Attention is replaced."""
    blocks = self_attention_blocks(model)
    if is_dit(model):
        family = named_family(model.model)
        return apply_dit_joint_attention(model, settings, blocks, by_attention=family.joint_by_attention)
    return apply_unet_joint_attention(model, settings, blocks)


@dataclass(frozen=True, kw_only=True)
class JointSamplerSettings:
    """What the Joint Sampler samples: KSampler's settings and the joint ones.

    Attributes:
        new_images: how many new images (at least 1).
        size: ``(height, width)`` of the new images in pixels.
        seed, steps, cfg, sampler_name, scheduler: as in KSampler.
        image_guidance: image guidance s (1 = plain joint sampling; see ``ImageGuidance``).
        strength: joint attention strength, multiplied by a Joint Attention node's on the model.
        reference_timestep: ``"noised"`` (the references noised with the new images) or
            ``"clean"`` (``CleanReferences``); see ``REFERENCE_TIMESTEPS``.
    """

    new_images: int
    size: tuple[int, int]
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    image_guidance: float = 1.0
    strength: float = 1.0
    reference_timestep: str = "noised"


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


def clean_sigma(model_sampling) -> float:
    """The sigma of timestep 0: 0 on flow models, the smallest trained sigma on eps and v models
    (EDM's timestep 0 is sigma 1, so the smaller of the two)."""
    return min(float(model_sampling.sigma(torch.tensor(0.0))), float(model_sampling.sigma_min))


class CleanReferences:
    """``APPLY_MODEL`` wrapper of the ``clean`` reference timestep: in every model call the
    references' rows are the clean reference latents at timestep 0 (``with_clean_references``),
    so they are modulated as clean images while the new images are denoised beside them. Batch
    models modulate each row by its own timestep, so no family needs more.

    Args:
        reference_latents: ``[R, C, ...]`` the references in the model's latent space
            (``process_latent_in``, as the sampler holds its latents).
        sigma: ``clean_sigma`` of the model.
    """

    KEY = "prefp_clean_references"

    def __init__(self, reference_latents: torch.Tensor, sigma: float):
        self.reference_latents, self.sigma = reference_latents, sigma

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        chunks = max(1, len((transformer_options or {}).get("cond_or_uncond") or [0]))
        x, t = with_clean_references(x, t, self.reference_latents, chunks, self.sigma)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def joint_strength(existing: JointAttentionSettings | None, strength: float) -> float:
    """The sampler's ``strength`` times that of a Joint Attention node before it (``existing``),
    checked against the node's mode (``InputError`` when out of range)."""
    mode = "joint" if existing is None else existing.mode
    if existing is not None:  # a Joint Attention node before the sampler: both strengths count
        strength = strength * existing.strength
    try:
        check_strength(mode, strength)
    except InputError as error:
        raise InputError(
            f"{error} (the mode is set on the Joint Attention node; with one, the strength is the "
            "product of both nodes' strengths)."
        ) from error
    return strength


def sample_joint(
    model,
    positive,
    negative,
    *,
    settings: JointSamplerSettings,
    encode=None,
    references: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``settings.new_images`` of ``settings.size`` in one joint batch with ``references``.

    Args:
        model: the MODEL; a Joint Attention patch on it sets the mode and multiplies the strength.
        settings: the sampler's settings.
        encode: the VAE's ``encode``, for ``references`` ``[R, H, W, 3]`` already fitted to the size.
        masks: subject masks ``[R, H, W]`` at image size (one per reference), or None.

    Returns:
        ``(new latents [N, C, h, w], the whole sampled batch, references first)``. Without
        references this is KSampler with the same seed.

    Raises:
        InputError: a strength outside the mode's range, a VAE of another latent family.
    """
    existing = joint_settings(model)
    strength = joint_strength(existing, settings.strength)
    height, width = settings.size
    ratio = latent_downscale(model.model)
    empty = torch.zeros([settings.new_images, 4, height // ratio, width // ratio])
    targets = comfy.sample.fix_empty_latent_channels(model, empty)
    target_noise = comfy.sample.prepare_noise(targets, settings.seed)
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
        reference_noise = comfy.sample.prepare_noise(reference_latents, (settings.seed + 1) % 2**64)
        latent, noise, mask = joint_batch(reference_latents, target_noise, reference_noise)
        if masks is not None:
            masks = maps_to_grid(masks, tuple(latent.shape[-2:])).contiguous()
        if strength != 0 and existing is None:
            patched = apply_joint_attention(patched, JointAttentionSettings(strength=strength))
        patched.model_options["transformer_options"][LAYOUT_KEY] = joint_layout(count, strength, masks)
        if settings.reference_timestep == "clean":
            sigma = clean_sigma(model.get_model_object("model_sampling"))
            clean = CleanReferences(model.model.process_latent_in(reference_latents), sigma)
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CleanReferences.KEY, clean)
        if settings.image_guidance != 1.0 and strength != 0:
            previous = patched.model_options.get("sampler_calc_cond_batch_function")
            guidance = ImageGuidance(settings.image_guidance, previous)
            patched.model_options["sampler_calc_cond_batch_function"] = guidance

    preview = latent_preview.prepare_callback(patched, settings.steps)

    def callback(step, x0, x, total_steps):  # previews show the first new image, not a reference
        preview(step, x0[count:], x[count:], total_steps)

    samples = comfy.sample.sample(
        patched,
        noise,
        settings.steps,
        settings.cfg,
        settings.sampler_name,
        settings.scheduler,
        positive,
        negative,
        latent,
        denoise=1.0,
        noise_mask=mask,
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=settings.seed,
    )
    return samples[count:], samples
