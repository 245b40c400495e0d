"""Diffusion-DPO losses, plain and patch-weighted (no ComfyUI here).

Errors come in as per-element squared errors ``[B, C, h, w]`` in the model's target space
(``e_*`` the policy's, ``r_*`` the reference's, LoRA off), so every mode (``LOSS_MODES``) can
weight them per latent cell before the mean; the outside-preservation and colour-statistics
terms are optional additions the trainer makes.

Formulas and choices: docs/algorithms.md, section 'Diffusion-DPO and the loss modes'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_MODES = ("dpo", "patch_dpo", "patchdpo_paper", "focus_dpo", "hg_dpo")
# How the DPO logit z becomes a loss: Diffusion-DPO's -log sigmoid(z), or IPO's (z - 1/2)^2.
PREFERENCE_LOSSES = ("sigmoid", "ipo")
IPO_TARGET = 0.5
# beta-DPO: the batch's beta stays within [beta / 4, 4 beta]; its running mean's momentum.
ADAPTIVE_BETA_RANGE = (0.25, 4.0)
ADAPTIVE_BETA_MOMENTUM = 0.9
# The supervised term is scaled like the DPO logit (0.5 * beta * error), so its weight means the
# same at every beta.
SUPERVISED_SCALE_PER_BETA = 0.5


def weighted_mean(errors: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of ``errors`` over (c, h, w), weighted per latent cell.

    Args:
        errors: ``[B, C, h, w]``.
        weights: ``[B, h, w]`` (or None for the plain mean); broadcast over channels.

    Returns:
        ``[B]``: ``sum(W * e) / sum(W)`` with W repeated over C (plain mean when W is None).
    """
    if weights is None:
        return errors.mean(dim=(1, 2, 3))
    weights = weights.to(errors.dtype).unsqueeze(1).expand_as(errors)
    return (weights * errors).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp(min=1e-8)


@dataclass
class DPOTerms:
    """Loss and the diagnostics worth logging (each a scalar tensor, the loss has a graph)."""

    loss: torch.Tensor
    model_winner: torch.Tensor
    model_loser: torch.Tensor
    reference_winner: torch.Tensor
    reference_loser: torch.Tensor
    margin: torch.Tensor
    accuracy: torch.Tensor


@dataclass(frozen=True)
class PreferenceObjective:
    """How the DPO logit ``z = -0.5 * beta * ((l_w - l_l) - (r_w - r_l))`` becomes the loss.

    Attributes:
        loss: ``"sigmoid"`` (Diffusion-DPO, ``-log sigmoid(z)``) or ``"ipo"`` (``(z - 1/2)^2``).
        margin_cap: c > 0 caps the loser's share of z, ``0.5 * beta * (l_l - r_l)``, at c (no
            gradient beyond it): a pair stops pushing the policy's error on its loser up once it
            is that far above the reference's, and z grows further only by fitting the winner;
            0 = no cap (``dpo_loss``).
        supervised_weight: s of the supervised term on the winners, ``0.5 * beta * s * l_w``.
        adaptive_beta: alpha of beta-DPO (``AdaptiveBeta``); 0 = a fixed beta.
    """

    loss: str = "sigmoid"
    margin_cap: float = 0.0
    supervised_weight: float = 0.0
    adaptive_beta: float = 0.0

    def per_sample(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]`` logits z -> ``[B]`` losses."""
        if self.loss == "ipo":
            return (logits - IPO_TARGET) ** 2
        return -F.logsigmoid(logits)


class AdaptiveBeta:
    """beta-DPO's batch-level beta: ``beta_batch = beta * (1 + alpha * (mean(z) - M))``, with z
    the batch's logits at the base beta and M their running mean (momentum 0.9, starting at the
    first batch's mean), clamped to ``[beta / 4, 4 beta]``. Batches whose pairs the model already
    tells apart more than usual get a larger beta, harder ones a smaller one.

    Args:
        strength: alpha (> 0).
    """

    def __init__(self, strength: float):
        self.strength = strength
        self.running_mean: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B]`` logits at the base beta -> the factor on beta (a 0-d tensor); updates M."""
        mean = logits.detach().mean()
        if self.running_mean is None:
            self.running_mean = float(mean)
        self.running_mean = ADAPTIVE_BETA_MOMENTUM * self.running_mean + (1 - ADAPTIVE_BETA_MOMENTUM) * float(mean)
        return (1 + self.strength * (mean - self.running_mean)).clamp(*ADAPTIVE_BETA_RANGE)

    def state_dict(self) -> dict:
        return {"running_mean": self.running_mean}

    def load_state_dict(self, state: dict) -> None:
        self.running_mean = state["running_mean"]


class PreferenceLoss:
    """One run's loss of the DPO logits: its ``objective`` and, where ``adaptive_beta`` is on,
    beta-DPO's running state (``adaptive``)."""

    def __init__(self, objective: PreferenceObjective = PreferenceObjective()):
        self.objective = objective
        self.adaptive = AdaptiveBeta(objective.adaptive_beta) if objective.adaptive_beta > 0 else None


