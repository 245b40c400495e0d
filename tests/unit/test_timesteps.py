"""What a DPO step draws: timestep percents and HG-DPO's curriculum, by hand."""

import pytest
import torch

from prefpersonalize.trainers.timesteps import MAX_PERCENT, curriculum_pool, sample_percents


def test_uniform_percents_fill_the_range_and_follow_the_seed():
    percents = sample_percents(20000, 0.2, 0.6, "uniform", torch.Generator().manual_seed(3))
    assert percents.shape == (20000,)
    assert 0.2 <= float(percents.min()) and float(percents.max()) < 0.6
    assert float(percents.mean()) == pytest.approx(0.4, abs=0.005)
    assert float(percents.var()) == pytest.approx(0.4**2 / 12, rel=0.05)  # uniform on a width-0.4 range
    again = sample_percents(20000, 0.2, 0.6, "uniform", torch.Generator().manual_seed(3))
    torch.testing.assert_close(percents, again)


def test_logit_normal_percents_crowd_the_middle():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_percents(20000, 0.0, 1.0, "uniform", generator)
    logit_normal = sample_percents(20000, 0.0, 1.0, "logit_normal", generator)
    middle = lambda p: float(((p > 0.25) & (p < 0.75)).float().mean())  # noqa: E731
    assert middle(uniform) == pytest.approx(0.5, abs=0.02)
    # sigmoid(z) in (0.25, 0.75) <=> |z| < log(3): P = 2 * Phi(1.0986) - 1 = 0.728 for z ~ N(0, 1).
    assert middle(logit_normal) == pytest.approx(0.728, abs=0.02)
    assert float(logit_normal.mean()) == pytest.approx(0.5, abs=0.01)


def test_percents_stay_below_the_cap_where_sigma_would_be_zero():
    percents = sample_percents(5000, 0.9, 1.0, "uniform", torch.Generator().manual_seed(1))
    assert float(percents.max()) < MAX_PERCENT
    assert float(percents.min()) >= 0.9


def test_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_percents(1, 0.0, 1.0, "cosine", torch.Generator())


STAGES = {"easy": [0, 1], "normal": [2], "hard": [3, 4]}


def test_curriculum_goes_easy_normal_hard_in_thirds():
    pools = [curriculum_pool(STAGES, 5, True, step, 9) for step in range(9)]
    assert pools == [[0, 1]] * 3 + [[2]] * 3 + [[3, 4]] * 3
    # Steps not divisible by three: stage = floor(3 * step / steps).
    assert [curriculum_pool(STAGES, 5, True, step, 4) for step in range(4)] == [[0, 1], [0, 1], [2], [3, 4]]


def test_curriculum_stage_without_pairs_falls_back_to_all():
    stages = {"easy": [0], "hard": [1]}
    assert curriculum_pool(stages, 3, True, 1, 3) == [0, 1, 2]  # no "normal" pairs
    assert curriculum_pool(stages, 3, True, 2, 3) == [1]


def test_without_curriculum_every_pair_every_step():
    assert curriculum_pool(STAGES, 5, False, 0, 9) == [0, 1, 2, 3, 4]
    assert curriculum_pool(STAGES, 5, False, 8, 9) == [0, 1, 2, 3, 4]
