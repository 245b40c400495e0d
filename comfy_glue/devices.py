"""Running the pack's own torch modules (patch backbones) on ComfyUI's compute device."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from comfy import model_management


@contextmanager
def on_compute_device(module: torch.nn.Module):
    """Move ``module`` to ComfyUI's compute device for a block of work, then offload it,
    freeing room first the way core loads upscale models. Yields the device."""
    device = model_management.get_torch_device()
    model_management.free_memory(model_management.module_size(module) * 2, device)
    module.to(device)
    try:
        yield device
    finally:
        module.to(model_management.unet_offload_device())
