"""Trainable LoRA adapters on a cloned ModelPatcher, switchable off for the DPO reference.

Every layer with a ``weight_function`` and a 2-D+ weight gets a ``comfy.weight_adapter`` LoRA,
applied in one of two ways (``LORA_MODES``):

- ``bypass``: on the forward path, y = layer(x) + s·up(down(x)), installed as a
  ``PatcherInjection`` (ComfyUI's ``BypassInjectionManager`` where the running ComfyUI has it,
  the pack's ``BypassedLayers`` otherwise). No W + BA is built and no full-size weight
  gradient is computed; base weights may be fp8. While training, no weight is copied either:
  the frozen weights are aliases autograd can save (``FrozenAliases``).
- ``weight``: as core ``TrainLoraNode``'s default, a weight wrapper builds W + s·BA on every
  forward.

The reference prediction is the same network with the adapters switched off (peft's
``disable_adapter()``): no second copy in memory. Gradient checkpointing per block is another
injection (``TrainingBlocks``), on the training patcher only. Choices (init, rank clamping,
modes): docs/algorithms.md, section 'LoRA adapters and the reference model'.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field

import torch
from comfy.patcher_extension import PatcherInjection
from comfy.weight_adapter.lora import LoRAAdapter

from ..comfy_glue.families import model_family
from ..pure.errors import InputError
from .checkpointing import (
    checkpointed_call,
    checkpointed_in_place_call,
    frozen_alias,
    modules_at_depth,
    saving_copies,
)
from .lora_branch import ConvGeometry, lora_delta

try:  # ComfyUI 0.3.76 and later
    from comfy.weight_adapter.bypass import BypassInjectionManager
except ImportError:
    BypassInjectionManager = None

LORA_MODES = ("bypass", "weight")
BYPASS_KEY = "prefpairs_lora_bypass"
BLOCKS_KEY = "prefpairs_training_blocks"
ALIASES_KEY = "prefpairs_frozen_aliases"
LOW_PRECISION_DTYPES = {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)}


def is_low_precision(weight: torch.Tensor) -> bool:
    """fp8 or a ComfyUI quantized tensor: a weight the weight mode cannot train on."""
    return weight.dtype in LOW_PRECISION_DTYPES or type(weight).__name__ == "QuantizedTensor"


class AdapterSwitch:
    """On/off flag shared by a training run's adapters (off = reference model).

    The weight mode's wrappers read ``enabled``; bypass branches read each adapter's
    ``multiplier`` (as ComfyUI's bypass hooks do), which ``off()`` sets to 0."""

    def __init__(self, adapters: list[torch.nn.Module]):
        self.enabled = True
        self.adapters = adapters

    @contextlib.contextmanager
    def off(self):
        """Inside the block the network is the reference model (adapters off)."""
        self.enabled = False
        for adapter in self.adapters:
            adapter.multiplier = 0.0
        try:
            yield
        finally:
            self.enabled = True
            for adapter in self.adapters:
                adapter.multiplier = 1.0


class SwitchedAdapter(torch.nn.Module):
    """A weight wrapper that applies ``adapter`` only while ``switch.enabled``."""

    def __init__(self, adapter: torch.nn.Module, switch: AdapterSwitch):
        super().__init__()
        self.adapter = adapter
        self.switch = switch

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        # detach(): the base weight is frozen (see AutogradSafeWeight).
        return self.adapter(weight.detach()) if self.switch.enabled else weight.detach()

    def passive_memory_usage(self) -> int:
        return self.adapter.passive_memory_usage()

    def move_to(self, device) -> int:
        return self.adapter.move_to(device)


class AutogradSafeWeight:
    """Training-only weight wrapper for the weights ``FrozenAliases`` cannot alias (ComfyUI's
    quantized tensors): a detached copy autograd can save, made on every forward as ComfyUI's
    cast of a weight with a wrapper is."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach()
        return weight.clone() if torch.is_inference(weight) and torch.is_grad_enabled() else weight

    def passive_memory_usage(self) -> int:
        return 0

    def move_to(self, device) -> int:
        return 0


class FrozenAliases:
    """While the training patcher is loaded (inject/eject), the named parameters autograd cannot
    use as they are (inference tensors, parameters that require grad) are swapped for frozen
    aliases of the same memory (``frozen_alias``).

    No weight wrapper is involved, so ComfyUI's layers cast their weights without copying them;
    ComfyUI injects after it loads the weights and ejects before it moves them, so the aliases
    always view the weights where they are."""

    def __init__(self, names: list[str]):
        self.names = names
        self.originals: dict[str, torch.nn.Parameter] = {}

    def inject(self, patcher) -> None:
        if self.originals:
            return
        for name in self.names:
            module_name, _, attribute = name.rpartition(".")
            module = patcher.model.get_submodule(module_name)
            original = getattr(module, attribute)
            if torch.is_inference(original) or original.requires_grad:
                self.originals[name] = original
                setattr(module, attribute, frozen_alias(original))

    def eject(self, patcher) -> None:
        for name, original in self.originals.items():
            module_name, _, attribute = name.rpartition(".")
            setattr(patcher.model.get_submodule(module_name), attribute, original)
        self.originals = {}


def aliasable(parameter: torch.Tensor) -> bool:
    """Whether ``frozen_alias`` can view ``parameter``: a plain tensor, not a tensor subclass
    such as ComfyUI's ``QuantizedTensor``."""
    return type(parameter.data) is torch.Tensor


def conv_geometry(module: torch.nn.Module) -> ConvGeometry | None:
    """A convolution layer's geometry, or None for a linear layer."""
    if not isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return None
    return ConvGeometry(tuple(module.kernel_size), module.stride, module.padding, module.dilation)


def bypass_adaptable(module: torch.nn.Module) -> bool:
    """Whether ``lora_delta`` reproduces the layer's geometry (no groups, zero padding)."""
    return getattr(module, "groups", 1) == 1 and getattr(module, "padding_mode", "zeros") == "zeros"


class BypassedLayers:
    """The pack's bypass for ComfyUI versions without ``comfy.weight_adapter.bypass``: each
    layer's forward becomes layer(x) + s·up(down(x)) while the patcher is loaded (inject), and
    is restored on eject."""

    def __init__(self, layers: dict[str, tuple[torch.nn.Module, torch.nn.Module]]):
        self.layers = layers
        self.originals: dict[str, object] = {}

    def inject(self, patcher) -> None:
        if self.originals:
            return
        for name, (module, adapter) in self.layers.items():
            adapter.to(patcher.load_device)
            original = module.forward
            self.originals[name] = original
            module.forward = functools.partial(
                self.forward, original, adapter, float(adapter.alpha) / adapter.rank, conv_geometry(module)
            )

    def eject(self, patcher) -> None:
        for name, original in self.originals.items():
            self.layers[name][0].forward = original
        self.originals = {}

    @staticmethod
    def forward(original, adapter, scale: float, geometry, x, *args, **kwargs):
        output = original(x, *args, **kwargs)
        multiplier = getattr(adapter, "multiplier", 1.0)
        if multiplier == 0.0:
            return output
        delta = lora_delta(x, adapter.lora_down.weight, adapter.lora_up.weight, scale * multiplier, geometry)
        return output + delta


def adapter_autocast(patcher):
    """The autocast that runs the trainer's float32 adapters beside a model computing in fp16 or
    bf16, outside the training step (which has its own): off for float32 models."""
    compute = getattr(patcher.model, "manual_cast_dtype", None) or patcher.model.get_dtype()
    return torch.autocast(patcher.load_device.type, dtype=compute, enabled=compute in (torch.float16, torch.bfloat16))


def inference_adapters(layers: dict[str, tuple[torch.nn.Module, torch.nn.Module]]) -> dict[str, tuple]:
    """The trained adapters as ComfyUI's inference LoRA adapters (weights, as a loaded LoRA
    has): ComfyUI's bypass casts those to each layer's dtype, where it leaves training adapters to
    the trainer's autocast, so sampling an fp16 or bf16 model with them works."""
    return {
        name: (
            module,
            LoRAAdapter(
                set(),
                (
                    adapter.lora_up.weight.detach().clone(),
                    adapter.lora_down.weight.detach().clone(),
                    float(adapter.alpha),
                    None,
                    None,
                    None,
                ),
            ),
        )
        for name, (module, adapter) in layers.items()
    }


def bypass_injections(model, layers: dict[str, tuple[torch.nn.Module, torch.nn.Module]]) -> list[PatcherInjection]:
    """Injections applying ``layers``' adapters on the forward path of ``model``."""
    if BypassInjectionManager is None:
        bypassed = BypassedLayers(layers)
        return [PatcherInjection(inject=bypassed.inject, eject=bypassed.eject)]
    manager = BypassInjectionManager()
    for name, (_, adapter) in layers.items():
        manager.add_adapter(name, adapter, strength=1.0)
    return manager.create_injections(model)


class TrainingBlocks:
    """Training forwards of the diffusion model's blocks while the patcher is loaded
    (inject/eject): gradient checkpointing of ``checkpointed``, and for ``in_place`` blocks (those
    that update their inputs in place, see ``ModelFamily.in_place``) the guards that let autograd
    train them."""

    def __init__(self, checkpointed: list[torch.nn.Module], in_place: list[torch.nn.Module]):
        self.blocks = list({id(block): block for block in [*checkpointed, *in_place]}.values())
        self.checkpointed = {id(block) for block in checkpointed}
        self.in_place = {id(block) for block in in_place}
        self.originals: list[object] = []

    def training_forward(self, block: torch.nn.Module):
        checkpointed, in_place = id(block) in self.checkpointed, id(block) in self.in_place
        if checkpointed and in_place:
            return functools.partial(checkpointed_in_place_call, block.forward)
        if checkpointed:
            return functools.partial(checkpointed_call, block.forward)
        return saving_copies(block.forward)

    def inject(self, patcher) -> None:
        if self.originals:
            return
        for block in self.blocks:
            self.originals.append(block.forward)
            block.forward = self.training_forward(block)

    def eject(self, patcher) -> None:
        for block, original in zip(self.blocks, self.originals, strict=True):
            block.forward = original
        self.originals = []


def training_blocks(checkpointed: list, in_place: list) -> list[PatcherInjection]:
    blocks = TrainingBlocks(checkpointed, in_place)
    return [PatcherInjection(blocks.inject, blocks.eject)]


@dataclass
class LoraOnModel:
    """Trainable LoRA adapters for the layers of ``base`` (a ModelPatcher, never modified) and
    ``patcher``, the clone of ``base`` they train on."""

    base: object
    mode: str
    layers: dict[str, tuple[torch.nn.Module, torch.nn.Module]]
    parameters: dict[str, torch.nn.Parameter]
    switch: AdapterSwitch
    patcher: object = field(init=False)

    def __post_init__(self):
        self.patcher = self.install(training=True)

    def install(self, training: bool):
        """A clone of ``base`` with the adapters on; ``training`` makes its weights ones autograd
        can save without copying them (``FrozenAliases``) and guards in-place blocks."""
        patcher = self.base.clone()
        if training:
            aliased = []
            for module_name, module in patcher.model.named_modules():
                for attribute, parameter in module.named_parameters(recurse=False):
                    name = f"{module_name}.{attribute}" if module_name else attribute
                    if self.mode == "weight" and attribute == "weight" and module_name in self.layers:
                        continue  # its SwitchedAdapter detaches it
                    if aliasable(parameter):
                        aliased.append(name)
                    elif hasattr(module, "weight_function"):
                        patcher.add_weight_wrapper(name, AutogradSafeWeight())
            aliases = FrozenAliases(aliased)
            patcher.set_injections(ALIASES_KEY, [PatcherInjection(aliases.inject, aliases.eject)])
            in_place = model_family(patcher.model).in_place_blocks(patcher.model.diffusion_model)
            if in_place:
                patcher.set_injections(BLOCKS_KEY, training_blocks([], in_place))
        if self.mode == "bypass":
            # For sampling, ComfyUI's bypass takes inference adapters (the pack's own bypass, on
            # ComfyUI versions without it, casts either).
            layers = self.layers if training or BypassInjectionManager is None else inference_adapters(self.layers)
            patcher.set_injections(BYPASS_KEY, bypass_injections(patcher.model, layers))
        else:
            for name, (_, adapter) in self.layers.items():
                patcher.add_weight_wrapper(f"{name}.weight", SwitchedAdapter(adapter, self.switch))
        return patcher

    def checkpoint_blocks(self, depth: int) -> int:
        """Checkpoint the training patcher's diffusion model per block at ``depth``; returns the
        number of blocks."""
        diffusion_model = self.patcher.model.diffusion_model
        blocks = modules_at_depth(diffusion_model, depth)
        in_place = model_family(self.patcher.model).in_place_blocks(diffusion_model)
        self.patcher.set_injections(BLOCKS_KEY, training_blocks(blocks, in_place))
        return len(blocks)

    def inference_patcher(self):
        """A clone of ``base`` with the trained adapters on, for sampling (no training wrappers)."""
        return self.install(training=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies in ComfyUI's LORA_MODEL layout (``<module>.lora_up.weight``, ...)."""
        return {key: value.detach().to("cpu", copy=True) for key, value in self.parameters.items()}


def attach_lora(
    model_patcher,
    rank: int,
    alpha: float,
    resume: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None,
    seed: int = 0,
    mode: str = "bypass",
) -> LoraOnModel:
    """Trainable LoRA adapters on every adaptable layer of a clone of ``model_patcher`` (on a
    DiT: its blocks' attention and MLP linears, ``ModelFamily.adapted``).

    New adapters start as ComfyUI's (up: Kaiming-uniform, down: zeros, so the LoRA starts as a
    no-op) with the up matrices drawn from ``seed``, so training is reproducible. Layers in
    ``resume`` (module name -> ``(up, down, alpha)``, from ``lora_files.read_lora_layers``) start
    from those matrices instead.

    A layer too small for ``rank`` (e.g. the UNet's 4-channel output conv) gets its largest
    possible rank, with alpha scaled so its alpha/rank scale stays the same, and a warning.
    Grouped convolutions and non-zero padding modes stay without an adapter in bypass mode.

    Raises:
        InputError: ``rank`` larger than every layer allows, a ``resume`` LoRA that matches
            no layer (or a layer of another shape) of this model, or fp8 weights in weight mode.
    """
    layers: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}
    parameters: dict[str, torch.nn.Parameter] = {}
    matched = 0
    generator = torch.Generator().manual_seed(seed)
    clamped: list[str] = []
    candidates = 0
    family = model_family(model_patcher.model)
    for name, module in model_patcher.model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "weight_function") or weight is None or weight.ndim < 2:
            continue
        if not family.adapted(name):
            continue
        if mode == "bypass" and not bypass_adaptable(module):
            continue
        if mode == "weight" and is_low_precision(weight):
            raise InputError(
                f"layer {name} holds {weight.dtype} weights, which train only in bypass mode; set lora_mode to bypass"
            )
        candidates += 1
        if resume is not None and name in resume:
            up, down, resumed_alpha = resume[name]
            if up.shape[0] != weight.shape[0] or down.shape[1] != math.prod(weight.shape[1:]):
                raise InputError(
                    f"the resume LoRA's layer {name} has another shape than this model's: it was made for another "
                    "model; resume from a LoRA trained on this model, or leave resume_lora empty"
                )
            adapter = LoRAAdapter(set(), (up, down, resumed_alpha, None, None, None)).to_train()
            matched += 1
        else:
            limit = min(weight.shape[0], math.prod(weight.shape[1:]))
            if rank > limit:
                clamped.append(f"{name} ({limit})")
            adapter = LoRAAdapter.create_train(weight, rank=min(rank, limit), alpha=alpha * min(rank, limit) / rank)
            up = torch.empty(adapter.lora_up.weight.shape)
            torch.nn.init.kaiming_uniform_(up, a=5**0.5, generator=generator)
            adapter.lora_up.weight.data.copy_(up)
        adapter = adapter.float()
        adapter.multiplier = 1.0
        for parameter_name, parameter in adapter.named_parameters():
            parameters[f"{name}.{parameter_name}"] = parameter
        layers[name] = (module, adapter)
    if resume is not None and matched == 0:
        raise InputError(
            "the resume LoRA matches no layer of this model: it was made for another model family; resume from "
            "a LoRA trained on this model, or leave resume_lora empty"
        )
    if resume is not None and len(resume) > matched:
        skipped = sorted(set(resume) - set(layers))
        logging.warning(
            "resume_lora: %d layer(s) are not trained in %s mode and are left out: %s", len(skipped), mode, skipped[:5]
        )
    if clamped and len(clamped) == candidates:
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
    switch = AdapterSwitch([adapter for _, adapter in layers.values()])
    return LoraOnModel(model_patcher, mode, layers, parameters, switch)
