"""The memory check before training: an estimate of a run's peak memory on the training device,
made before the model is loaded there, and the refusal when it exceeds what ComfyUI reports free.

The estimate adds three parts:

- **weights**: the diffusion model's weights that loading will add on the device (none where
  the device is where the weights already are, as on CPU);
- **adapters**: the LoRA's parameters, their gradients and AdamW's two moments (fp32);
- **activations**: the peak of the tensors one training step creates (the policy's forward
  and backward, the reference's output), found by running that step under
  ``FakeTensorMode`` (shapes and dtypes: no arithmetic and no memory, so it costs the same at
  any image size) with the run's adapters, checkpointing, dtype and batch, and counting the
  storages live at once (``LiveTensorBytes``).

See docs/algorithms.md, section 'The memory check before training'.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import comfy.model_management
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..pure.errors import InputError
from ..pure.tensor_memory import LiveTensorBytes
from .pair_batches import MicroBatch

# The LoRA's parameter, its gradient and AdamW's two moments, all fp32.
ADAPTER_COPIES = 4
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """A run's estimated peak on the training device, in bytes, by part."""

    weights: int
    adapters: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.activations

    def describe(self) -> str:
        return (
            f"{self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, LoRA and optimizer "
            f"{self.adapters / GIB:.2f}, activations {self.activations / GIB:.2f})"
        )


def moved(micro: MicroBatch, device: torch.device) -> MicroBatch:
    """``micro`` with its tensors on ``device``."""

    def to(value):
        return value.to(device) if torch.is_tensor(value) else value

    return dataclasses.replace(
        micro,
        x_t=to(micro.x_t),
        sigma=to(micro.sigma),
        kwargs={key: to(value) for key, value in micro.kwargs.items()},
        x0=to(micro.x0),
        scale=to(micro.scale),
        references=to(micro.references),
        reference_sigma=to(micro.reference_sigma),
    )


class WeightWrappers:
    """While open, each layer's weight and bias functions are the ones ``patcher``'s weight
    wrappers give it (weight mode's W + BA, the autograd-safe casts) and no others, as loading
    ``patcher`` would make them; restored on exit."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.saved: list[tuple[torch.nn.Module, list, list]] = []

    def __enter__(self):
        wrappers = self.patcher.weight_wrapper_patches
        for name, module in self.patcher.model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            self.saved.append((module, module.weight_function, module.bias_function))
            module.weight_function = list(wrappers.get(f"{name}.weight", []))
            module.bias_function = list(wrappers.get(f"{name}.bias", []))
        return self

    def __exit__(self, *exc):
        for module, weight_function, bias_function in self.saved:
            module.weight_function, module.bias_function = weight_function, bias_function
        self.saved = []


def activation_bytes(lora, batcher, micro: MicroBatch, dtype: torch.dtype) -> int:
    """The peak of what one training step on ``micro`` holds beyond the weights and the LoRA
    (``LiveTensorBytes``): the reference's output, the policy's forward with its adapters
    (injected, or weight mode's wrappers), checkpointing and compute ``dtype`` as in training,
    and backward, run on fakes of the
    model's weights and ``micro``'s inputs where the weights are now (on the offload device
    before loading, so no weight is counted as copied to the training device).

    ``lora``: the run's ``LoraOnModel``, its patcher not loaded; ``batcher``: its
    ``PairBatcher``; ``micro``: one micro-batch from it.
    """
    patcher = lora.patcher
    device = next(patcher.model.diffusion_model.parameters()).device
    micro = moved(micro, device)
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    trainable = [p for p in lora.parameters.values() if p.requires_grad]
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    live = LiveTensorBytes(fake_mode)
    # Another patcher of this model loaded before (the graph's MODEL, an earlier run) may have its
    # injections on the shared modules: off while the probe runs, as loading would take them off.
    others = [
        loaded.model
        for loaded in comfy.model_management.current_loaded_models
        if loaded.model is not None
        and loaded.model is not patcher
        and loaded.model.model is patcher.model
        and loaded.model.is_injected
    ]
    for other in others:
        other.eject_model()
    patcher.inject_model()
    wrappers = WeightWrappers(patcher)
    try:
        with torch.inference_mode(False), torch.enable_grad(), wrappers, fake_mode, live:
            # The reference's forward (no grad) is left out: it holds one layer's intermediates
            # at a time, less than the policy's backward does; only its output outlives it.
            with autocast:
                prediction = batcher.predict(micro.x_t, micro.sigma, micro.kwargs, micro)
            reference = torch.zeros_like(prediction)
            loss = (micro.errors(prediction) - micro.errors(reference)).mean()
            loss.backward()
            del reference, prediction, loss
    finally:
        patcher.eject_model()
        for other in others:
            other.inject_model()
        for parameter in trainable:
            parameter.grad = None
    return live.peak


def estimate_training_memory(lora, batcher, micro: MicroBatch, config) -> MemoryEstimate | None:
    """The run's estimated peak on its device (see the module's docstring); ``config``: its
    ``DPOTrainingConfig``, other arguments as ``activation_bytes``'s. None, with a warning, where
    the fake step fails (an op that reads tensor values, which fakes have not; a patch that
    raises): the training step then shows whether that error is real."""
    adapters = sum(p.numel() * p.element_size() for p in lora.parameters.values() if p.requires_grad)
    try:
        activations = activation_bytes(lora, batcher, micro, config.dtype)
    except Exception as error:  # noqa: BLE001  (a check must not stop a run the training itself may finish)
        logging.warning("No memory check before training: its fake step failed (%s: %s).", type(error).__name__, error)
        return None
    return MemoryEstimate(weight_bytes_to_load(lora.patcher), ADAPTER_COPIES * adapters, activations)


def weight_bytes_to_load(patcher) -> int:
    """The weights loading ``patcher`` adds on its device: none where they already live there
    (CPU), less what a loaded patcher of the same model already holds there."""
    if patcher.load_device == patcher.offload_device:
        return 0
    resident = sum(
        loaded.model.loaded_size()
        for loaded in comfy.model_management.current_loaded_models
        if loaded.model is not None and loaded.model.model is patcher.model
    )
    return max(0, patcher.model_size() - resident)


def available_bytes(device: torch.device, model) -> int:
    """What ComfyUI reports free on ``device``, less what it keeps back (``--reserve-vram``),
    plus what it would free by unloading other models loaded there."""
    evictable = 0
    if device.type != "cpu":
        evictable = sum(
            loaded.model.loaded_size()
            for loaded in comfy.model_management.current_loaded_models
            if loaded.model is not None and loaded.device == device and loaded.model.model is not model
        )
    free = comfy.model_management.get_free_memory(device)
    return free - comfy.model_management.extra_reserved_memory() + evictable


class NotEnoughMemory(InputError):
    """The estimate exceeds what the device has free; raised before the model is loaded."""


def check_memory(estimate: MemoryEstimate, device: torch.device, model, advice: str) -> None:
    """Log the estimate; raise ``NotEnoughMemory`` with ``advice`` where it exceeds
    ``available_bytes``."""
    available = available_bytes(device, model)
    logging.info(
        "Training memory estimate on %s: %s; %.2f GiB available.", device, estimate.describe(), available / GIB
    )
    if estimate.total > available:
        raise NotEnoughMemory(
            f"this run needs about {estimate.describe()} on {device}, but ComfyUI reports "
            f"{max(available, 0) / GIB:.2f} GiB free there (after what --reserve-vram keeps back). To fit: {advice}."
        )
