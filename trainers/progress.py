"""A training run's progress reporter: the one object the loop reports to after every step
(``train_dpo_lora(..., progress=...)``), for both doors to the trainer. The node shows ComfyUI's
progress bar through ``show``; the headless runner has the log lines and checkpoints alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lora_adapters import LoraOnModel

LOG_EVERY = 25

# save(lora, step, stem) -> the path written
SaveLora = Callable[["LoraOnModel", int, str], str]
# show(step, history of each metric): the node's progress bar; it may raise to stop the run
ShowProgress = Callable[[int, dict[str, list[float]]], None]


class TrainingProgress:
    """After each of a run's ``steps``: a checkpoint LoRA every ``save_every`` steps (0 = none),
    written by ``save`` as ``<name>_stepNNNNN`` (``checkpoint_last=False``: none at the last step,
    where the caller writes the final LoRA anyway); a log line, headed ``label`` (default
    ``name``), on the first and last step and every ``log_every`` steps (0 = none); then ``show``.
    The last completed step's LoRA is kept for ``save_last_good_lora`` (Cancel)."""

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
        self.history: dict[str, list[float]] = {}
        self.last_step, self.last_lora = 0, None

    def after_step(self, step: int, metrics: dict[str, float], lora: LoraOnModel) -> None:
        """Report step ``step`` (1-based) with its metrics; ``lora`` is the LoRA after it."""
        self.last_step, self.last_lora = step, lora
        for metric, value in metrics.items():
            self.history.setdefault(metric, []).append(value)
        last = step == self.steps
        if self.save_every and step % self.save_every == 0 and (self.checkpoint_last or not last):
            self.save(lora, step, f"{self.name}_step{step:05d}")
        if self.log_every and (step == 1 or step % self.log_every == 0 or last):
            logging.info(
                "%s: step %d/%d loss %.4f accuracy %.2f margin %.3f",
                self.label,
                step,
                self.steps,
                metrics["loss"],
                metrics["accuracy"],
                metrics["margin"],
            )
        if self.show is not None:
            self.show(step, self.history)

    def save_last_good_lora(self) -> str | None:
        """After Cancel: write the last completed step's LoRA as ``<name>_interrupted_stepNNNNN``."""
        if self.last_lora is None or self.save is None:
            return None
        path = self.save(self.last_lora, self.last_step, f"{self.name}_interrupted_step{self.last_step:05d}")
        logging.warning(
            "%s: cancelled after %d steps; saved the last good LoRA to %s", self.label, self.last_step, path
        )
        return path
