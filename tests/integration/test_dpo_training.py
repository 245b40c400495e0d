"""The DPO LoRA trainer on ComfyUI's real model classes (tiny SD1.5 checkpoints, CPU,
in-process): it learns a synthetic preference (held-out accuracy, full generations), patch
weights choose which differences it learns, every loss mode runs, it is deterministic, never
touches the input MODEL, and its LoRA loads like any LoRA.

The learning tests run on ComfyUI 0.3.75 only (``oldest_comfyui``; the trainer's arithmetic
does not change with the version, and 0.33 runs the 2026 families' learning tests). Learning is
checked on the pre-trained tiny denoiser (``tiny_checkpoint.pretrain_denoiser``):
DPO moves a model relative to its reference, which only means something for generations when
the reference denoises. Mechanics use the random-weight checkpoint.
"""

import os

import pytest
import torch

from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.pairs import uniform_pairs
from harness.tiny_checkpoint import (
    DENOISER_PROMPT,
    LATENT_SHAPE,
    PROPERTY_SHIFT,
    ensure_checkpoint,
    synthetic_latents,
    with_property,
)

pytestmark = pytest.mark.comfy

LATENT = LATENT_SHAPE  # 64 px images
LEFT, RIGHT = torch.zeros(LATENT[1:]), torch.zeros(LATENT[1:])
LEFT[:, : LATENT[2] // 2] = 1
RIGHT[:, LATENT[2] // 2 :] = 1


def load(kind):
    import comfy.sd

    path = ensure_checkpoint(comfyui_path(), os.path.join(DEFAULT_CACHE, "checkpoints"), kind=kind)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(DENOISER_PROMPT), return_pooled=True)
    return model, [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def tiny(comfy_modules):
    return load("sd15")


@pytest.fixture(scope="module")
def denoiser(comfy_modules):
    return load("sd15_denoiser")


def make_pairs(conditioning, winners, losers, weights=None):
    return uniform_pairs(conditioning, winners, losers, weights)


def synthetic_pairs(conditioning, count, seed):
    """Winners = losers + the synthetic property (latent channel 0 up), uniform weights."""
    losers = synthetic_latents(count, torch.Generator().manual_seed(seed))
    return make_pairs(conditioning, with_property(losers), losers)


def config(**overrides):
    from prefpersonalize.trainers.loop import DPOTrainingConfig

    values = dict(
        loss_mode="dpo",
        beta=2000.0,
        steps=30,
        learning_rate=5e-4,
        rank=4,
        alpha=4.0,
        batch_size=4,
        seed=0,
        timestep_start=0.2,
        timestep_end=0.95,
    )
    values.update(overrides)
    return DPOTrainingConfig(**values)


LEARNING = dict(beta=500.0, steps=20, learning_rate=3e-5, timestep_start=0.0, timestep_end=1.0)


def base_prediction(patcher, x, sigma, conditioning):
    """x0 prediction of a (loaded) patcher, through the same helpers the trainer uses."""
    import comfy.model_management

    from prefpersonalize.trainers.pair_batches import batch_kwargs, conditioning_batches

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    conds = conditioning_batches(patcher.model, [conditioning], LATENT, patcher.load_device)
    kwargs = batch_kwargs(conds, [0] * x.shape[0], patcher.load_device)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, **kwargs).float()


def generate(patcher, conditioning, count=16, seed=0, steps=12):
    """Full euler samples (unscaled latents), the same noise for every model."""
    import comfy.sample

    empty = torch.zeros(count, *LATENT)
    noise = comfy.sample.prepare_noise(empty, seed)
    return comfy.sample.sample(
        patcher, noise, steps, 1.0, "euler", "normal", conditioning, conditioning, empty, seed=seed, disable_pbar=True
    ).float()


@pytest.mark.oldest_comfyui
def test_learns_a_synthetic_preference(denoiser):
    from harness.evaluation import implicit_accuracy
    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.lora_adapters import attach_lora

    model, conditioning = denoiser
    train, held_out = synthetic_pairs(conditioning, 16, seed=1), synthetic_pairs(conditioning, 16, seed=2)
    untrained = attach_lora(model, rank=4, alpha=4.0)
    before = implicit_accuracy(untrained, held_out)
    result = train_dpo_lora(model, train, config(**LEARNING))
    after = implicit_accuracy(result.lora, held_out)
    assert before == pytest.approx(0.5)  # policy == reference: every draw is a tie
    assert after >= 0.9, (before, after, result.history["accuracy"][-5:])

    # Generations from the same noise carry more of the property (channel 0 up), sample by
    # sample, without the rest of the latent blowing up.
    base, trained = generate(model, conditioning), generate(result.lora.patcher, conditioning)
    moved = (trained[:, 0] - base[:, 0]).mean(dim=(1, 2))
    assert moved.mean() > 0.5 * PROPERTY_SHIFT and (moved > 0).float().mean() >= 0.9, moved
    assert trained[:, 1:].std() < 3 * base[:, 1:].std(), (base[:, 1:].std(), trained[:, 1:].std())

    # So does what the model makes of noisy held-out losers, at every noise level.
    generator = torch.Generator().manual_seed(11)
    losers = held_out.losers * 0.18215  # SD1.5 latent scaling, as the trainer applies it
    for sigma in (14.0, 5.0, 2.0, 0.5):
        x = losers + sigma * torch.randn(losers.shape, generator=generator)
        sigmas = torch.full((x.shape[0],), sigma)
        base_x0 = base_prediction(model, x, sigmas, conditioning)[:, 0].mean().item()
        trained_x0 = base_prediction(result.lora.patcher, x, sigmas, conditioning)[:, 0].mean().item()
        assert trained_x0 > base_x0 + 0.02, (sigma, base_x0, trained_x0)


@pytest.mark.slow
@pytest.mark.oldest_comfyui
@pytest.mark.parametrize(
    "objective",
    [dict(preference_loss="ipo"), dict(adaptive_beta=0.5), dict(supervised_weight=0.25), dict(margin_cap=5.0)],
    ids=["ipo", "adaptive_beta", "supervised", "margin_cap"],
)
def test_each_preference_objective_learns(denoiser, objective):
    from harness.evaluation import implicit_accuracy
    from prefpersonalize.trainers.loop import train_dpo_lora

    model, conditioning = denoiser
    train, held_out = synthetic_pairs(conditioning, 16, seed=1), synthetic_pairs(conditioning, 16, seed=2)
    result = train_dpo_lora(model, train, config(**LEARNING, **objective))
    after = implicit_accuracy(result.lora, held_out)
    assert after >= 0.9, (after, result.history["accuracy"][-5:], result.history["margin"][-5:])


# A long run at a high learning rate (40 steps at 2e-3, 70x the learning tests' rate): how far
# the generations from fixed noise may move from the base model's, relative to their norm.
CAPPED_DRIFT_BOUND = 2.0


@pytest.mark.slow
@pytest.mark.oldest_comfyui
def test_margin_cap_keeps_a_long_high_learning_rate_run_near_the_base_model(denoiser):
    """Uncapped, Diffusion-DPO raises the margin by unlearning the loser, both errors grow
    without end and the sampler falls apart (measured: generations 36x their norm away); with
    the loser's share of the margin capped at 2 they stay within CAPPED_DRIFT_BOUND (measured
    1.2) while the pairs are still told apart."""
    from harness.evaluation import implicit_accuracy
    from prefpersonalize.trainers.loop import train_dpo_lora

    model, conditioning = denoiser
    train, held_out = synthetic_pairs(conditioning, 16, seed=1), synthetic_pairs(conditioning, 16, seed=2)
    base = generate(model, conditioning, count=8)

    def run(cap):
        settings = dict(beta=500.0, steps=40, learning_rate=2e-3, timestep_start=0.0, timestep_end=1.0)
        result = train_dpo_lora(model, train, config(**settings, margin_cap=cap))
        generated = generate(result.model, conditioning, count=8)
        return float((generated - base).norm() / base.norm()), implicit_accuracy(result.lora, held_out)

    (capped, accuracy), (uncapped, _) = run(2.0), run(0.0)
    assert capped < CAPPED_DRIFT_BOUND < uncapped, (capped, uncapped)
    assert accuracy >= 0.9, accuracy


@pytest.mark.parametrize(
    "settings",
    [
        {},
        dict(gradient_checkpointing=True),
        dict(gradient_checkpointing=True, checkpoint_depth=3),
        dict(lora_mode="weight"),
    ],
    ids=["plain", "checkpointed", "checkpointed_depth3", "weight_mode"],
)
def test_memory_estimate_is_within_a_quarter_of_the_measured_peak(tiny, settings):
    """The estimate made before loading (a fake step) against the tensor memory a real run
    holds at its peak (the same count CUDA's allocator reports), at 128 px, where activations
    outweigh the LoRA. On CPU no weight is loaded, so neither counts the weights."""
    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.memory_check import LiveTensorBytes

    model, conditioning = tiny
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    measured = LiveTensorBytes()
    with measured:
        result = train_dpo_lora(model, make_pairs(conditioning, latents[:2], latents[2:]), config(steps=1, **settings))
    estimate = result.memory
    assert estimate.weights == 0 and estimate.activations > 4 * estimate.adapters, estimate
    assert 0.75 <= estimate.total / measured.peak <= 1.25, (estimate, measured.peak)


@pytest.mark.slow
def test_fp16_weights_train_in_their_own_dtype_with_a_gradient_scaler(comfy_modules):
    """training_dtype ``model`` on an fp16 copy of the pre-trained denoiser: fp16 compute, the
    loss scaled (as core TrainLoraNode's ``none``), finite losses, and it learns."""
    import comfy.sd

    from harness.evaluation import implicit_accuracy
    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.options import training_settings

    path = ensure_checkpoint(comfyui_path(), os.path.join(DEFAULT_CACHE, "checkpoints"), kind="sd15_denoiser")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, model_options={"dtype": torch.float16})
    assert model.model.get_dtype() == torch.float16
    cond, pooled = clip.encode_from_tokens(clip.tokenize(DENOISER_PROMPT), return_pooled=True)
    conditioning = [[cond, {"pooled_output": pooled}]]
    settings = training_settings({"training_dtype": "model"}, model.load_device, model.model.get_dtype())
    assert settings.config.dtype == torch.float16
    train, held_out = synthetic_pairs(conditioning, 16, seed=1), synthetic_pairs(conditioning, 16, seed=2)
    result = train_dpo_lora(model, train, config(**LEARNING, dtype=torch.float16))
    assert result.state.grad_scaler is not None and result.state.grad_scaler["scale"] > 1  # the loss was scaled
    assert all(torch.isfinite(torch.tensor(result.history["loss"])))
    after = implicit_accuracy(result.lora, held_out)
    assert after >= 0.9, (after, result.history["accuracy"][-5:])
    # the trained MODEL samples in fp16 (ComfyUI's bypass casts the LoRA to each layer's dtype)
    assert generate(result.model, conditioning, count=2, steps=2).isfinite().all()


