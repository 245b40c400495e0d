"""Preference pairs as model inputs: scaled latents noised with shared noise and sigma, ComfyUI's
processed conditioning, and the factor that puts x0 errors in the model's own target space.

Winner and loser share timestep and noise (Diffusion-DPO); conditioning goes through ComfyUI's
own ``convert_cond`` / ``encode_model_conds`` / ``cond_cat``, so SDXL's pooled and size
conditioning is handled by the model itself. Latents, noise and errors stay ``[B, C, h, w]``;
a model whose latents have a frame axis (Qwen-Image) gets and returns them in its own layout
(``comfy_glue.families.LatentLayout``). Formulas and choices: docs/algorithms.md, sections
'Prediction spaces' and 'Pair batches and joint-set training'.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..comfy_glue.families import latent_layout
from ..comfy_glue.joint import has_joint_attention
from ..pure.joint_attention import LAYOUT_KEY, joint_layout
from ..pure.pairs import PreferencePairs

# Smallest sigma the target-space scale divides by: percents are capped below 1 (see
# ``trainers.timesteps.MAX_PERCENT``), so real sigmas stay above it; it only guards the division.
MIN_SIGMA = 1e-4


# DPO beta's starting points by the space the errors are in (docs/algorithms.md, 'beta per
# prediction space'): Diffusion-DPO's 5000 for noise (and v) prediction, Flow-DPO's SD3.5
# setting for velocity, which every flow family (SD3, Flux.1 and .2, Z-Image, Qwen-Image, Chroma,
# HiDream) predicts.
NOISE_BETA = 5000.0
VELOCITY_BETA = 100.0


def default_beta(model_sampling) -> float:
    """The beta a run on a model with ``model_sampling`` uses when it names none."""
    return VELOCITY_BETA if isinstance(model_sampling, comfy.model_sampling.CONST) else NOISE_BETA


def target_space_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample factor turning x0 errors into errors of what the model predicts."""
    sigma = sigma.clamp(min=MIN_SIGMA)
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        data = float(getattr(model_sampling, "sigma_data", 1.0))
        return (sigma**2 + data**2).sqrt() / (sigma * data)
    if isinstance(model_sampling, comfy.model_sampling.X0):
        return torch.ones_like(sigma)
    return 1.0 / sigma  # eps and flow (velocity) models


def conditioning_batches(model, conditionings: list, latent_shape, device) -> list[dict]:
    """Per conditioning, ComfyUI's processed model conds for a batch of one (``latent_shape``:
    ``[C, h, w]``, given to the model in its own layout)."""
    processed = []
    noise = latent_layout(model).to_model(torch.zeros((1, *latent_shape), device=device))
    for conditioning in conditionings:
        conds = comfy.sampler_helpers.convert_cond(conditioning)[:1]  # area/multi-entry conds: first entry
        conds = comfy.samplers.encode_model_conds(
            model.extra_conds, conds, noise, device, "positive", latent_image=noise, denoise_mask=None, seed=0
        )
        processed.append(
            {key: value.process_cond(batch_size=1, area=None) for key, value in conds[0]["model_conds"].items()}
        )
    return processed


def batch_kwargs(processed: list[dict], indices: list[int], device) -> dict[str, torch.Tensor]:
    joined = comfy.samplers.cond_cat([processed[i] for i in indices])
    # clone(): conditioning made under ComfyUI's inference mode cannot be saved for backward.
    return {key: value.to(device).clone() if torch.is_tensor(value) else value for key, value in joined.items()}


@dataclass
class MicroBatch:
    """Model inputs for the winners then the losers of some pairs (see ``PairBatcher.batch``).

    ``percents``: the sampling percent each pair was noised at; ``references`` /
    ``reference_sigma``: the noised reference latents of a joint batch (or None).
    """

    percents: torch.Tensor
    x_t: torch.Tensor
    sigma: torch.Tensor
    kwargs: dict
    x0: torch.Tensor
    scale: torch.Tensor
    references: torch.Tensor | None = None
    reference_sigma: torch.Tensor | None = None

    def errors(self, prediction: torch.Tensor) -> torch.Tensor:
        """Per-element squared errors of an x0 ``prediction``, in the model's target space."""
        return (prediction - self.x0) ** 2 * self.scale


