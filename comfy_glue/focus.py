"""Focus Regions' link to a sampler: which sampling progress each strip frame shows."""

from __future__ import annotations

import torch

from ..pure.focus import percent_for_sigma


def strip_progress(frames: int, sigmas: torch.Tensor | None, model) -> list[tuple[float, str]]:
    """``(progress, label)`` for each strip frame: evenly spaced percents, or the given sigmas
    (percent from the MODEL's own schedule when one is connected, else the step fraction)."""
    if sigmas is None or len(sigmas) < 2:
        values = torch.linspace(0, 1, frames).tolist()
        return [(value, f"p={value:.2f}") for value in values]
    steps = len(sigmas) - 1  # the last sigma is where sampling ends
    picks = sorted({round(index) for index in torch.linspace(0, steps - 1, min(frames, steps)).tolist()})
    if model is not None:
        sampling = model.get_model_object("model_sampling")
        percents = [percent_for_sigma(float(sigmas[index]), sampling.percent_to_sigma) for index in picks]
    else:
        percents = [index / max(steps - 1, 1) for index in picks]
    return [
        (percent, f"step {index + 1}/{steps} p={percent:.2f}") for index, percent in zip(picks, percents, strict=True)
    ]