def held_out_x0(patcher, conditioning, losers, sigma):
    """One-step x0 predictions (unscaled) of ``losers`` noised to ``sigma`` with a fixed noise."""
    noise = torch.randn(losers.shape, generator=torch.Generator().manual_seed(3))
    x = losers * 0.18215 + sigma * noise  # SD1.5 latent scaling, as the trainer applies it
    return base_prediction(patcher, x, torch.full((x.shape[0],), sigma), conditioning) / 0.18215


@pytest.mark.slow
@pytest.mark.oldest_comfyui
@pytest.mark.parametrize("prediction", ["v_prediction", "flow"])
def test_learns_in_v_and_flow_prediction_space(tiny, prediction):
    """The same MODEL switched to v-prediction (core ModelSamplingDiscrete) or rectified flow
    (core ModelSamplingSD3) trains in that space, through ``model_sampling`` alone."""
    import comfy.model_sampling
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    from harness.evaluation import implicit_accuracy
    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.lora_adapters import attach_lora
    from prefpersonalize.trainers.pair_batches import PairBatcher

    model, conditioning = tiny
    if prediction == "flow":
        patched, kind = ModelSamplingSD3().patch(model, shift=3.0)[0], comfy.model_sampling.CONST
    else:
        patched, kind = (
            ModelSamplingDiscrete().patch(model, "v_prediction", False)[0],
            comfy.model_sampling.V_PREDICTION,
        )
    train, held_out = synthetic_pairs(conditioning, 16, seed=1), synthetic_pairs(conditioning, 16, seed=2)
    result = train_dpo_lora(patched, train, config(**LEARNING))
    assert isinstance(PairBatcher(result.lora.patcher, held_out).sampling, kind)
    before = implicit_accuracy(attach_lora(patched, rank=4, alpha=4.0), held_out)
    after = implicit_accuracy(result.lora, held_out)
    assert before == pytest.approx(0.5) and after >= 0.9, (before, after, result.history["accuracy"][-5:])


