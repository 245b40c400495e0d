"""Personalization Metrics' CLIP-T: the prompt's embedding from a ComfyUI CLIP text encoder."""

from __future__ import annotations

import torch

from ..pure.errors import InputError
from ..pure.metrics import MetricRow, metric_row


def clip_t_row(image_embeddings: dict[str, torch.Tensor], clip, prompt: str) -> MetricRow:
    """CLIP-T: the images' CLIP embeddings against the prompt's pooled CLIP text embedding, or a
    row that says what is missing."""
    if clip is None or not prompt.strip():
        return MetricRow("CLIP-T", None, note="connect the CLIP text encoder and write the prompt")
    _, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    text = pooled.float().reshape(1, -1).cpu()
    try:
        return metric_row("CLIP-T", image_embeddings, text)
    except InputError as error:
        return MetricRow("CLIP-T", None, note=f"{error}; use the CLIP text encoder of the same CLIP model")
