"""A training run's progress reporter: the one object the loop reports to after every step
(``train_dpo_lora(..., progress=...)``), for both doors to the trainer. The node shows ComfyUI's
progress bar through ``show``; the headless runner has the log lines and checkpoints alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .training_state import TrainingState, state_path, write_state

if TYPE_CHECKING:
    from .lora_adapters import LoraOnModel

LOG_EVERY = 25

# save(lora, step, stem) -> the path written
SaveLora = Callable[["LoraOnModel", int, str], str]
# show(step, history of each metric, the LoRA after the step): the node's progress bar and
# previews; it may raise to stop the run
ShowProgress = Callable[[int, dict[str, list[float]], "LoraOnModel"], None]
# the run's resumable state after the last step (DPOTrainer.training_state)
StateAfterStep = Callable[[], TrainingState]


class TrainingProgress:
    """After each of a run's ``steps``: a checkpoint LoRA every ``save_every`` steps (0 = none),
    written by ``save`` as ``<name>_stepNNNNN`` with the training state beside it
    (``<name>_stepNNNNN.state.safetensors``, where the trainer reports one; ``checkpoint_last=False``:
    none at the last step, where the caller writes the final LoRA anyway); a log line, headed
    ``label`` (default ``name``), on the first and last step and every ``log_every`` steps (0 =
    none); then ``show``. Names and log lines count on from the steps a resumed run continues
    (``start``). The last completed step's LoRA is kept for ``save_last_good_lora`` (Cancel)."""

    def __init__(
        self,
        steps: int,
        *,
        name: str = "dpo_lora",
        save: SaveLora | None = None,
        save_every: int = 0,
        checkpoint_last: bool = True,
        show: ShowProgress | None = None,
        log_every: int = LOG_EVERY,
        label: str | None = None,
    ):
        self.steps, self.name, self.save, self.show = steps, name, save, show
        self.label = label or name
        self.save_every = save_every if save is not None else 0
        self.checkpoint_last, self.log_every = checkpoint_last, log_every
        self.steps_before = 0  # set by ``start``
        self.history: dict[str, list[float]] = {}
        self.last_step, self.last_lora = 0, None

    def start(self, steps_before: int) -> None:
        """The trainer's report before the first step: the steps of the runs it continues."""
        self.steps_before = steps_before

    def after_step(
        self, step: int, metrics: dict[str, float], lora: LoraOnModel, state: StateAfterStep | None = None
    ) -> None:
        """Report this run's step ``step`` (1-based) with its metrics; ``lora`` is the LoRA after
        it, ``state`` gives the run's resumable state."""
        self.last_step, self.last_lora = step, lora
        for metric, value in metrics.items():
            self.history.setdefault(metric, []).append(value)
        last = step == self.steps
        if self.save_every and step % self.save_every == 0 and (self.checkpoint_last or not last):
            path = self.save(lora, self.steps_before + step, f"{self.name}_step{self.steps_before + step:05d}")
            if state is not None:
                write_state(state(), state_path(path))
        if self.log_every and (step == 1 or step % self.log_every == 0 or last):
            logging.info(
                "%s: step %d/%d loss %.4f accuracy %.2f margin %.3f",
                self.label,
                self.steps_before + step,
                self.steps_before + self.steps,
                metrics["loss"],
                metrics["accuracy"],
                metrics["margin"],
            )
        if self.show is not None:
            self.show(step, self.history, lora)

    def save_last_good_lora(self) -> str | None:
        """After Cancel: write the last completed step's LoRA as ``<name>_interrupted_stepNNNNN``."""
        if self.last_lora is None or self.save is None:
            return None
        step = self.steps_before + self.last_step
        path = self.save(self.last_lora, step, f"{self.name}_interrupted_step{step:05d}")
        logging.warning(
            "%s: cancelled after %d steps; saved the last good LoRA to %s", self.label, self.last_step, path
        )
        return path
