"""Preference pairs in ComfyUI: encoding images with the graph's VAE, and the output folder
pair sets are saved to."""

from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths
import torch

from ..pure.focus import local_entropy
from ..pure.images import maps_to_grid
from ..pure.pairs import PairMaps, PreferencePairs, single_frame, thumbnails

PAIRS_SUBFOLDER = "preference_pairs"


def pairs_folder() -> str:
    return os.path.join(folder_paths.get_output_directory(), PAIRS_SUBFOLDER)


def saved_pair_files() -> list[str]:
    folder = pairs_folder()
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))


def encode(vae, images_rgb: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> unscaled latents ``[B, C, h, w]``, one frame per image (VAE.encode
    batches by memory). A VAE with a frame axis (``latent_dim`` 3: Qwen-Image's Wan 2.1, video
    VAEs) reads a batch of images as the frames of one clip, so each image is encoded on its own;
    its ``[1, C, 1, h, w]`` latents lose the frame axis (``single_frame``)."""
    pixels = images_rgb.movedim(1, -1)
    if getattr(vae, "latent_dim", 2) == 3:
        return torch.cat([single_frame(vae.encode(image[None]).float().cpu()) for image in pixels])
    return single_frame(vae.encode(pixels).float().cpu())


@dataclass(frozen=True)
class PairSide:
    """One side of N pairs: pair i takes ``images[index[i]]`` (``images`` ``[B, 3, H, W]``)."""

    images: torch.Tensor
    index: list[int]


@dataclass(frozen=True)
class ImageMaps:
    """Per-pair maps ``[N, H, W]`` at image size, as the builders know them; None means 1."""

    winner_weights: torch.Tensor | None = None
    loser_weights: torch.Tensor | None = None
    loser_quality: torch.Tensor | None = None


def build_pairs(
    *,
    vae,
    positive,
    winners: PairSide,
    losers: PairSide,
    maps: ImageMaps,
    metadata: list[dict],
    references: torch.Tensor | None = None,
) -> PreferencePairs:
    """Assemble a pair set of ``winners`` against ``losers`` (images of one size), all with the
    conditioning ``positive``. Each image is encoded, measured and thumbnailed once however many
    pairs it is in; ``maps`` are pooled onto the latent grid; ``references`` are reference photos
    ``[R, 3, H, W]`` of the pairs' size."""
    winner_latents, loser_latents = encode(vae, winners.images), encode(vae, losers.images)
    grid = tuple(winner_latents.shape[-2:])
    count = len(winners.index)
    reference_latents = None if references is None else encode(vae, references)

    def grid_map(image_maps):
        return torch.ones(count, *grid) if image_maps is None else maps_to_grid(image_maps.cpu(), grid).clamp(0, 1)

    return PreferencePairs(
        winners=winner_latents[winners.index],
        losers=loser_latents[losers.index],
        conditionings=[positive],
        condition_index=torch.zeros(count, dtype=torch.long),
        maps=PairMaps(
            winner_weights=grid_map(maps.winner_weights),
            loser_weights=grid_map(maps.loser_weights),
            loser_quality=grid_map(maps.loser_quality),
            loser_complexity=maps_to_grid(local_entropy(losers.images).cpu(), grid)[losers.index],
        ),
        thumbnails_winner=thumbnails(winners.images)[winners.index],
        thumbnails_loser=thumbnails(losers.images)[losers.index],
        metadata=metadata,
        latent_channels=int(winner_latents.shape[1]),
        references=reference_latents,
    )
