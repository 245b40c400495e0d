"""Gradient checkpointing per block: which modules are the blocks, and the checkpointed call.

Depth counts as core ``TrainLoraNode``'s ``checkpoint_depth`` does: the diffusion model itself
is depth 1, and containers (ModuleList, Sequential, ModuleDict) do not count, so depth 2 is a
UNet's ResBlocks and SpatialTransformers (or a DiT's transformer blocks). See docs/algorithms.md,
section 'The training loop'.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def modules_at_depth(root: torch.nn.Module, depth: int) -> list[torch.nn.Module]:
    """Modules ``depth`` levels down from ``root`` (root = 1), containers not counted.

    Single layers (modules without children) are never returned: checkpointing one saves
    nothing, and a branch shallower than ``depth`` (a UNet's time embedding) runs as it is.
    """
    if depth == 1:
        return [root]
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module, level: int) -> None:
        if not isinstance(module, CONTAINERS):
            level += 1
            if level == depth:
                if any(True for _ in module.children()):
                    found.append(module)
                return
        for child in module.children():
            visit(child, level)

    visit(root, 0)
    return found


def checkpointed_call(forward, *args, **kwargs):
    """``forward(*args, **kwargs)``, its activations recomputed in backward when grad is on."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
