"""The LoRA branch of a layer, computed on the forward path: y = layer(x) + s·up(down(x)).

Nothing the size of the layer's weight is built (no W + BA), so base weights may stay in any
dtype (fp8 included) and no full-size weight gradient is computed. See docs/algorithms.md,
section 'LoRA adapters and the reference model'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ConvGeometry:
    """What the down projection of a convolution layer shares with the layer itself."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...] | int = 1
    padding: tuple[int, ...] | int | str = 0
    dilation: tuple[int, ...] | int = 1


def lora_delta(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, conv: ConvGeometry | None = None
) -> torch.Tensor:
    """``scale · up(down(x))``: what a LoRA adds to a linear or convolution layer's output.

    Args:
        x: the layer's input, (..., in_features) or (B, C_in, *spatial) for a convolution.
        down: (rank, in_features), or (rank, C_in · prod(kernel_size)) for a convolution
            (ComfyUI's ``lora_down.weight`` layout).
        up: (out_features, rank).
        scale: alpha / rank (times a strength).
        conv: None for a linear layer; the layer's geometry for a convolution.

    Returns:
        (..., out_features), or (B, out_channels, *spatial_out): the layer's output shape, in
        ``x``'s dtype.
    """
    down, up = down.to(x.dtype), up.to(x.dtype)
    if conv is None:
        return F.linear(F.linear(x, down), up) * scale
    dims = len(conv.kernel_size)
    convolve = CONVOLUTIONS[dims]
    hidden = convolve(
        x,
        down.reshape(down.shape[0], -1, *conv.kernel_size),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
    )
    return convolve(hidden, up.reshape(*up.shape, *([1] * dims))) * scale
