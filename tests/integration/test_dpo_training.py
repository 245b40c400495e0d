"""The DPO LoRA trainer on ComfyUI's real model classes (tiny SD1.5 checkpoint, CPU,
in-process): it learns a synthetic preference, every loss mode runs, it is deterministic, never
touches the input MODEL, and its LoRA loads like any LoRA."""
import os

import pytest
import torch

from comfy_server import DEFAULT_CACHE, comfyui_path
from tiny_checkpoint import ensure_checkpoint

pytestmark = pytest.mark.server

LATENT = (4, 8, 8)  # 64 px images


@pytest.fixture(scope="module")
def tiny(comfy_modules):
    import comfy.sd

    path = ensure_checkpoint(comfyui_path(), os.path.join(DEFAULT_CACHE, "checkpoints"))
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
    return model, [[cond, {"pooled_output": pooled}]]


def synthetic_pairs(conditioning, count, seed, region=None, weights_region=None):
    """Winners = losers + 1.5 on latent channel 0 (inside ``region`` if given): a visual property
    the tiny model can learn. ``weights_region`` puts weight 1 there and 0 elsewhere."""
    from pack.trainers.preference_pairs import PreferencePairs

    generator = torch.Generator().manual_seed(seed)
    losers = torch.randn(count, *LATENT, generator=generator) * 0.6
    winners = losers.clone()
    mask = torch.zeros(LATENT[1:]) if region is not None else torch.ones(LATENT[1:])
    if region is not None:
        mask[region] = 1
    winners[:, 0] += 1.5 * mask
    ones = torch.ones(count, *LATENT[1:])
    weights = ones
    if weights_region is not None:
        weights = torch.zeros_like(ones)
        weights[(slice(None), *weights_region)] = 1
    return PreferencePairs(
        winners=winners, losers=losers, conditionings=[conditioning],
        condition_index=torch.zeros(count, dtype=torch.long), winner_weights=weights, loser_weights=weights,
        winner_quality=ones, loser_quality=ones, winner_complexity=ones * 0.5, loser_complexity=ones * 0.5,
        thumbnails_winner=torch.zeros(count, 3, 8, 8), thumbnails_loser=torch.zeros(count, 3, 8, 8),
        metadata=[{"source": "synthetic", "difficulty": "easy"}] * count, latent_channels=4)


def config(**overrides):
    from pack.trainers.lora_dpo import DPOTrainingConfig

    values = dict(loss_mode="dpo", beta=2000.0, steps=30, learning_rate=5e-4, rank=4, alpha=4.0, batch_size=4,
                  seed=0, timestep_start=0.2, timestep_end=0.95)
    values.update(overrides)
    return DPOTrainingConfig(**values)


def base_prediction(patcher, x, sigma, conditioning):
    """x0 prediction of a (loaded) patcher, through the same helpers the trainer uses."""
    import comfy.model_management

    from pack.trainers.lora_dpo import batch_kwargs, conditioning_batches

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    conds = conditioning_batches(patcher.model, [conditioning], LATENT, patcher.load_device)
    kwargs = batch_kwargs(conds, [0] * x.shape[0], patcher.load_device)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, **kwargs).float()


def test_learns_a_synthetic_preference(tiny):
    from pack.trainers.lora_dpo import attach_lora, implicit_accuracy, train_dpo_lora

    model, conditioning = tiny
    train, held_out = synthetic_pairs(conditioning, 16, seed=1), synthetic_pairs(conditioning, 16, seed=2)
    untrained = attach_lora(model, rank=4, alpha=4.0)
    before = implicit_accuracy(untrained, held_out)
    result = train_dpo_lora(model, train, config(steps=30, beta=500.0, learning_rate=1e-4,
                                                 timestep_start=0.0, timestep_end=1.0))
    after = implicit_accuracy(result.lora, held_out)
    assert before == pytest.approx(0.5)  # policy == reference: every draw is a tie
    assert after >= 0.9, (before, after, result.history["accuracy"][-5:])

    # What the model makes of noisy held-out losers moves toward the winners' property (latent
    # channel 0 up), at every noise level. (Full multi-step samples of a random-weight model are
    # not a meaningful target: its reference is not a denoiser, so their drift has no stable sign.)
    generator = torch.Generator().manual_seed(11)
    losers = held_out.losers * 0.18215  # SD1.5 latent scaling, as the trainer applies it
    for sigma in (14.0, 5.0, 2.0, 0.5):
        x = losers + sigma * torch.randn(losers.shape, generator=generator)
        sigmas = torch.full((x.shape[0],), sigma)
        base = base_prediction(model, x, sigmas, conditioning)[:, 0].mean().item()
        trained = base_prediction(result.lora.patcher, x, sigmas, conditioning)[:, 0].mean().item()
        assert trained > base + 0.02, (sigma, base, trained)