@pytest.mark.slow
@pytest.mark.oldest_comfyui
def test_patch_weights_choose_what_is_learned_and_preservation_keeps_it_there(denoiser):
    """The subject sits in the left half (a signature on latent channel 2, in winners and losers
    alike); winners differ from losers on the left (channel 0 up) and on the right (channel 1 up).

    1. Weights 1 on one half and 0 on the other: generations move toward the winners inside the
       weighted half (per cell, the fraction of the winner-minus-loser difference:
       delta . (w - l) / |w - l|^2) at least 3x more than outside it. Each run is the other's
       control that the other half's difference is learnable.
    2. That alone does not fence the change in: a LoRA's weights are shared by every cell, so
       the change of the model's one-step prediction has about the same energy on both halves.
    3. With ``preserve_outside`` (keep the prediction at the reference's where weights are 0) the
       change is concentrated in the region: at least 3x the energy inside, at two noise levels,
       while generations still move toward the winners there.
    """
    from prefpersonalize.trainers.loop import train_dpo_lora

    model, conditioning = denoiser
    losers = synthetic_latents(16, torch.Generator().manual_seed(1))
    losers[:, 2] += 6.0 * LEFT
    winners = with_property(with_property(losers, LEFT, channel=0), RIGHT, channel=1)
    held_out = synthetic_latents(16, torch.Generator().manual_seed(2))
    held_out[:, 2] += 6.0 * LEFT
    base = generate(model, conditioning)
    base_x0 = {sigma: held_out_x0(model, conditioning, held_out, sigma) for sigma in (5.0, 1.0)}

    def train(region, **overrides):
        settings = dict(LEARNING, loss_mode="patch_dpo", **overrides)
        return train_dpo_lora(model, make_pairs(conditioning, winners, losers, region), config(**settings)).lora.patcher

    def toward_winners(patcher):
        """(left, right): how far generations moved toward the winners in each half."""
        moved = generate(patcher, conditioning) - base
        left = (moved[:, 0] * LEFT).sum() / (LEFT.sum() * moved.shape[0] * PROPERTY_SHIFT)
        right = (moved[:, 1] * RIGHT).sum() / (RIGHT.sum() * moved.shape[0] * PROPERTY_SHIFT)
        return float(left), float(right)

    def energy_ratios(patcher):
        """Per noise level: mean squared change of the x0 prediction, left half / right half."""
        ratios = []
        for sigma, before in base_x0.items():
            change = (held_out_x0(patcher, conditioning, held_out, sigma) - before) ** 2
            ratios.append(float((change * LEFT).sum() / (change * RIGHT).sum()))
        return ratios

    left_run, right_run = train(LEFT), train(RIGHT)
    left, right = toward_winners(left_run), toward_winners(right_run)
    assert left[0] > 0.25 and left[0] > 3 * left[1], (left, right)
    assert right[1] > 0.25 and right[1] > 3 * right[0], (left, right)
    assert all(0.66 < ratio < 1.5 for ratio in energy_ratios(left_run)), energy_ratios(left_run)

    preserved = train(LEFT, preserve_outside=1.0, steps=40, learning_rate=1e-4)
    inside, outside = toward_winners(preserved)
    assert inside > 0.1 and inside > 3 * outside, (inside, outside)
    assert all(ratio > 3 for ratio in energy_ratios(preserved)), energy_ratios(preserved)