def dpo_loss(
    model_winner: torch.Tensor,
    model_loser: torch.Tensor,
    reference_winner: torch.Tensor,
    reference_loser: torch.Tensor,
    beta: float,
    winner_weights: torch.Tensor | None = None,
    loser_weights: torch.Tensor | None = None,
    *,
    preference: PreferenceLoss | None = None,
) -> DPOTerms:
    """Diffusion-DPO on per-element squared errors, optionally patch-weighted.

    Args:
        model_winner, model_loser: ``[B, C, h, w]`` policy errors.
        reference_winner, reference_loser: ``[B, C, h, w]`` reference errors (no graph needed).
        beta: DPO temperature (5000 for SD1.5/SDXL eps models with the 0.5 kept, as here).
        winner_weights, loser_weights: optional ``[B, h, w]`` maps (``patch_dpo``/``focus_dpo``).
        preference: the loss of the logits and the terms added to it (default: Diffusion-DPO's).
    """
    preference = preference or PreferenceLoss()
    objective = preference.objective
    l_w, l_l = weighted_mean(model_winner, winner_weights), weighted_mean(model_loser, loser_weights)
    r_w, r_l = weighted_mean(reference_winner, winner_weights), weighted_mean(reference_loser, loser_weights)
    winner_side = 0.5 * beta * (l_w - r_w.detach())
    loser_side = 0.5 * beta * (l_l - r_l.detach())
    inside = loser_side - winner_side  # = -0.5 * beta * ((l_w - l_l) - (r_w - r_l))
    logits = inside
    if objective.margin_cap > 0:
        logits = loser_side.clamp(max=objective.margin_cap) - winner_side
    if preference.adaptive is not None:
        factor = preference.adaptive(inside)
        inside, logits = inside * factor, logits * factor
    loss = objective.per_sample(logits).mean()
    if objective.supervised_weight > 0:
        loss = loss + SUPERVISED_SCALE_PER_BETA * beta * objective.supervised_weight * l_w.mean()
    return DPOTerms(
        loss=loss,
        model_winner=l_w.mean().detach(),
        model_loser=l_l.mean().detach(),
        reference_winner=r_w.mean().detach(),
        reference_loser=r_l.mean().detach(),
        margin=inside.mean().detach(),
        accuracy=(inside > 0).float().mean().detach(),
    )


def patchdpo_paper_loss(
    model_winner: torch.Tensor,
    model_loser: torch.Tensor,
    winner_weights: torch.Tensor | None = None,
    loser_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """PatchDPO's released weighted MSE: ``mean(cat(W_w * e_w, W_l * e_l))``.

    Args:
        model_winner, model_loser: ``[B, C, h, w]`` policy errors.
        winner_weights, loser_weights: ``[B, h, w]`` maps (ones when None); the trainer passes
            the winner's weights and the loser's patch quality (PatchDPO weights the generated
            image's errors by its quality map G).
    """

    def weighted(errors, weights):
        return errors if weights is None else errors * weights.to(errors.dtype).unsqueeze(1)

    return torch.cat(
        [weighted(model_winner, winner_weights).flatten(), weighted(model_loser, loser_weights).flatten()]
    ).mean()


def outside_preservation_loss(
    policy: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Keep the policy's prediction equal to the reference's where the weights are low.

    Patch weights only choose which cells the preference is read from; a LoRA's weights are
    shared by every cell, so without this a learned change shows wherever the model draws the
    same kind of content, weighted or not. This anchors the unweighted cells:
    ``P = mean_b( sum((1 - W) * s * (p - r)^2) / sum(1 - W) )`` over (c, h, w), W clamped to
    [0, 1] and broadcast over channels, s the target-space scale. A sample whose map is 1
    everywhere contributes 0. The trainer adds ``0.5 * beta * strength * P``, so ``strength``
    is on the scale of the DPO term's initial gradient whatever beta is.

    Args:
        policy, reference: ``[B, C, h, w]`` predictions (the reference without a graph).
        weights: ``[B, h, w]`` the same maps the DPO term used.
        scale: ``[B, 1, 1, 1]`` (or a float) target-space factor of squared errors.
    """
    squared = (policy - reference.detach()) ** 2 * scale
    return weighted_mean(squared, 1.0 - weights.clamp(0, 1)).mean()


def channel_stats_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """HG-DPO's colour-statistics matching, on latents: squared differences of per-channel
    means and standard deviations over (h, w), averaged over batch and channels.

    Args:
        predicted, target: ``[B, C, h, w]``.
    """
    mean_p, mean_t = predicted.mean(dim=(2, 3)), target.mean(dim=(2, 3))
    std_p, std_t = predicted.std(dim=(2, 3)), target.std(dim=(2, 3))
    return ((mean_p - mean_t) ** 2 + (std_p - std_t) ** 2).mean()