def test_deterministic_and_input_model_untouched(tiny):
    from pack.trainers.lora_dpo import train_dpo_lora

    model, conditioning = tiny
    pairs = synthetic_pairs(conditioning, 4, seed=5)
    x, sigma = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(0)), torch.tensor([2.0])
    before = base_prediction(model, x, sigma, conditioning)
    first = train_dpo_lora(model, pairs, config(steps=3, loss_mode="patch_dpo")).lora.state_dict()
    second = train_dpo_lora(model, pairs, config(steps=3, loss_mode="patch_dpo")).lora.state_dict()
    assert first.keys() == second.keys() and len(first) > 10
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    torch.testing.assert_close(base_prediction(model, x, sigma, conditioning), before, rtol=0, atol=0)
    assert not model.weight_wrapper_patches


def test_saved_lora_loads_like_the_trained_model(tiny):
    import comfy.sd

    from pack.trainers.lora_dpo import train_dpo_lora

    model, conditioning = tiny
    result = train_dpo_lora(model, synthetic_pairs(conditioning, 4, seed=6), config(steps=4, learning_rate=2e-3))
    loaded, _ = comfy.sd.load_lora_for_models(model, None, result.lora.state_dict(), 1.0, 0)
    x, sigma = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1)), torch.tensor([1.5, 4.0])
    trained = base_prediction(result.lora.patcher, x, sigma, conditioning)
    via_loader = base_prediction(loaded, x, sigma, conditioning)
    base = base_prediction(model, x, sigma, conditioning)
    assert (trained - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(via_loader, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["patchdpo_paper", "focus_dpo", "hg_dpo"])
def test_every_mode_runs_and_logs(tiny, mode):
    from pack.trainers.lora_dpo import METRICS, train_dpo_lora

    model, conditioning = tiny
    pairs = synthetic_pairs(conditioning, 6, seed=7)
    pairs.metadata = [{"difficulty": d} for d in ("easy", "easy", "normal", "normal", "hard", "hard")]
    result = train_dpo_lora(model, pairs, config(loss_mode=mode, steps=3, batch_size=2, grad_accumulation=2))
    assert set(result.history) == set(METRICS) and all(len(v) == 3 for v in result.history.values())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.history.values())


def test_rank_above_a_small_layer_is_clamped_there(tiny):
    from pack.trainers.lora_dpo import attach_lora

    model, _ = tiny
    lora = attach_lora(model, rank=8, alpha=8.0)
    assert lora.parameters["diffusion_model.out.2.lora_up.weight"].shape == (4, 4)  # 4 output channels
    assert lora.parameters["diffusion_model.out.2.alpha"].item() == pytest.approx(4.0)  # same alpha/rank
    assert lora.parameters["diffusion_model.input_blocks.0.0.lora_up.weight"].shape[1] == 8


def test_bad_training_input_is_refused(tiny):
    from pack.trainers.lora_dpo import train_dpo_lora

    model, conditioning = tiny
    pairs = synthetic_pairs(conditioning, 2, seed=8)
    with pytest.raises(ValueError, match="rank 5000 is larger than every layer"):
        train_dpo_lora(model, pairs, config(rank=5000, steps=1))
    wrong_family = synthetic_pairs(conditioning, 2, seed=8)
    wrong_family.winners = torch.randn(2, 16, 8, 8)
    wrong_family.losers = torch.randn(2, 16, 8, 8)
    wrong_family.latent_channels = 16
    with pytest.raises(ValueError, match="16-channel latents but this model expects 4"):
        train_dpo_lora(model, wrong_family, config(steps=1))
    foreign = {"diffusion_model.not_a_layer.lora_up.weight": torch.zeros(4, 2),
               "diffusion_model.not_a_layer.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="matches no layer"):
        train_dpo_lora(model, pairs, config(steps=1), resume=foreign)
    nan_pairs = synthetic_pairs(conditioning, 2, seed=8)
    nan_pairs.losers[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_dpo_lora(model, nan_pairs, config(steps=1))
