"""A training run's resumable state, in one safetensors file beside the run's LoRA
(``<lora stem>.state.safetensors``): the LoRA's own tensors, AdamW's moments, the steps done, the
random generator, beta-DPO's running mean, the options and the model's fingerprint. A run given
the state continues as if it had never stopped; both doors to the trainer (node and headless
runner) read and write it.

Docs: docs/algorithms.md, section 'Resumable training'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import safetensors.torch
import torch

from ..pure.errors import InputError
from ..pure.files import write_atomically

STATE_SUFFIX = ".state.safetensors"
FORMAT = "prefp-training-state-1"
# Settings a resumed run may change: how long it trains and those that change only memory. Every
# other setting must be the state's.
CHANGEABLE_ON_RESUME = ("steps", "gradient_checkpointing", "checkpoint_depth")


@dataclass
class TrainingState:
    """What a run needs to continue.

    Attributes:
        lora: the LoRA's tensors (``LoraOnModel.state_dict()``, ComfyUI keys).
        optimizer: AdamW's per-LoRA-key moments: key -> ``{"exp_avg", "exp_avg_sq", "step"}``.
        steps_done: optimizer steps trained so far, over every run that led here.
        generator: the CPU generator's state (``torch.Generator.get_state()``).
        adaptive_mean: beta-DPO's running mean, or None.
        grad_scaler: the fp16 gradient scaler's state (``GradScaler.state_dict()``), or None.
        options: the run's ``DPOTrainingConfig`` as plain values (``config_values``).
        model: the model's fingerprint (``model_fingerprint``).
    """

    lora: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]]
    steps_done: int
    generator: torch.Tensor
    adaptive_mean: float | None
    grad_scaler: dict | None
    options: dict
    model: str


def config_values(config) -> dict:
    """A ``DPOTrainingConfig`` as JSON values (the dtype by name)."""
    values = dataclasses.asdict(config)
    values["dtype"] = str(config.dtype).removeprefix("torch.")
    values["focus_gate"] = list(config.focus_gate)
    return values


def model_fingerprint(model_patcher) -> str:
    """A short hash of what a LoRA is trained on: the model's class, the names and shapes of its
    weights, and the patches (LoRAs) already on it. Not the weights' values: ComfyUI patches the
    shared weights in place for whichever clone it loaded last, so they change between runs of
    one model; two checkpoints of one architecture are therefore not told apart."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    described = {
        "class": type(model_patcher.model).__name__,
        "weights": sorted((name, list(value.shape)) for name, value in diffusion_model.state_dict().items()),
        "patches": sorted(model_patcher.patches),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def state_path(lora_path: str) -> str:
    """The state file beside a LoRA file."""
    return lora_path.removesuffix(".safetensors") + STATE_SUFFIX


def write_state(state: TrainingState, path: str) -> str:
    """Write ``state`` to ``path`` atomically; returns the path."""
    tensors = {f"lora.{key}": value.contiguous() for key, value in state.lora.items()}
    for key, moments in state.optimizer.items():
        for name, value in moments.items():
            tensors[f"optimizer.{key}.{name}"] = value.detach().to("cpu").contiguous()
    tensors["generator"] = state.generator
    header = {
        "steps_done": state.steps_done,
        "adaptive_mean": state.adaptive_mean,
        "grad_scaler": state.grad_scaler,
        "options": state.options,
        "model": state.model,
    }
    metadata = {"format": FORMAT, "state": json.dumps(header)}
    return write_atomically(path, lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata))


def read_state(path: str) -> TrainingState:
    """The state in ``path``; ``InputError`` for a missing, unreadable or foreign file."""
    if not os.path.isfile(path):
        raise InputError(f"the training state '{path}' does not exist; pick one saved by a run with save_every")
    try:
        with safetensors.safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        header = json.loads(metadata["state"]) if metadata.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, safetensors.SafetensorError) as error:
        raise InputError(f"'{os.path.basename(path)}' is not a readable training state ({error})") from error
    if header is None or "generator" not in tensors:
        raise InputError(f"'{os.path.basename(path)}' is not a training state saved by the DPO LoRA Trainer")
    lora = {key.removeprefix("lora."): value for key, value in tensors.items() if key.startswith("lora.")}
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            lora_key, _, name = key.removeprefix("optimizer.").rpartition(".")
            optimizer.setdefault(lora_key, {})[name] = value
    return TrainingState(
        lora=lora,
        optimizer=optimizer,
        steps_done=int(header["steps_done"]),
        generator=tensors["generator"],
        adaptive_mean=header["adaptive_mean"],
        grad_scaler=header.get("grad_scaler"),
        options=header["options"],
        model=header["model"],
    )


def check_resumable(state: TrainingState, options: dict, fingerprint: str) -> None:
    """``InputError`` naming what differs when ``state`` was saved with other settings
    (``options``: ``config_values`` of this run; beyond ``CHANGEABLE_ON_RESUME``) or for another
    model."""
    if state.model != fingerprint:
        raise InputError(
            "the training state was saved for another model (or the same one with other LoRAs on it); "
            "connect the MODEL it was trained on, or start without resume_state"
        )
    options = json.loads(json.dumps(options))  # as the state file holds them (tuples become lists)
    differing = sorted(
        name
        for name in set(state.options) | set(options)
        if name not in CHANGEABLE_ON_RESUME and state.options.get(name) != options.get(name)
    )
    if differing:
        changes = ", ".join(f"{name} {state.options.get(name)!r} -> {options.get(name)!r}" for name in differing)
        raise InputError(
            f"the training state was saved with other options ({changes}); set them back to resume, or start "
            f"without resume_state (only {', '.join(CHANGEABLE_ON_RESUME)} may change)"
        )
