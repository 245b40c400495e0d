"""The trainer's options: the DPO LoRA Trainer's inputs by name, turned into one run's settings.

Both doors to the trainer read their options here: the node (its inputs) and the headless runner
(a job file's ``options`` and the command's flags), so they default and validate alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..pure.errors import InputError
from .loop import TRAINING_DTYPES, DPOTrainingConfig, resolve_dtype
from .lora_adapters import LORA_MODES
from .losses import LOSS_MODES, PREFERENCE_LOSSES
from .timesteps import TIMESTEP_SAMPLING

# DPOTrainingConfig's fields that are no option: training_dtype chooses dtype; the focus gate is
# not a node input.
NOT_OPTIONS = ("dtype", "focus_gate")
CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DPOTrainingConfig) if f.name not in NOT_OPTIONS}
# Every option with its default: the trainer node's inputs (a test checks that they agree).
OPTIONS = {**CONFIG_DEFAULTS, "training_dtype": "auto", "save_every": 0}
CHOICES = {
    "loss_mode": LOSS_MODES,
    "preference_loss": PREFERENCE_LOSSES,
    "timestep_sampling": TIMESTEP_SAMPLING,
    "training_dtype": tuple(TRAINING_DTYPES),
    "lora_mode": LORA_MODES,
}
LEAST = {"steps": 1, "rank": 1, "batch_size": 1, "grad_accumulation": 1, "checkpoint_depth": 1, "save_every": 0}


@dataclass(frozen=True)
class TrainingSettings:
    """One run's settings: the loop's config, and every how many steps a checkpoint LoRA is saved
    (0 = none)."""

    config: DPOTrainingConfig
    save_every: int = 0


def check_options(options: dict) -> dict:
    """``options`` (any of ``OPTIONS`` by name) completed with the defaults.

    Raises:
        InputError: an unknown name, a choice not offered, a count below its least, or a timestep
            range that is empty.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown training options {unknown}; the options are {sorted(OPTIONS)}")
    options = {**OPTIONS, **options}
    for name, choices in CHOICES.items():
        if options[name] not in choices:
            raise InputError(f"{name} {options[name]!r} is not one of {', '.join(choices)}")
    for name, least in LEAST.items():
        if options[name] < least:
            raise InputError(f"{name} is {options[name]}; set it to at least {least}")
    start, end = options["timestep_start"], options["timestep_end"]
    if end <= start:
        raise InputError(f"timestep_end ({end}) must be above timestep_start ({start}).")
    return options


def training_settings(options: dict, device: torch.device, model_dtype: torch.dtype | None = None) -> TrainingSettings:
    """A run's settings from the trainer's options by name (``check_options``); ``training_dtype``
    is resolved for ``device`` and the model's own ``model_dtype``."""
    options = check_options(options)
    config = DPOTrainingConfig(
        **{name: options[name] for name in CONFIG_DEFAULTS},
        dtype=resolve_dtype(options["training_dtype"], device, model_dtype),
    )
    return TrainingSettings(config, save_every=options["save_every"])