def test_joint_set_training_uses_the_references(tiny):
    """Pairs with reference latents, on a MODEL that went through Joint Attention, train in the
    joint batch: the references change what is learned, and the policy and reference passes see
    the same noised references (an untrained LoRA ties exactly). Without Joint Attention the
    references are ignored; Joint Attention without references is off, not fed a pair image."""
    from harness.evaluation import implicit_accuracy
    from prefpersonalize.comfy_glue.joint import apply_joint_attention
    from prefpersonalize.pure.joint_attention import JointAttentionSettings
    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.lora_adapters import attach_lora

    model, conditioning = tiny
    joint = apply_joint_attention(model, JointAttentionSettings())
    pairs = synthetic_pairs(conditioning, 4, seed=9)
    with_references = synthetic_pairs(conditioning, 4, seed=9)
    with_references.references = synthetic_latents(2, torch.Generator().manual_seed(10))

    def trained(patcher, pair_set):
        return train_dpo_lora(patcher, pair_set, config(steps=3, loss_mode="patch_dpo")).lora.state_dict()

    def gap(first, second):
        return max(float((first[key] - second[key]).abs().max()) for key in first)

    plain = trained(model, pairs)
    assert gap(plain, trained(model, with_references)) == 0
    assert gap(plain, trained(joint, pairs)) < 1e-5  # same attention, other kernel call
    assert gap(plain, trained(joint, with_references)) > 1e-4
    assert implicit_accuracy(attach_lora(joint, rank=4, alpha=4.0), with_references) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["eps", "v", "flow", "x0"])
