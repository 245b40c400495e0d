"""DPO losses on tiny tensors: values against hand-written formulas (independent loops) and
gradients against autograd of those formulas, for every loss mode, plus gradcheck."""

import math

import pytest
import torch

from prefpersonalize.pure.focus import blend_focus
from prefpersonalize.trainers.losses import (
    AdaptiveBeta,
    PreferenceLoss,
    PreferenceObjective,
    channel_stats_loss,
    dpo_loss,
    outside_preservation_loss,
    patchdpo_paper_loss,
    weighted_mean,
)


def errors(seed, shape=(2, 2, 2, 3)):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def hand_mean(e, w=None):
    """Per-sample weighted mean written as explicit loops."""
    out = []
    for b in range(e.shape[0]):
        num = den = 0.0
        for c in range(e.shape[1]):
            for y in range(e.shape[2]):
                for x in range(e.shape[3]):
                    weight = 1.0 if w is None else w[b, y, x]
                    num = num + weight * e[b, c, y, x]
                    den = den + weight
        out.append(num / den)
    return out


def hand_dpo(mw, ml, rw, rl, beta, ww=None, wl=None):
    lw, ll, qw, ql = hand_mean(mw, ww), hand_mean(ml, wl), hand_mean(rw, ww), hand_mean(rl, wl)
    total = 0.0
    for b in range(len(lw)):
        inside = -0.5 * beta * ((lw[b] - ll[b]) - (qw[b] - ql[b]))
        total = total + torch.log1p(torch.exp(-inside))  # -log sigmoid(inside)
    return total / len(lw)


