"""Preference pairs in ComfyUI: encoding images with the graph's VAE, and the output folder
pair sets are saved to."""

from __future__ import annotations

import os

import folder_paths
import torch

from ..pure.focus import local_entropy
from ..pure.images import maps_to_grid
from ..pure.pairs import PreferencePairs, thumbnails

PAIRS_SUBFOLDER = "preference_pairs"


def pairs_folder() -> str:
    return os.path.join(folder_paths.get_output_directory(), PAIRS_SUBFOLDER)


def saved_pair_files() -> list[str]:
    folder = pairs_folder()
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))


def encode(vae, images_rgb: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> unscaled latents ``[B, C, h, w]`` (VAE.encode batches by memory)."""
    return vae.encode(images_rgb.movedim(1, -1)).float().cpu()


def build_pairs(
    vae,
    positive,
    winner_images: torch.Tensor,
    winner_index: list[int],
    loser_images: torch.Tensor,
    loser_index: list[int],
    winner_quality,
    loser_quality,
    winner_weights,
    loser_weights,
    metadata: list[dict],
    references: torch.Tensor | None = None,
) -> PreferencePairs:
    """Assemble a pair set: pair i is ``winner_images[winner_index[i]]`` against
    ``loser_images[loser_index[i]]`` (``[B, 3, H, W]`` batches of one size). Each image is encoded,
    measured and thumbnailed once however many pairs it is in. Maps are per pair, ``[N, H, W]``
    at image size (or None = 1); ``references`` are reference photos ``[R, 3, H, W]`` of that size."""
    winners, losers = encode(vae, winner_images), encode(vae, loser_images)
    grid = tuple(winners.shape[-2:])
    count = len(winner_index)
    reference_latents = None if references is None else encode(vae, references)

    def grid_map(maps):
        return torch.ones(count, *grid) if maps is None else maps_to_grid(maps.cpu(), grid).clamp(0, 1)

    def complexity(images):
        return maps_to_grid(local_entropy(images).cpu(), grid)

    return PreferencePairs(
        winners=winners[winner_index],
        losers=losers[loser_index],
        conditionings=[positive],
        condition_index=torch.zeros(count, dtype=torch.long),
        winner_weights=grid_map(winner_weights),
        loser_weights=grid_map(loser_weights),
        winner_quality=grid_map(winner_quality),
        loser_quality=grid_map(loser_quality),
        winner_complexity=complexity(winner_images)[winner_index],
        loser_complexity=complexity(loser_images)[loser_index],
        thumbnails_winner=thumbnails(winner_images)[winner_index],
        thumbnails_loser=thumbnails(loser_images)[loser_index],
        metadata=metadata,
        latent_channels=int(winners.shape[1]),
        references=reference_latents,
    )