def test_errors_are_in_the_models_own_prediction_space(comfy_modules, kind):
    """For ComfyUI's eps, v-prediction, flow (CONST) and x0 samplings, the trainer's factor turns
    an x0 error into the error of the model's raw output against the output that would have
    denoised exactly: |out - out*| = factor * |x0_pred - x0| per sample."""
    import comfy.model_sampling as sampling

    from prefpersonalize.trainers.pair_batches import target_space_scale

    base, prediction = {
        "eps": (sampling.ModelSamplingDiscrete, sampling.EPS),
        "v": (sampling.ModelSamplingDiscrete, sampling.V_PREDICTION),
        "flow": (sampling.ModelSamplingDiscreteFlow, sampling.CONST),
        "x0": (sampling.ModelSamplingDiscrete, sampling.X0),
    }[kind]
    model_sampling = type("Sampling", (base, prediction), {})()
    generator = torch.Generator().manual_seed(0)
    x0, noise, output = (torch.randn(3, 4, 2, 2, generator=generator) for _ in range(3))
    sigma = torch.tensor([0.9, 0.5, 0.05]) if kind == "flow" else torch.tensor([14.0, 1.0, 0.05])
    x_t = model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)

    def denoised(out):
        return model_sampling.calculate_denoised(sigma, out, x_t)

    offset, slope = denoised(torch.zeros_like(x0)), denoised(torch.ones_like(x0)) - denoised(torch.zeros_like(x0))
    exact_output = (x0 - offset) / slope  # denoised is affine in the model's output
    raw_error = (output - exact_output).flatten(1).norm(dim=1)
    x0_error = (denoised(output) - x0).flatten(1).norm(dim=1)
    torch.testing.assert_close(raw_error, target_space_scale(model_sampling, sigma) * x0_error, rtol=1e-4, atol=1e-5)


def test_deterministic_and_input_model_untouched(tiny):
    from prefpersonalize.trainers.loop import train_dpo_lora

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


