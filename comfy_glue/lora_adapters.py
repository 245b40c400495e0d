"""Trainable LoRA adapters on a cloned ModelPatcher, switchable off for the DPO reference.

As core ``TrainLoraNode``: every layer with a ``weight_function`` and a 2-D+ weight gets a
``comfy.weight_adapter`` LoRA registered with ``add_weight_wrapper``; ``comfy.ops`` applies it on
every forward, so the forward is differentiable. The reference prediction is the same network
with the adapters switched off (peft's ``disable_adapter()``): no second copy in memory.
Choices (init, rank clamping): docs/algorithms.md, section 'LoRA adapters and the reference model'.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from comfy.weight_adapter.lora import LoRAAdapter

from ..pure.errors import InputError


class AdapterSwitch:
    """On/off flag shared by a training run's adapter wrappers (off = reference model)."""

    def __init__(self):
        self.enabled = True

    @contextlib.contextmanager
    def off(self):
        """Inside the block the network is the reference model (adapters off)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


class SwitchedAdapter(torch.nn.Module):
    """A weight wrapper that applies ``adapter`` only while ``switch.enabled``."""

    def __init__(self, adapter: torch.nn.Module, switch: AdapterSwitch):
        super().__init__()
        self.adapter = adapter
        self.switch = switch

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.adapter(weight) if self.switch.enabled else weight

    def passive_memory_usage(self) -> int:
        return self.adapter.passive_memory_usage()

    def move_to(self, device) -> int:
        return self.adapter.move_to(device)


class AutogradSafeWeight:
    """Wrapper for weights without an adapter (norm scales) and biases: returns a normal copy.

    Models loaded by a node in ComfyUI hold inference-mode tensors, which autograd refuses to
    save for backward (norm layers save their weight); a copy made outside inference mode is
    allowed. The copies are 1-D and small; other weights pass through their LoRA, whose sum is
    already a normal tensor."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.clone() if torch.is_inference(weight) else weight

    def passive_memory_usage(self) -> int:
        return 0

    def move_to(self, device) -> int:
        return 0


@dataclass
class LoraOnModel:
    """A cloned ModelPatcher carrying trainable LoRA wrappers."""

    patcher: object
    parameters: dict[str, torch.nn.Parameter]
    switch: AdapterSwitch

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies in ComfyUI's LORA_MODEL layout (``<module>.lora_up.weight``, ...)."""
        return {key: value.detach().to("cpu", copy=True) for key, value in self.parameters.items()}


def attach_lora(
    model_patcher, rank: int, alpha: float, resume: dict[str, torch.Tensor] | None = None, seed: int = 0
) -> LoraOnModel:
    """Clone ``model_patcher`` and register a trainable LoRA on every adaptable layer.

    New adapters start as ComfyUI's (up: Kaiming-uniform, down: zeros, so the LoRA starts as a
    no-op) with the up matrices drawn from ``seed``, so training is reproducible.

    A layer too small for ``rank`` (e.g. the UNet's 4-channel output conv) gets its largest
    possible rank, with alpha scaled so its alpha/rank scale stays the same, and a warning.

    Raises:
        InputError: ``rank`` larger than every layer allows, or a ``resume`` LoRA that matches
            no layer (or a layer of another shape) of this model.
    """
    patcher = model_patcher.clone()
    switch = AdapterSwitch()
    parameters: dict[str, torch.nn.Parameter] = {}
    matched = 0
    generator = torch.Generator().manual_seed(seed)
    clamped: list[str] = []
    layers = 0
    safe_weight = AutogradSafeWeight()
    for name, module in patcher.model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "weight_function") or weight is None:
            continue
        if getattr(module, "bias", None) is not None:
            patcher.add_weight_wrapper(f"{name}.bias", safe_weight)  # layer_norm saves its bias too
        if weight.ndim < 2:
            patcher.add_weight_wrapper(f"{name}.weight", safe_weight)
            continue
        layers += 1
        adapter = None
        if resume is not None:
            try:
                loaded = LoRAAdapter.load(name, resume, float(resume.get(f"{name}.alpha", alpha)), None)
            except KeyError as error:  # an up matrix without its down partner
                raise InputError(f"the resume LoRA is incomplete at layer {name}: {error} is missing") from error
            if loaded is not None:
                up, down = loaded.weights[0], loaded.weights[1]
                if up.shape[0] != weight.shape[0] or down.numel() != down.shape[0] * math.prod(weight.shape[1:]):
                    raise InputError(f"the resume LoRA's layer {name} has another shape than this model's")
                adapter = loaded.to_train()
                matched += 1
        if adapter is None:
            limit = min(weight.shape[0], math.prod(weight.shape[1:]))
            if rank > limit:
                clamped.append(f"{name} ({limit})")
            adapter = LoRAAdapter.create_train(weight, rank=min(rank, limit), alpha=alpha * min(rank, limit) / rank)
            up = torch.empty(adapter.lora_up.weight.shape)
            torch.nn.init.kaiming_uniform_(up, a=5**0.5, generator=generator)
            adapter.lora_up.weight.data.copy_(up)
        adapter = adapter.float()
        for parameter_name, parameter in adapter.named_parameters():
            parameters[f"{name}.{parameter_name}"] = parameter
        patcher.add_weight_wrapper(f"{name}.weight", SwitchedAdapter(adapter, switch))
    if resume is not None and matched == 0:
        raise InputError("the resume LoRA matches no layer of this model (made for another model family?)")
    if clamped and len(clamped) == layers:
        raise InputError(f"rank {rank} is larger than every layer of this model allows; use a smaller rank")
    if clamped:
        logging.warning(
            "LoRA rank %d is larger than %d layer(s) allow; they use their largest rank instead: %s",
            rank,
            len(clamped),
            ", ".join(clamped[:5]) + (" ..." if len(clamped) > 5 else ""),
        )
    for key, parameter in parameters.items():
        parameter.requires_grad_(not key.endswith(".alpha"))
    return LoraOnModel(patcher, parameters, switch)
