"""Preference pairs made from given latents, for tests and benchmarks."""

from __future__ import annotations

import torch


def uniform_pairs(conditioning, winners: torch.Tensor, losers: torch.Tensor, weights=None, loser_quality=1.0):
    """Pairs of ``winners`` over ``losers`` ``[N, 4, h, w]``, all with ``conditioning``: weight
    maps ``weights`` (broadcast to ``[N, h, w]``; default 1 everywhere), the losers' quality
    ``loser_quality``, their complexity 0.5, "easy" difficulty."""
    from prefpersonalize.pure.pairs import PairMaps, PreferencePairs

    count, _, height, width = winners.shape
    ones = torch.ones(count, height, width)
    weights = ones if weights is None else weights.expand(count, height, width).clone()
    return PreferencePairs(
        winners=winners,
        losers=losers,
        conditionings=[conditioning],
        condition_index=torch.zeros(count, dtype=torch.long),
        maps=PairMaps(
            winner_weights=weights,
            loser_weights=weights,
            loser_quality=ones * loser_quality,
            loser_complexity=ones * 0.5,
        ),
        thumbnails_winner=torch.zeros(count, 3, 8, 8),
        thumbnails_loser=torch.zeros(count, 3, 8, 8),
        metadata=[{"source": "synthetic", "difficulty": "easy"}] * count,
        latent_channels=winners.shape[1],
    )