def test_two_runs_the_second_resuming_train_the_lora_of_one_run(tiny, tmp_path):
    """4 steps at once, and 2 + 2 through the state file save_every writes beside the checkpoint
    (Adam's moments, the generator, beta-DPO's running mean): the same LoRA to rounding."""
    import comfy.sd

    from prefpersonalize.pure.errors import InputError
    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.lora_files import LoraWithMetadata, save_lora
    from prefpersonalize.trainers.progress import TrainingProgress
    from prefpersonalize.trainers.training_state import read_state, state_path

    model, conditioning = tiny
    pairs = synthetic_pairs(conditioning, 4, seed=8)
    settings = dict(loss_mode="patch_dpo", learning_rate=2e-3, adaptive_beta=0.5)
    whole = train_dpo_lora(model, pairs, config(steps=4, **settings)).lora.state_dict()

    def save(lora, step, stem):
        path = str(tmp_path / f"{stem}.safetensors")
        return save_lora(LoraWithMetadata(lora.state_dict(), {}), path, model, "comfyui")

    progress = TrainingProgress(2, save=save, save_every=2)
    first = train_dpo_lora(model, pairs, config(steps=2, **settings), progress=progress)
    state = read_state(state_path(str(tmp_path / "dpo_lora_step00002.safetensors")))
    assert state.steps_done == 2 and state.optimizer and state.adaptive_mean is not None
    resumed = train_dpo_lora(model, pairs, config(steps=2, **settings), state=state)
    assert resumed.steps_done == 4
    halves = resumed.lora.state_dict()
    assert halves.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-5, atol=1e-7)
    # without the optimizer's moments (the LoRA alone) the continuation differs: the state matters
    from_lora = train_dpo_lora(model, pairs, config(steps=2, **settings), resume=first.lora.state_dict())
    assert any(not torch.allclose(from_lora.lora.state_dict()[key], whole[key]) for key in whole)

    with pytest.raises(InputError, match=r"other options \(learning_rate 0.002 -> 0.001\)"):
        train_dpo_lora(model, pairs, config(steps=2, **{**settings, "learning_rate": 1e-3}), state=state)
    other_model = comfy.sd.load_lora_for_models(model, None, first.lora.state_dict(), 0.5, 0)[0]
    with pytest.raises(InputError, match="another model"):
        train_dpo_lora(other_model, pairs, config(steps=2, **settings), state=state)
    broken = tmp_path / "broken.state.safetensors"
    broken.write_bytes(b"not a state")
    with pytest.raises(InputError, match="not a readable training state"):
        read_state(str(broken))


def test_saved_lora_loads_like_the_trained_model(tiny):
    import comfy.sd

    from prefpersonalize.trainers.loop import train_dpo_lora

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
    from prefpersonalize.trainers.loop import METRICS, train_dpo_lora

    model, conditioning = tiny
    pairs = synthetic_pairs(conditioning, 6, seed=7)
    pairs.metadata = [{"difficulty": d} for d in ("easy", "easy", "normal", "normal", "hard", "hard")]
    result = train_dpo_lora(model, pairs, config(loss_mode=mode, steps=3, batch_size=2, grad_accumulation=2))
    assert set(result.history) == set(METRICS) and all(len(v) == 3 for v in result.history.values())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.history.values())


def test_rank_above_a_small_layer_is_clamped_there(tiny):
    from prefpersonalize.trainers.lora_adapters import attach_lora

    model, _ = tiny
    lora = attach_lora(model, rank=8, alpha=8.0)
    assert lora.parameters["diffusion_model.out.2.lora_up.weight"].shape == (4, 4)  # 4 output channels
    assert lora.parameters["diffusion_model.out.2.alpha"].item() == pytest.approx(4.0)  # same alpha/rank
    assert lora.parameters["diffusion_model.input_blocks.0.0.lora_up.weight"].shape[1] == 8


