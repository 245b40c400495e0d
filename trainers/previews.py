"""Previews while a LoRA trains: every few steps a few images sampled with the LoRA as it is, at
fixed seeds, from the pairs' own prompts, so an artist sees where the run is going.

They sample with the training patcher itself (the adapters are on it; no second copy of the
model is loaded), under ``no_grad``, with ComfyUI's own ``comfy.sample.sample``. Docs:
docs/algorithms.md, section 'Previews while training'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import latent_preview
import numpy as np
import torch

from ..comfy_glue.families import latent_downscale
from ..pure.drawing import labelled_strip
from ..pure.errors import InputError
from ..pure.pairs import PreferencePairs
from .lora_adapters import adapter_autocast

# samples -> images [N, H, W, 3] in 0..1 (a VAE's decode)
Decode = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PreviewSettings:
    """Attributes:
    every: steps between previews (0 = none).
    images: images per preview, one per prompt of the pairs (cycling) with seeds ``seed + i``.
    steps: sampling steps (euler, simple schedule, cfg 1).
    seed: the first image's seed.
    """

    every: int = 0
    images: int = 2
    steps: int = 8
    seed: int = 0


class TrainingPreviews:
    """The previews of one run: ``take(patcher, step)`` where ``due(step)``; ``grid()`` lays them
    out one row per step.

    Args:
        pairs: the run's pairs (their conditionings are the prompts; their latent size the size).
        settings: when and what to sample.
        decode: a VAE's decode; without one, ComfyUI's latent-to-RGB preview of the model's
            latent format (what it shows while sampling), at latent size.
    """

    def __init__(self, pairs: PreferencePairs, settings: PreviewSettings, decode: Decode | None = None):
        self.settings, self.decode = settings, decode
        self.prompts = [pairs.conditionings[i % len(pairs.conditionings)] for i in range(settings.images)]
        self.latent_size = pairs.latent_size
        self.rows: list[tuple[int, torch.Tensor]] = []  # (step, images [N, H, W, 3])

    def due(self, step: int) -> bool:
        return self.settings.every > 0 and step % self.settings.every == 0

    def take(self, patcher, step: int) -> torch.Tensor:
        """Sample the previews with ``patcher`` (the LoRA on it as it is now); returns and keeps
        them, ``[N, H, W, 3]``."""
        settings = self.settings
        latents = []
        with torch.no_grad(), adapter_autocast(patcher):
            for index, prompt in enumerate(self.prompts):
                empty = torch.zeros(1, 4, *self.latent_size)
                empty = comfy.sample.fix_empty_latent_channels(patcher, empty)
                seed = settings.seed + index
                noise = comfy.sample.prepare_noise(empty, seed)
                latents.append(
                    comfy.sample.sample(
                        patcher,
                        noise,
                        settings.steps,
                        1.0,
                        "euler",
                        "simple",
                        prompt,
                        prompt,
                        empty,
                        seed=seed,
                        disable_pbar=True,
                    )
                )
            images = self.to_images(patcher, torch.cat(latents))  # the VAE's weights are inference tensors
        # Loading the VAE may have pushed the training model off the GPU: training goes on with it.
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        self.rows.append((step, images))
        return images

    def to_images(self, patcher, samples: torch.Tensor) -> torch.Tensor:
        if self.decode is not None:
            images = self.decode(samples)
            return images.reshape(-1, *images.shape[-3:]).float().cpu()
        latent_format = patcher.model.latent_format
        if latent_format.latent_rgb_factors is None:
            raise InputError(
                f"{type(patcher.model).__name__} has no latent-to-RGB preview; connect the model's VAE for "
                "previews, or set preview_every to 0"
            )
        previewer = latent_preview.Latent2RGBPreviewer(
            latent_format.latent_rgb_factors,
            getattr(latent_format, "latent_rgb_factors_bias", None),
            getattr(latent_format, "latent_rgb_factors_reshape", None),
        )
        inner = patcher.model.process_latent_in(samples)
        scale = latent_downscale(patcher.model)
        frames = []
        for index in range(inner.shape[0]):
            image = previewer.decode_latent_to_preview(inner[index : index + 1].float())
            frame = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            frame = torch.nn.functional.interpolate(frame.movedim(-1, 0)[None], scale_factor=scale, mode="nearest")
            frames.append(frame[0].movedim(0, -1))
        return torch.stack(frames)

    def strip(self, index: int = -1) -> torch.Tensor:
        """``[H, W, 3]``: the images of one preview (default the newest) side by side, labelled."""
        step, images = self.rows[index]
        labels = [f"step {step}, seed {self.settings.seed + i}" for i in range(len(images))]
        return labelled_strip(images.movedim(-1, 1), labels).movedim(0, -1)

    def grid(self) -> torch.Tensor | None:
        """``[1, H, W, 3]``: one row per preview, in step order; None without previews."""
        if not self.rows:
            return None
        return torch.cat([self.strip(index) for index in range(len(self.rows))]).unsqueeze(0)
