"""Gradient checkpointing per block: which modules are the blocks, and the checkpointed call;
training blocks that update their inputs in place (Flux's ``img += ...``); frozen aliases of a
loaded model's weights that autograd can save.

Depth counts as core ``TrainLoraNode``'s ``checkpoint_depth`` does: the diffusion model itself
is depth 1, and containers (ModuleList, Sequential, ModuleDict) do not count, so depth 2 is a
UNet's ResBlocks and SpatialTransformers (or a DiT's transformer blocks). See docs/algorithms.md,
section 'The training loop'.
"""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint

from ..pure.tensor_memory import storage_key

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


def saving_copies(forward):
    """``forward`` for a block that updates its tensor arguments in place (Flux's ``x += ...``
    after a norm saved ``x`` for backward): while it runs with grad on, autograd saves copies of
    whatever shares storage with the arguments, so backward reads the values from before the
    update instead of failing ("modified by an inplace operation"). Costs one copy per such
    saved tensor, what out-of-place code would hold anyway."""

    @functools.wraps(forward)
    def call(*args, **kwargs):
        tensors = [value for value in (*args, *kwargs.values()) if torch.is_tensor(value)]
        if not torch.is_grad_enabled() or not tensors:
            return forward(*args, **kwargs)
        storages = {storage_key(tensor) for tensor in tensors}

        def pack(saved: torch.Tensor) -> torch.Tensor:
            return saved.clone() if storage_key(saved) in storages else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
            return forward(*args, **kwargs)

    return call


def checkpointed_in_place_call(forward, *args, **kwargs):
    """``checkpointed_call`` for a block that updates its tensor arguments in place.

    PyTorch's reentrant checkpoint: the first pass runs without grad (nothing saved, the update
    is harmless) and the recomputation in backward is a normal graph of its own, where
    ``saving_copies`` works; the non-reentrant one keeps references to the tensors the block
    then updates, and saved-tensor hooks inside it break its bookkeeping. The block always runs
    on copies of its tensor arguments, so the inputs kept for the recomputation stay as they were
    (copying them alone gives silently wrong gradients once a block updates a tensor twice)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    tensor_names = [name for name, value in kwargs.items() if torch.is_tensor(value)]
    others = {name: value for name, value in kwargs.items() if name not in tensor_names}

    def run(_anchor, *values):
        copies = [value.clone() if torch.is_tensor(value) else value for value in values]
        named = dict(zip(tensor_names, copies[len(args) :], strict=True))
        return saving_copies(forward)(*copies[: len(args)], **named, **others)

    tensors = [kwargs[name] for name in tensor_names]
    # The reentrant checkpoint passes gradients only when an input requires grad; the block's own
    # parameters (LoRA adapters) need them even when its inputs do not (the first block).
    anchor = torch.zeros((), requires_grad=True)
    return torch.utils.checkpoint.checkpoint(run, anchor, *args, *tensors, use_reentrant=True)


def frozen_alias(tensor: torch.Tensor) -> torch.nn.Parameter:
    """A frozen parameter on ``tensor``'s memory (no copy) that autograd can save for backward.

    A model loaded by a node holds inference tensors, which autograd refuses to save (a linear
    layer saves its weight to pass gradients to its input); one loaded outside a node holds
    parameters that require grad, whose full-size gradients would cost as much memory as the
    model. The alias is a normal tensor viewing the same storage, with ``requires_grad`` off.

    Shapes: the alias has ``tensor``'s shape, stride, dtype and device.
    """
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return torch.nn.Parameter(alias, requires_grad=False)