def test_bad_training_input_is_refused(tiny):
    from prefpersonalize.trainers.loop import train_dpo_lora

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
    foreign = {
        "diffusion_model.not_a_layer.lora_up.weight": torch.zeros(4, 2),
        "diffusion_model.not_a_layer.lora_down.weight": torch.zeros(2, 4),
    }
    with pytest.raises(ValueError, match="names a layer of this SD15 model"):
        train_dpo_lora(model, pairs, config(steps=1), resume=foreign)
    # Out of memory (raised here by an attention patch, as CUDA raises it mid-forward): the
    # message names what to change for these settings.
    exhausted = model.clone()

    def no_memory_left(q, k, v, extra_options):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    exhausted.set_model_attn1_patch(no_memory_left)
    with pytest.raises(ValueError, match="ran out of memory at step 1.*turn on gradient_checkpointing"):
        train_dpo_lora(exhausted, pairs, config(steps=1))
    with pytest.raises(ValueError, match="set lora_mode to bypass.*set checkpoint_depth to 2"):
        train_dpo_lora(
            exhausted, pairs, config(steps=1, lora_mode="weight", gradient_checkpointing=True, checkpoint_depth=1)
        )
    nan_pairs = synthetic_pairs(conditioning, 2, seed=8)
    nan_pairs.losers[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_dpo_lora(model, nan_pairs, config(steps=1))


def nonzero_lora(model, mode):
    """A LoRA of ``mode`` on ``model`` whose down matrices are drawn from a fixed seed (a fresh
    LoRA is a no-op), so the modes can be compared."""
    from prefpersonalize.trainers.lora_adapters import attach_lora

    lora = attach_lora(model, rank=4, alpha=4.0, mode=mode)
    generator = torch.Generator().manual_seed(5)
    for key, parameter in sorted(lora.parameters.items()):
        if key.endswith("lora_down.weight"):
            parameter.data.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return lora


def test_bypass_and_weight_modes_are_the_same_lora(tiny):
    """The forward-path branch and the rebuilt weight W + s·BA predict the same; adapters off
    is the base model bit for bit; the sampling MODEL carries the LoRA; training moves both
    modes' LoRAs alike."""
    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.lora_adapters import LORA_MODES

    model, conditioning = tiny
    x = 3.0 * torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(4))
    sigma = torch.full((2,), 3.0)
    base = base_prediction(model, x, sigma, conditioning)
    predictions, trained = {}, {}
    for mode in LORA_MODES:
        lora = nonzero_lora(model, mode)
        predictions[mode] = base_prediction(lora.patcher, x, sigma, conditioning)
        torch.testing.assert_close(base_prediction(lora.inference_patcher(), x, sigma, conditioning), predictions[mode])
        with lora.switch.off():
            assert torch.equal(base_prediction(lora.patcher, x, sigma, conditioning), base), mode
        pairs = synthetic_pairs(conditioning, 4, seed=9)
        trained[mode] = train_dpo_lora(model, pairs, config(steps=2, lora_mode=mode)).lora.state_dict()
    assert (predictions["bypass"] - base).abs().mean() > 1e-3  # the LoRA does something
    torch.testing.assert_close(predictions["bypass"], predictions["weight"], rtol=1e-4, atol=1e-5)
    for key in trained["bypass"]:
        torch.testing.assert_close(trained["bypass"][key], trained["weight"][key], rtol=1e-3, atol=1e-6)
    assert torch.equal(base_prediction(model, x, sigma, conditioning), base)  # input MODEL untouched
    # The base weights are frozen: no full-size gradient is computed or stored for them.
    assert all(parameter.grad is None for parameter in model.model.parameters())


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_gradient_checkpointing_per_block_trains_the_same_lora(tiny, depth):
    from prefpersonalize.trainers.loop import train_dpo_lora

    model, conditioning = tiny
    pairs = synthetic_pairs(conditioning, 4, seed=10)
    plain = train_dpo_lora(model, pairs, config(steps=2)).lora.state_dict()
    result = train_dpo_lora(model, pairs, config(steps=2, gradient_checkpointing=True, checkpoint_depth=depth))
    checkpointed = result.lora.state_dict()
    assert checkpointed.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-7)
    # Checkpointing is a training matter: the sampling MODEL's blocks are plain again.
    assert "prefpairs_gradient_checkpointing" not in result.model.injections


