"""The joint batch of JeDi-style sampling: references and new images denoised as one set.

``[reference_1 .. reference_R, target_1 .. target_N]`` along the batch; the reference slots are
inpainted (denoise mask 0, reset to the reference noised to the current sigma every step), so
they end as the references. Image guidance (ours, InstructPix2Pix-style, one extra pass):
``e = e(-, none) + s * (e(-, refs) - e(-, none)) + cfg * (e(text, refs) - e(-, refs))``.

Formulas and choices: docs/algorithms.md, section 'Joint-image sampling (JeDi)'.
"""

from __future__ import annotations

import torch

from .errors import InputError

# How the references enter each model call (the Joint Sampler's ``reference_timestep``): noised
# to the new images' sigma (JeDi), or clean at timestep 0 (``with_clean_references``).
REFERENCE_TIMESTEPS = ("noised", "clean")


def joint_batch(
    reference_latents: torch.Tensor, target_noise: torch.Tensor, reference_noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent, noise and denoise mask of a joint batch, references first.

    Args:
        reference_latents: ``[R, C, h, w]`` encoded references.
        target_noise: ``[N, C, h, w]`` noise of the new images (N >= 1).
        reference_noise: ``[R, C, h, w]`` noise the references are noised with at every step.

    Returns:
        ``latent [R + N, C, h, w]`` (references, then zeros), ``noise [R + N, C, h, w]`` and
        ``denoise_mask [R + N, 1, h, w]`` (0 = keep the reference, 1 = generate).
    """
    if target_noise.shape[0] < 1:
        raise InputError("no new images to generate; ask for at least 1")
    if reference_latents.shape[1:] != target_noise.shape[1:] or reference_noise.shape != reference_latents.shape:
        raise InputError(
            f"references {tuple(reference_latents.shape)} and targets {tuple(target_noise.shape)} "
            "must share channels and latent size"
        )
    references, targets = reference_latents.shape[0], target_noise.shape[0]
    latent = torch.cat([reference_latents, torch.zeros_like(target_noise)])
    noise = torch.cat([reference_noise.to(target_noise.dtype), target_noise])
    mask = torch.cat([torch.zeros(references, 1, *latent.shape[2:]), torch.ones(targets, 1, *latent.shape[2:])])
    return latent, noise, mask


def with_clean_references(
    x: torch.Tensor, sigma: torch.Tensor, reference_latents: torch.Tensor, chunks: int, clean_sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One model call's input with every chunk's reference rows clean at timestep 0.

    Args:
        x: ``[chunks * (R + N), C, ...]`` the call's latents, references first in each chunk.
        sigma: ``[chunks * (R + N)]`` the call's sigmas.
        reference_latents: ``[R, C, ...]`` the clean references, in the model's latent space.
        chunks: cond/uncond chunks in the batch.
        clean_sigma: the sigma of timestep 0 (``model_sampling.sigma(0)``).

    Returns:
        Copies of ``x`` and ``sigma`` with each chunk's first R rows set to ``reference_latents``
        and ``clean_sigma``; unchanged where a chunk has no room for a target.
    """
    references = reference_latents.shape[0]
    if x.shape[0] % chunks or x.shape[0] // chunks <= references:
        return x, sigma
    x, sigma = x.clone(), sigma.reshape(-1).expand(x.shape[0]).clone()  # a shared sigma becomes one per row
    per_chunk = x.shape[0] // chunks
    for start in range(0, x.shape[0], per_chunk):
        x[start : start + references] = reference_latents.to(x)
        sigma[start : start + references] = clean_sigma
    return x, sigma


def image_guided_pair(
    cond_refs: torch.Tensor, uncond_refs: torch.Tensor | None, without_refs: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewrite the model's (cond, uncond) predictions for image guidance.

    Predictions are ComfyUI's denoised outputs; they are affine in the noise prediction with
    the same input, so the formula holds for eps, v and flow models alike.

    Args:
        cond_refs: ``[B, ...]`` prediction with the text and the references.
        uncond_refs: ``[B, ...]`` unconditional prediction with the references, or None when
            CFG is off (cfg = 1).
        without_refs: ``[B, ...]`` the same branch (uncond, or cond when CFG is off) with the
            references switched off.
        scale: image guidance s.

    Returns:
        ``(cond, uncond)`` such that ``uncond + cfg * (cond - uncond)`` equals
        ``u + cfg * (cond_refs - uncond_refs)`` with ``u = without + s * (uncond_refs - without)``;
        with CFG off, ``(without + s * (cond_refs - without), None)``.
    """
    if uncond_refs is None:
        return without_refs + scale * (cond_refs - without_refs), None
    uncond = without_refs + scale * (uncond_refs - without_refs)
    return uncond + (cond_refs - uncond_refs), uncond