class PairBatcher:
    """Turns pair indices into model inputs: scaled latents noised with shared noise and sigma,
    processed conditioning, and the target-space error scale. ``patcher`` must be loaded.

    When the pairs have references and the MODEL has Joint Attention, every prediction is made
    in the joint layout, references first. A MODEL with Joint Attention and pairs without
    references is told there are none (otherwise the patch would take the first image of
    each batch as a reference)."""

    def __init__(self, patcher, pairs: PreferencePairs):
        self.model = patcher.model
        self.device = patcher.load_device
        self.sampling = self.model.model_sampling
        self.transformer_options = patcher.model_options.get("transformer_options", {})
        self.pairs = pairs
        self.layout = latent_layout(self.model)
        self.winners = self.scaled(pairs.winners)
        self.losers = self.scaled(pairs.losers)
        # The per-pair maps the losses read, on the device once rather than every micro-batch.
        self.maps = pairs.maps.apply(lambda value: value.float().to(self.device))
        self.references = None
        if has_joint_attention(patcher):
            if pairs.references is not None:
                self.references = self.scaled(pairs.references)
            else:
                self.transformer_options = {**self.transformer_options, LAYOUT_KEY: joint_layout(0)}
        self.conds = conditioning_batches(self.model, pairs.conditionings, tuple(self.winners.shape[1:]), self.device)

    @property
    def joint(self) -> bool:
        return self.references is not None

    def scaled(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled ``[N, C, h, w]`` latents -> the model's scaled ones, ``[N, C, h, w]`` on the device."""
        layout = self.layout
        return layout.to_image(self.model.process_latent_in(layout.to_model(latents.float()))).to(self.device)

    def apply_model(self, x_t, sigma, options: dict, kwargs: dict) -> torch.Tensor:
        """The model's x0 prediction ``[B, C, h, w]`` of ``x_t`` ``[B, C, h, w]``, in float32."""
        layout = self.layout
        prediction = self.model.apply_model(layout.to_model(x_t), sigma, transformer_options=options, **kwargs)
        return layout.to_image(prediction).float()

    def batch(
        self, indices: list[int], percents: torch.Tensor, generator: torch.Generator, rows: list[int] | None = None
    ) -> MicroBatch:
        """Winners then losers of ``indices``, at ``percents`` (one per pair; a joint batch uses
        the first for all). ``rows``: the positions in ``indices`` to keep (a data-parallel
        process's share); the noise is drawn for all of them, so every process draws alike."""
        if self.joint:
            percents = percents[:1].expand(len(indices))
        sigma = torch.tensor([float(self.sampling.percent_to_sigma(float(p))) for p in percents], device=self.device)
        noise = torch.randn((len(indices), *self.winners.shape[1:]), generator=generator).to(self.device)
        if rows is not None:
            indices, percents, sigma, noise = [indices[i] for i in rows], percents[rows], sigma[rows], noise[rows]
        x0 = torch.cat([self.winners[indices], self.losers[indices]])
        sigma2 = torch.cat([sigma, sigma])
        x_t = self.sampling.noise_scaling(sigma2.view(-1, 1, 1, 1), torch.cat([noise, noise]), x0)
        kwargs = batch_kwargs(self.conds, [int(self.pairs.condition_index[i]) for i in indices] * 2, self.device)
        scale = target_space_scale(self.sampling, sigma2).view(-1, 1, 1, 1) ** 2
        batch = MicroBatch(percents, x_t, sigma2, kwargs, x0, scale)
        if self.joint:
            reference_noise = torch.randn(self.references.shape, generator=generator).to(self.device)
            batch.reference_sigma = sigma[:1].expand(self.references.shape[0])
            batch.references = self.sampling.noise_scaling(
                batch.reference_sigma.view(-1, 1, 1, 1), reference_noise, self.references
            )
        return batch

    def predict(self, x_t, sigma, kwargs, batch: MicroBatch | None = None) -> torch.Tensor:
        """The model's x0 prediction of ``x_t`` (in a joint batch with ``batch``'s references)."""
        if batch is None or batch.references is None:
            return self.apply_model(x_t, sigma, self.transformer_options, kwargs)
        count = batch.references.shape[0]
        joint_x = torch.cat([batch.references, x_t])
        joint_sigma = torch.cat([batch.reference_sigma, sigma])
        # The references take the conditioning of the micro-batch's first image.
        joint_kwargs = {
            key: torch.cat([value[:1].expand(count, *value.shape[1:]), value])
            if torch.is_tensor(value) and value.shape[0] == x_t.shape[0]
            else value
            for key, value in kwargs.items()
        }
        options = {
            **self.transformer_options,
            LAYOUT_KEY: joint_layout(count),
            "cond_or_uncond": [0],
            "sigmas": joint_sigma,
        }
        return self.apply_model(joint_x, joint_sigma, options, joint_kwargs)[count:]
