"""Checking and converting IMAGE and MASK inputs; warnings name the node they come from, errors
are ``InputError`` (the node's ``node_errors`` block adds its title)."""

from __future__ import annotations

import logging

import torch

from ..pure.errors import InputError
from ..pure.images import check_image_batch, fit_to_size, to_rgb_channels_first


def image_input_to_rgb(images: torch.Tensor, label: str, title: str) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` -> ``[B, 3, H, W]``.

    Raises ``InputError`` for empty, NaN or odd-channel batches; grayscale and RGBA are
    converted with a log line naming the node ``title``.
    """
    check_image_batch(images, label)
    channels = images.shape[-1]
    if channels != 3:
        logging.warning(
            "%s: '%s' has %d channel(s); converted to RGB%s.",
            title,
            label,
            channels,
            " (alpha applied over black)" if channels == 4 else "",
        )
    return to_rgb_channels_first(images)


def image_input_fitted(images: torch.Tensor, label: str, title: str, size: tuple[int, int]) -> torch.Tensor:
    """``image_input_to_rgb``, then centre-cropped to the aspect of ``size`` and resized to it
    (logged when that changes anything). Returns ``[B, 3, height, width]``."""
    rgb = image_input_to_rgb(images, label, title)
    if tuple(rgb.shape[-2:]) != tuple(size):
        logging.info(
            "%s: '%s' of %dx%d centre-cropped and resized to %dx%d.",
            title,
            label,
            rgb.shape[-1],
            rgb.shape[-2],
            size[1],
            size[0],
        )
    return fit_to_size(rgb, tuple(size))


def optional_mask(
    mask: torch.Tensor | None,
    label: str,
    title: str,
    count: int | None = None,
    meaning_when_empty: str = "it is ignored",
    masks_noun: str = "masks",
    count_of: str = "images",
) -> torch.Tensor | None:
    """An optional MASK input as ``[N, H, W]``, or None when absent or unpainted (all zero, as
    ComfyUI's mask editor leaves it; logged as "<label> is empty; <meaning_when_empty>").

    Raises ``InputError`` when ``count`` is given and there are neither 1 nor ``count`` masks
    ("got N <masks_noun> for <count> <count_of>").
    """
    if mask is None:
        return None
    mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
    if float(mask.max()) <= 0:
        logging.warning("%s: %s is empty; %s.", title, label, meaning_when_empty)
        return None
    if count is not None and mask.shape[0] not in (1, count):
        raise InputError(
            f"got {mask.shape[0]} {masks_noun} for {count} {count_of}; give one mask for all or one for each."
        )
    return mask.float()
