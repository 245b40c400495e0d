"""DreamBench-style personalization metrics (as used by PatchDPO and JeDi): DINO, CLIP-I and
CLIP-T as mean pairwise cosine similarities. These are plain functions on embeddings; where the
embeddings come from is the caller's choice.

Protocol and choices: docs/algorithms.md, section 'Metrics'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import Dinov2PatchBackbone, TunedPatchBackbone
from .errors import InputError


def dreambench_crop(images: torch.Tensor, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Resize the short side to ``resize`` and center-crop ``crop`` x ``crop``.

    Args:
        images: ``[B, 3, H, W]``.

    Returns:
        ``[B, 3, crop, crop]``.
    """
    height, width = images.shape[-2:]
    scale = resize / min(height, width)
    size = (max(crop, round(height * scale)), max(crop, round(width * scale)))
    images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return images[..., top : top + crop, left : left + crop]


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every pair (row of ``a``, row of ``b``).

    Args:
        a: ``[N, D]``; b: ``[M, D]``.
    """
    if a.shape[-1] != b.shape[-1]:
        raise InputError(f"embedding sizes differ ({a.shape[-1]} vs {b.shape[-1]}): the two models are not a pair")
    return float((F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean())


@dataclass
class MetricRow:
    """One metric for the table: its label, value after, optional value before."""

    label: str
    after: float | None
    before: float | None = None
    note: str = ""

    @property
    def delta(self) -> float | None:
        if self.after is None or self.before is None:
            return None
        return self.after - self.before


def format_table(rows: list[MetricRow]) -> str:
    """A plain-text table: metric, after, before, delta (n/a where not computed)."""

    def cell(value):
        return "n/a" if value is None else f"{value:.4f}"

    with_before = any(row.before is not None for row in rows)
    header = ["metric", "value"] + (["before", "delta"] if with_before else [])
    lines = [header]
    for row in rows:
        line = [row.label, cell(row.after)]
        if with_before:
            delta = row.delta
            line += [cell(row.before), "n/a" if delta is None else f"{delta:+.4f}"]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )
    notes = [f"{row.label}: {row.note}" for row in rows if row.note]
    return text + ("\n" + "\n".join(notes) if notes else "")


def metric_row(label: str, embeddings: dict[str, torch.Tensor], targets: torch.Tensor, note: str = "") -> MetricRow:
    """The row of one metric: mean cosine of the ``"after"`` (and, when given, ``"before"``)
    embeddings against ``targets`` (reference image or prompt embeddings, ``[M, D]``)."""
    after = mean_pairwise_cosine(embeddings["after"], targets)
    before = mean_pairwise_cosine(embeddings["before"], targets) if "before" in embeddings else None
    return MetricRow(label, after, before, note=note)


def dino_label(backbone) -> tuple[str, str]:
    """Label and note: real DINO only for DINOv2 backbones; anything else is an approximation."""
    base = backbone.base if isinstance(backbone, TunedPatchBackbone) else backbone
    if isinstance(base, Dinov2PatchBackbone):
        return "DINO", ""
    return "DINO*", (
        f"approximate, from {backbone.name}; put DINOv2 in models/patch_backbones/ for the DreamBench DINO number"
    )