def compare_with_hand(ours, hand, inputs):
    value = ours(*inputs)
    expected = hand(*inputs)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
    ours_grads = torch.autograd.grad(value, inputs[:2])
    hand_grads = torch.autograd.grad(hand(*inputs), inputs[:2])
    for a, b in zip(ours_grads, hand_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_weighted_mean_plain_and_weighted():
    e = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert weighted_mean(e).item() == pytest.approx(3.5)
    w = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # only cell (0, 0): values 0 and 4
    assert weighted_mean(e, w).item() == pytest.approx(2.0)


def test_dpo_mode_value_and_gradients():
    mw, ml = errors(0).requires_grad_(), errors(1).requires_grad_()
    rw, rl = errors(2), errors(3)
    compare_with_hand(
        lambda a, b, c, d: dpo_loss(a, b, c, d, beta=3.0).loss,
        lambda a, b, c, d: hand_dpo(a, b, c, d, 3.0),
        (mw, ml, rw, rl),
    )


def test_dpo_hand_numbers_and_diagnostics():
    # L_w = 1, L_l = 2, R_w = R_l = 1.5: inside = -0.5 * 2 * (1 - 2) = 1; loss = log(1 + e^-1).
    ones = torch.ones(1, 1, 1, 1)
    terms = dpo_loss(ones, 2 * ones, 1.5 * ones, 1.5 * ones, beta=2.0)
    assert terms.loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert terms.margin.item() == pytest.approx(1.0) and terms.accuracy.item() == 1.0


def hand_logits(mw, ml, rw, rl, beta):
    lw, ll, qw, ql = hand_mean(mw), hand_mean(ml), hand_mean(rw), hand_mean(rl)
    return [-0.5 * beta * ((lw[b] - ll[b]) - (qw[b] - ql[b])) for b in range(len(lw))]


def test_ipo_value_and_gradients():
    mw, ml = errors(20).requires_grad_(), errors(21).requires_grad_()
    rw, rl = errors(22), errors(23)
    ipo = PreferenceLoss(PreferenceObjective(loss="ipo"))

    def hand(a, b, c, d):
        return sum((z - 0.5) ** 2 for z in hand_logits(a, b, c, d, 3.0)) / a.shape[0]

    compare_with_hand(lambda a, b, c, d: dpo_loss(a, b, c, d, 3.0, preference=ipo).loss, hand, (mw, ml, rw, rl))
    # by hand: L_w = 1, L_l = 2, R_w = R_l = 1.5, beta 2 -> z = 1, loss (1 - 1/2)^2
    ones = torch.ones(1, 1, 1, 1)
    assert dpo_loss(ones, 2 * ones, 1.5 * ones, 1.5 * ones, 2.0, preference=ipo).loss.item() == pytest.approx(0.25)


def test_margin_cap_caps_the_losers_share_and_stops_its_gradient():
    ones = torch.ones(1, 1, 1, 1)
    winner, loser = ones.clone().requires_grad_(), (2 * ones).requires_grad_()
    cap = PreferenceLoss(PreferenceObjective(margin_cap=1.0))
    capped = dpo_loss(winner, loser, 1.5 * ones, 1.5 * ones, 6.0, preference=cap)
    # by hand, beta 6: winner's share 3 * (1 - 1.5) = -1.5, loser's 3 * (2 - 1.5) = 1.5, z = 3;
    # the loser's share capped at 1: the loss is that of 1 + 1.5 = 2.5
    assert capped.loss.item() == pytest.approx(math.log(1 + math.exp(-2.5)))
    assert capped.margin.item() == pytest.approx(3.0)  # the diagnostics report the real margin
    loser_gradient, winner_gradient = torch.autograd.grad(capped.loss, [loser, winner])
    assert loser_gradient.abs().max() == 0 and winner_gradient.abs().max() > 0  # the winner still learns
    below = PreferenceLoss(PreferenceObjective(margin_cap=2.0))  # loser's share 1.5 < 2: plain DPO
    assert dpo_loss(winner, loser, 1.5 * ones, 1.5 * ones, 6.0, preference=below).loss.item() == pytest.approx(
        math.log(1 + math.exp(-3))
    )


def test_supervised_term_on_the_winners():
    mw, ml = errors(24).requires_grad_(), errors(25).requires_grad_()
    rw, rl = errors(26), errors(27)
    preference = PreferenceLoss(PreferenceObjective(supervised_weight=0.25))

    def hand(a, b, c, d):
        winners = hand_mean(a)
        return hand_dpo(a, b, c, d, 4.0) + 0.5 * 4.0 * 0.25 * sum(winners) / len(winners)

    compare_with_hand(lambda a, b, c, d: dpo_loss(a, b, c, d, 4.0, preference=preference).loss, hand, (mw, ml, rw, rl))


def test_adaptive_beta_follows_the_margin_against_its_running_mean():
    preference = PreferenceLoss(PreferenceObjective(adaptive_beta=0.5))
    adaptive = preference.adaptive
    ones = torch.ones(1, 1, 1, 1)
    # first batch: z = 1 (L_w 1, L_l 2, beta 2); the running mean starts there, so beta is unchanged
    first = dpo_loss(ones, 2 * ones, 1.5 * ones, 1.5 * ones, 2.0, preference=preference)
    assert first.margin.item() == pytest.approx(1.0) and adaptive.running_mean == pytest.approx(1.0)
    # second batch: z = 5 at beta 2; M = 0.9 * 1 + 0.1 * 5 = 1.4; factor 1 + 0.5 * (5 - 1.4) = 2.8
    second = dpo_loss(ones, 6 * ones, 1.5 * ones, 1.5 * ones, 2.0, preference=preference)
    assert adaptive.running_mean == pytest.approx(1.4)
    assert second.margin.item() == pytest.approx(5 * 2.8)
    assert second.loss.item() == pytest.approx(math.log(1 + math.exp(-14.0)))
    # clamped to 4x: z = 41 against M = 0.9 * 1.4 + 0.1 * 41 = 5.36 -> 1 + 0.5 * 35.64 > 4
    third = dpo_loss(ones, 42 * ones, 1.5 * ones, 1.5 * ones, 2.0, preference=preference)
    assert third.margin.item() == pytest.approx(41 * 4.0)
    restored = AdaptiveBeta(strength=0.5)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.running_mean == adaptive.running_mean


def test_patch_dpo_mode_value_and_gradients_and_ones_equal_dpo():
    mw, ml = errors(4).requires_grad_(), errors(5).requires_grad_()
    rw, rl = errors(6), errors(7)
    ww, wl = errors(8, (2, 2, 3)), errors(9, (2, 2, 3))
    compare_with_hand(
        lambda a, b, c, d: dpo_loss(a, b, c, d, 2.0, ww, wl).loss,
        lambda a, b, c, d: hand_dpo(a, b, c, d, 2.0, ww, wl),
        (mw, ml, rw, rl),
    )
    ones = torch.ones(2, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(dpo_loss(mw, ml, rw, rl, 2.0, ones, ones).loss, dpo_loss(mw, ml, rw, rl, 2.0).loss)


def test_focus_dpo_weights_value_and_gradients():
    mw, ml = errors(10).requires_grad_(), errors(11).requires_grad_()
    rw, rl = errors(12), errors(13)
    quality, complexity = errors(14, (2, 2, 3)), errors(15, (2, 2, 3))
    progress = torch.tensor([0.1, 0.9])
    focus = blend_focus(1 - quality, complexity, progress).double() + 1e-3
    # Early sample: focus = mismatch only; late sample: (mismatch + complexity) / 2.
    torch.testing.assert_close(focus[0], (1 - quality[0]) + 1e-3)
    torch.testing.assert_close(focus[1], (1 - quality[1] + complexity[1]) / 2 + 1e-3)
    compare_with_hand(
        lambda a, b, c, d: dpo_loss(a, b, c, d, 4.0, focus, focus).loss,
        lambda a, b, c, d: hand_dpo(a, b, c, d, 4.0, focus, focus),
        (mw, ml, rw, rl),
    )


def test_patchdpo_paper_mode_value_and_gradients():
    mw, ml = errors(16).requires_grad_(), errors(17).requires_grad_()
    ww, wl = errors(18, (2, 2, 3)), errors(19, (2, 2, 3))

    def hand(a, b):
        values = []
        for e, w in ((a, ww), (b, wl)):
            for index in range(e.numel()):
                bb, c, y, x = torch.unravel_index(torch.tensor(index), e.shape)
                values.append(w[bb, y, x] * e[bb, c, y, x])
        return sum(values) / len(values)

    compare_with_hand(lambda a, b: patchdpo_paper_loss(a, b, ww, wl), hand, (mw, ml))


def test_hg_dpo_mode_value_and_gradients():
    mw, ml = errors(20).requires_grad_(), errors(21).requires_grad_()
    rw, rl = errors(22), errors(23)
    prediction, target = errors(24).requires_grad_(), errors(25)

    def hand_stats(p, t):
        total = 0.0
        for b in range(p.shape[0]):
            for c in range(p.shape[1]):
                pm, tm = p[b, c].mean(), t[b, c].mean()
                ps = ((p[b, c] - pm) ** 2).sum().div(p[b, c].numel() - 1).sqrt()
                ts = ((t[b, c] - tm) ** 2).sum().div(t[b, c].numel() - 1).sqrt()
                total = total + (pm - tm) ** 2 + (ps - ts) ** 2
        return total / (p.shape[0] * p.shape[1])

    ours = dpo_loss(mw, ml, rw, rl, 5.0).loss + 0.3 * channel_stats_loss(prediction, target)
    hand = hand_dpo(mw, ml, rw, rl, 5.0) + 0.3 * hand_stats(prediction, target)
    torch.testing.assert_close(ours, hand, rtol=1e-9, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(ours, (mw, ml, prediction)), torch.autograd.grad(hand, (mw, ml, prediction)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_outside_preservation_value_gradients_and_hand_numbers():
    policy, reference = errors(35).requires_grad_(), errors(36)
    weights, scale = errors(37, (2, 2, 3)), torch.tensor([2.0, 0.5], dtype=torch.float64).view(2, 1, 1, 1)

    def hand(p):
        diff = (p - reference) ** 2 * scale
        return sum(hand_mean(diff, 1 - weights)) / 2

    compare_with_hand(lambda p: outside_preservation_loss(p, reference, weights, scale), hand, (policy,))
    assert torch.autograd.gradcheck(lambda p: outside_preservation_loss(p, reference, weights, scale), (policy,))
    # Cells weighted 1 are free; a change of 3 on the single 0-weight cell costs 3^2 there.
    changed = torch.zeros(1, 1, 1, 2)
    changed[0, 0, 0, 1] = 3.0
    free = torch.tensor([[[0.0, 1.0]]])
    assert outside_preservation_loss(changed, torch.zeros_like(changed), free).item() == 0.0
    assert outside_preservation_loss(changed, torch.zeros_like(changed), 1 - free).item() == pytest.approx(9.0)
    assert outside_preservation_loss(changed, torch.zeros_like(changed), torch.ones(1, 1, 2)).item() == 0.0


def test_gradcheck_every_loss():
    mw, ml = errors(26).requires_grad_(), errors(27).requires_grad_()
    rw, rl, w = errors(28), errors(29), errors(30, (2, 2, 3))
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, rw, rl, 3.0).loss, (mw, ml))
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, rw, rl, 3.0, w, w).loss, (mw, ml))
    assert torch.autograd.gradcheck(lambda a, b: patchdpo_paper_loss(a, b, w, w), (mw, ml))
    assert torch.autograd.gradcheck(lambda a: channel_stats_loss(a, rw), (mw,))


def test_reference_errors_carry_no_gradient():
    mw, ml = errors(31).requires_grad_(), errors(32).requires_grad_()
    rw, rl = errors(33).requires_grad_(), errors(34).requires_grad_()
    dpo_loss(mw, ml, rw, rl, 2.0).loss.backward()
    assert rw.grad is None and rl.grad is None and mw.grad is not None
