"""How well a trained LoRA separates held-out pairs: DPO's implicit accuracy."""

from __future__ import annotations

import comfy.model_management
import torch

from prefpersonalize.pure.pairs import PreferencePairs
from prefpersonalize.trainers.lora_adapters import LoraOnModel, adapter_autocast
from prefpersonalize.trainers.pair_batches import PairBatcher
from prefpersonalize.trainers.timesteps import sample_percents


def implicit_accuracy(
    lora: LoraOnModel,
    pairs: PreferencePairs,
    seed: int = 0,
    repeats: int = 4,
    timestep_start: float = 0.0,
    timestep_end: float = 1.0,
) -> float:
    """Share of (pair, timestep, noise) draws where the LoRA model prefers the winner more than
    the reference does (DPO's implicit reward: inside > 0; exact ties count one half).

    Uses plain (unweighted) errors, so numbers are comparable across loss modes.
    """
    comfy.model_management.load_models_gpu([lora.patcher], force_full_load=True)
    batcher = PairBatcher(lora.patcher, pairs)
    generator = torch.Generator().manual_seed(seed)
    score = total = 0.0
    indices = list(range(len(pairs)))
    count = len(indices)
    # inference_mode(False) turns grad mode back on, so no_grad must come inside it: otherwise every
    # forward built a graph (on Flux, 9 GB held across the evaluation).
    with torch.inference_mode(False), torch.no_grad(), adapter_autocast(lora.patcher):
        for _ in range(repeats):
            percents = sample_percents(count, timestep_start, timestep_end, "uniform", generator)
            batch = batcher.batch(indices, percents, generator)

            def errors(batch=batch):
                return batch.errors(batcher.predict(batch.x_t, batch.sigma, batch.kwargs, batch)).mean(dim=(1, 2, 3))

            with lora.switch.off():
                reference = errors()
            policy = errors()
            inside = -((policy[:count] - policy[count:]) - (reference[:count] - reference[count:]))
            score += float((inside > 0).sum() + 0.5 * (inside == 0).sum())
            total += count
    return score / total
