"""Small image helpers shared by the vision algorithms.

ComfyUI passes images as ``[B, H, W, C]`` floats in 0..1 and masks as ``[B, H, W]``; the
algorithms work channels-first. These helpers do the conversions and the checks once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError


def to_rgb_channels_first(images: torch.Tensor) -> torch.Tensor:
    """Convert a ComfyUI IMAGE batch to RGB channels-first.

    Grayscale (C=1) is repeated to three channels; RGBA (C=4) is composited over black, the way
    ComfyUI's own nodes drop alpha (premultiplied by alpha so transparent areas count as empty).

    Args:
        images: ``[B, H, W, C]`` with C in {1, 3, 4}, values in 0..1.

    Returns:
        ``[B, 3, H, W]`` float tensor.
    """
    if images.ndim == 3:  # a single image without batch dimension
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise InputError(f"expected an image batch [B, H, W, C], got shape {tuple(images.shape)}")
    channels = images.shape[-1]
    if channels == 1:
        images = images.expand(-1, -1, -1, 3)
    elif channels == 4:
        images = images[..., :3] * images[..., 3:4]
    elif channels != 3:
        raise InputError(f"expected 1, 3 or 4 colour channels, got {channels}")
    return images.movedim(-1, 1).float()


def check_image_batch(images: torch.Tensor, label: str) -> None:
    """Raise ``InputError`` with a fix for batches no algorithm here can use.

    Args:
        images: ``[B, H, W, C]`` ComfyUI IMAGE batch.
        label: the input's name, used in the message.
    """
    if images is None or images.ndim != 4 or images.shape[0] == 0:
        raise InputError(f"'{label}' is an empty batch; connect at least one image.")
    if images.shape[-1] not in (1, 3, 4):
        raise InputError(f"'{label}' has {images.shape[-1]} channels; expected RGB, grayscale or RGBA.")
    if not torch.isfinite(images).all():
        raise InputError(f"'{label}' contains NaN or infinite pixels; check the node that made them.")


def resize_to_patch_grid(images: torch.Tensor, short_side: int, patch_size: int) -> torch.Tensor:
    """Resize so the short side is about ``short_side`` and both sides are multiples of
    ``patch_size`` (at least one patch), keeping the aspect ratio as closely as the grid allows.

    Args:
        images: ``[B, C, H, W]``.

    Returns:
        ``[B, C, h * patch_size, w * patch_size]``.
    """
    height, width = images.shape[-2:]
    scale = short_side / min(height, width)
    grid_h = max(1, round(height * scale / patch_size))
    grid_w = max(1, round(width * scale / patch_size))
    size = (grid_h * patch_size, grid_w * patch_size)
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def fit_to_size(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop to the aspect ratio of ``size``, then resize to ``size`` (antialiased bilinear).

    Args:
        images: ``[B, C, H, W]`` (images or masks with C = 1).
        size: ``(height, width)``.

    Returns:
        ``[B, C, height, width]``.
    """
    height, width = images.shape[-2:]
    target_h, target_w = size
    if (height, width) == (target_h, target_w):
        return images
    if height * target_w > width * target_h:  # too tall: crop rows
        crop = max(1, round(width * target_h / target_w))
        top = (height - crop) // 2
        images = images[..., top : top + crop, :]
    elif height * target_w < width * target_h:  # too wide: crop columns
        crop = max(1, round(height * target_w / target_h))
        left = (width - crop) // 2
        images = images[..., :, left : left + crop]
    if tuple(images.shape[-2:]) == (target_h, target_w):
        return images
    return F.interpolate(images, size=(target_h, target_w), mode="bilinear", antialias=True, align_corners=False)


def maps_to_grid(maps: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Resize per-pixel maps (masks, quality, entropy) onto a grid: area-average where the grid
    is coarser (each cell gets the mean over the pixels it covers), bilinear where it is finer.

    Args:
        maps: ``[B, H, W]`` (or ``[H, W]``).
        grid_size: ``(h, w)``.

    Returns:
        ``[B, h, w]`` float.
    """
    if maps.ndim == 2:
        maps = maps.unsqueeze(0)
    maps = maps.float().unsqueeze(1)
    if maps.shape[-2] >= grid_size[0] and maps.shape[-1] >= grid_size[1]:
        return F.adaptive_avg_pool2d(maps, grid_size).squeeze(1)
    return F.interpolate(maps, size=grid_size, mode="bilinear", align_corners=False).squeeze(1)