def test_fp8_weights_train_in_bypass_mode_only(comfy_modules):
    import comfy.sd

    from prefpersonalize.trainers.loop import train_dpo_lora

    path = ensure_checkpoint(comfyui_path(), os.path.join(DEFAULT_CACHE, "checkpoints"), kind="sd15")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, model_options={"dtype": torch.float8_e4m3fn})
    cond, pooled = clip.encode_from_tokens(clip.tokenize(DENOISER_PROMPT), return_pooled=True)
    pairs = synthetic_pairs([[cond, {"pooled_output": pooled}]], 2, seed=11)
    with pytest.raises(ValueError, match="float8_e4m3fn weights, which train only in bypass mode"):
        train_dpo_lora(model, pairs, config(steps=1, lora_mode="weight"))
    result = train_dpo_lora(model, pairs, config(steps=2, lora_mode="bypass"))
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.history.values())
    assert any(value.abs().sum() > 0 for key, value in result.lora.state_dict().items() if "lora_down" in key)
    assert model.model.diffusion_model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("loaded_by_a_node", [False, True])
def test_bypass_training_saves_the_loaded_weights_themselves(tiny, loaded_by_a_node):
    """In bypass mode autograd saves the base weights without copying them: ComfyUI copies every
    weight that has a weight function on each forward, so the training patcher freezes them as
    aliases instead (``FrozenAliases``). A node's model holds inference tensors, which autograd
    cannot save as they are. After the run the model holds its own parameters again."""
    import comfy.model_management
    import comfy.sd

    from prefpersonalize.trainers.lora_adapters import attach_lora
    from prefpersonalize.trainers.pair_batches import batch_kwargs, conditioning_batches

    model, conditioning = tiny
    if loaded_by_a_node:
        path = ensure_checkpoint(comfyui_path(), os.path.join(DEFAULT_CACHE, "checkpoints"), kind="sd15")
        with torch.inference_mode():
            model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    own = dict(model.model.named_parameters())
    lora = attach_lora(model, rank=4, alpha=4.0, mode="bypass")
    # Layers whose input needs no gradient have their weights not saved at all: the first layers
    # on the timestep and on the latents, and cross-attention's keys and values on the text.
    first_layers = ("time_embed.0", "input_blocks.0.0", "attn2.to_k", "attn2.to_v")
    adapted_weights = {
        module.weight.untyped_storage().data_ptr()
        for name, (module, _) in lora.layers.items()
        if not name.endswith(first_layers)
    }
    comfy.model_management.load_models_gpu([lora.patcher], force_full_load=True)
    conds = conditioning_batches(lora.patcher.model, [conditioning], LATENT, lora.patcher.load_device)
    kwargs = batch_kwargs(conds, [0, 0], lora.patcher.load_device)
    saved = set()

    def pack(tensor):
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(5))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        prediction = lora.patcher.model.apply_model(x, torch.full((2,), 3.0), **kwargs)
    prediction.square().mean().backward()
    assert adapted_weights <= saved  # every adapted layer's own weight, not a copy of it
    assert all(parameter.grad is None for parameter in own.values())  # frozen
    comfy.model_management.unload_all_models()
    after = dict(model.model.named_parameters())
    assert after.keys() == own.keys() and all(after[name] is own[name] for name in own)  # not the aliases
    assert all(torch.is_inference(parameter) == loaded_by_a_node for parameter in own.values())


def test_beta_left_at_zero_is_the_noise_default(tiny):
    """Noise-prediction models' default beta is Diffusion-DPO's 5000 (the file header records it)."""
    from prefpersonalize.trainers.loop import DPOTrainingConfig, training_metadata

    model, conditioning = tiny
    pairs = synthetic_pairs(conditioning, 2, seed=3)
    assert training_metadata(DPOTrainingConfig(), pairs, model, 0)["prefp_beta"] == "5000"
