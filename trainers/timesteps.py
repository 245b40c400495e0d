"""What a DPO step draws: the sampling percents pairs are noised at, and the pairs it draws from
(HG-DPO's curriculum). See docs/algorithms.md, section 'Timestep sampling and the HG-DPO curriculum'."""

from __future__ import annotations

import torch

TIMESTEP_SAMPLING = ("uniform", "logit_normal")

# Percents are drawn below this cap: percent 1 is sigma 0 (no noise), where every prediction
# error is 0 and the eps / velocity scale 1 / sigma is undefined.
MAX_PERCENT = 0.999

CURRICULUM_STAGES = ("easy", "normal", "hard")


def sample_percents(count: int, start: float, end: float, sampling: str, generator: torch.Generator) -> torch.Tensor:
    """Timestep percents in ``[start, min(end, MAX_PERCENT))`` (ComfyUI's convention: 0 = the
    noisiest step), uniform or logit-normal (middle-heavy, as SD3's training).

    Returns:
        ``[count]`` float.
    """
    if sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"unknown timestep sampling {sampling!r}; expected one of {TIMESTEP_SAMPLING}")
    end = min(end, MAX_PERCENT)
    if sampling == "logit_normal":
        unit = torch.sigmoid(torch.randn(count, generator=generator))
    else:
        unit = torch.rand(count, generator=generator)
    return start + (end - start) * unit


def curriculum_pool(stages: dict[str, list[int]], count: int, curriculum: bool, step: int, steps: int) -> list[int]:
    """Pair indices to draw from at ``step`` (0-based) of ``steps``.

    With ``curriculum`` (HG-DPO), the run goes easy -> normal -> hard in equal thirds; a stage
    with no pairs falls back to all pairs. Without, every one of the ``count`` pairs.

    Args:
        stages: difficulty -> pair indices (``PreferencePairs.difficulty_indices()``).
    """
    everything = list(range(count))
    if not curriculum:
        return everything
    stage = CURRICULUM_STAGES[min(2, 3 * step // max(steps, 1))]
    return stages.get(stage) or everything
