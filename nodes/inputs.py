"""Checking and converting IMAGE inputs, with errors that name the node they come from."""
from __future__ import annotations

import logging

import torch

from ..personalize.images import check_image_batch, to_rgb_channels_first


def image_input_to_rgb(images: torch.Tensor, label: str, node_name: str) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` -> ``[B, 3, H, W]``.

    Raises ``ValueError`` starting with ``node_name`` for empty, NaN or odd-channel batches;
    grayscale and RGBA are converted with a log line naming the node.
    """
    try:
        check_image_batch(images, label)
    except ValueError as error:
        raise ValueError(f"{node_name}: {error}") from error
    channels = images.shape[-1]
    if channels != 3:
        logging.warning("%s: '%s' has %d channel(s); converted to RGB%s.", node_name, label, channels,
                        " (alpha applied over black)" if channels == 4 else "")
    return to_rgb_channels_first(images)
