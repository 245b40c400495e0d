"""Joint attention and DPO training on the DiT families (Flux.1 and SD3), in-process on CPU with
the random-weight tiny DiTs of ``harness.tiny_dit`` and CONDITIONING built as tensors (T5-XXL is
too big to build): the off-switch is bit-exact, references are preserved, the new images'
attention reaches the reference tokens (measured), subject masks confine it, RoPE offsets move
it; the trainer trains the blocks' attention and MLP linears, learns a synthetic preference, and
its LoRA reloads through the stock loader with the same output.

Flux keeps ComfyUI's fixed 3072 width (~0.55 B parameters): 16 text tokens and 64 px keep its
steps short.
"""

import os

import pytest
import torch

from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.pairs import uniform_pairs
from harness.tiny_checkpoint import PROPERTY_SHIFT
from harness.tiny_dit import DIT_KINDS, DIT_LATENT_SHAPE, dit_conditioning, ensure_dit

pytestmark = pytest.mark.comfy

CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")
CFG = {"sd3": 2.0, "flux": 1.0}  # Flux dev is guidance-distilled: cfg 1, guidance in the conditioning
TEXT_TOKENS = 16
IMAGE_TOKENS = (DIT_LATENT_SHAPE[1] // 2) * (DIT_LATENT_SHAPE[2] // 2)  # patch size 2
SIZE = (DIT_LATENT_SHAPE[1] * 8, DIT_LATENT_SHAPE[2] * 8)
SEED = 3


@pytest.fixture(scope="module", params=DIT_KINDS)
def dit(request, comfy_modules):
    import comfy.sd

    kind = request.param
    model = comfy.sd.load_diffusion_model(ensure_dit(comfyui_path(), CACHE, kind))
    positive = dit_conditioning(kind, tokens=TEXT_TOKENS)
    negative = dit_conditioning(kind, tokens=TEXT_TOKENS, seed=1)
    return kind, model, positive, negative


def latents(count, seed, scale=1.0):
    return torch.randn(count, *DIT_LATENT_SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


def joint(dit, model=None, references=None, strength=1.0, masks=None, image_guidance=1.0, new_images=2):
    """Joint Sampler's sampling (2 euler steps) with ``references`` given as latents."""
    from prefpersonalize.comfy_glue.joint import JointSamplerSettings, sample_joint

    kind, base, positive, negative = dit
    images = None if references is None else torch.zeros(references.shape[0], *SIZE, 3)
    encode = None if references is None else (lambda _: references)
    settings = JointSamplerSettings(
        new_images=new_images,
        size=SIZE,
        seed=SEED,
        steps=2,
        cfg=CFG[kind],
        sampler_name="euler",
        scheduler="simple",
        image_guidance=image_guidance,
        strength=strength,
    )
    return sample_joint(
        model or base, positive, negative, settings=settings, encode=encode, references=images, masks=masks
    )


def stock(dit, model=None, batch=2):
    """Stock KSampler's sampling of ``batch`` images (same seed, steps and sampler)."""
    import comfy.sample

    kind, base, positive, negative = dit
    empty = torch.zeros(batch, *DIT_LATENT_SHAPE)
    noise = comfy.sample.prepare_noise(empty, SEED)
    return comfy.sample.sample(
        model or base, noise, 2, CFG[kind], "euler", "simple", positive, negative, empty, seed=SEED, disable_pbar=True
    )


def with_joint_attention(model, **settings):
    from prefpersonalize.comfy_glue.joint import apply_joint_attention
    from prefpersonalize.pure.joint_attention import JointAttentionSettings

    return apply_joint_attention(model, JointAttentionSettings(**settings))


class AttentionRecorder:
    """An ``optimized_attention_override`` another node might set: it computes every attention
    with ComfyUI's own kernel and records, for calls whose keys outnumber the block's own tokens
    (the targets' joint attention), how many reference keys there are and the attention mass the
    queries put on them."""

    def __init__(self):
        self.reference_keys, self.masses = [], []

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model options for sampling: record in one place
        return self

    def __call__(self, func, q, k, v, *rest, **kwargs):
        heads = rest[0] if rest else kwargs["heads"]
        if not kwargs.get("skip_reshape"):
            extra = k.shape[1] - (TEXT_TOKENS + IMAGE_TOKENS)
            if extra > 0:
                self.reference_keys.append(extra)
                qh, kh = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
                weights = (qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5).softmax(dim=-1)
                self.masses.append(float(weights[..., -extra:].sum(dim=-1).mean()))
        return func(q, k, v, *rest, **kwargs)


def recorded(model):
    clone = model.clone()
    recorder = AttentionRecorder()
    clone.model_options["transformer_options"]["optimized_attention_override"] = recorder
    return clone, recorder


# --- joint attention ----------------------------------------------------------------------------


def test_off_switch_is_bit_exact(dit):
    plain = stock(dit)
    without_references, _ = joint(dit)
    assert torch.equal(without_references, plain)
    assert torch.equal(stock(dit, with_joint_attention(dit[1], strength=0.0)), plain)
    # strength 0 with references: the new images ignore them
    first, _ = joint(dit, references=latents(1, 1), strength=0.0)
    second, _ = joint(dit, references=latents(1, 2, scale=3.0), strength=0.0)
    assert torch.equal(first, second)


def test_references_are_kept_and_followed(dit):
    reference = latents(1, 1)
    new, whole = joint(dit, references=reference)
    other, _ = joint(dit, references=latents(1, 2))
    assert whole.shape == (3, *DIT_LATENT_SHAPE)
    assert (whole[:1] - reference).abs().max() <= 1e-5 * max(1.0, float(reference.abs().max()))
    assert torch.equal(whole[1:], new)
    assert (new - other).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every new image follows its reference
    # With the stock sampler the first image of the batch leads: it stays as it was, the others move.
    plain, led = stock(dit, batch=3), stock(dit, with_joint_attention(dit[1]), batch=3)
    assert torch.equal(led[0], plain[0])
    assert (led[1:] - plain[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_new_images_attend_to_the_reference_tokens_and_masks_confine_them(dit):
    model, recorder = recorded(dit[1])
    joint(dit, model=model, references=latents(1, 1))
    # every block, both steps, cond (and uncond with CFG): all reference image tokens, never its text
    assert recorder.reference_keys and set(recorder.reference_keys) == {IMAGE_TOKENS}
    # random weights: the mass follows the key count, a third of the keys here
    assert min(recorder.masses) > 0.1, recorder.masses
    masked_model, masked = recorded(dit[1])
    mask = torch.zeros(1, *SIZE)
    mask[:, :, : SIZE[1] // 2] = 1.0  # the left half: half of the reference's image tokens
    joint(dit, model=masked_model, references=latents(1, 1), masks=mask)
    assert set(masked.reference_keys) == {IMAGE_TOKENS // 2}


def test_reference_positions_offset_on_rope_models_only(dit):
    kind, model = dit[0], dit[1]
    reference = latents(1, 1)
    offset, _ = joint(dit, model=with_joint_attention(model, positions="offset"), references=reference)
    shared, _ = joint(dit, model=with_joint_attention(model, positions="shared"), references=reference)
    default, _ = joint(dit, references=reference)
    assert torch.equal(default, offset)
    if kind == "flux":  # RoPE: the positions the targets see the references at change the result
        assert (offset - shared).abs().max() > 1e-4
    else:  # SD3 adds absolute positions before the blocks: nothing to offset
        assert torch.equal(offset, shared)


def test_settings_schedule_blocks_blend_adain_and_image_guidance(dit):
    reference = latents(1, 1)
    plain, _ = joint(dit, references=reference, strength=0.0)
    full, _ = joint(dit, references=reference)
    model = dit[1]
    never = with_joint_attention(model, sigma_start=-1.0, sigma_end=-2.0)  # a window no step is in
    assert torch.equal(joint(dit, model=never, references=reference)[0], plain)
    none_chosen = with_joint_attention(model, blocks=frozenset({"middle"}))
    from prefpersonalize.comfy_glue.dit import dit_blocks

    names = {name for _, name in dit_blocks(model)}
    moved = joint(dit, model=none_chosen, references=reference)[0]
    assert torch.equal(moved, plain) if "middle" not in names else (moved - plain).abs().max() > 1e-4
    for settings in (dict(mode="blend", strength=0.5), dict(adain_queries=True, adain_keys=True)):
        other = joint(dit, model=with_joint_attention(model, **settings), references=reference)[0]
        assert torch.isfinite(other).all() and (other - full).abs().max() > 1e-4, settings
    guided, _ = joint(dit, references=reference, image_guidance=2.0)
    assert torch.isfinite(guided).all() and (guided - full).abs().max() > 1e-4


def test_composes_with_a_lora_and_other_block_patches(dit):
    import comfy.sd

    model = dit[1]
    lora = random_lora(model)
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    assert not torch.equal(stock(dit, with_lora), stock(dit))
    assert torch.equal(stock(dit, with_joint_attention(with_lora, strength=0.0)), stock(dit, with_lora))
    calls = []

    def counting_block(args, extra):  # another node's block replacement on the first block
        calls.append(1)
        return extra["original_block"](args)

    patched = with_lora.clone()
    patched.set_model_patch_replace(counting_block, "dit", "double_block", 0)
    joined = with_joint_attention(patched)
    first, _ = joint(dit, model=joined, references=latents(1, 1))
    assert calls, "the earlier block replacement no longer runs"
    second, _ = joint(dit, model=with_joint_attention(with_lora), references=latents(1, 1))
    assert torch.equal(first, second)


def random_lora(model, rank=4, seed=5):
    """A random kohya-layout LoRA on the first block's attention qkv."""
    weights = model.model.state_dict()
    target = next(key for key in weights if key.endswith("attn.qkv.weight"))
    out_features, in_features = weights[target].shape
    name = "lora_unet_" + target.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{name}.lora_up.weight": torch.randn(out_features, rank, generator=generator) * 0.3,
        f"{name}.lora_down.weight": torch.randn(rank, in_features, generator=generator) * 0.3,
        f"{name}.alpha": torch.tensor(float(rank)),
    }


# --- DPO training -------------------------------------------------------------------------------


def synthetic_pairs(conditioning, count, seed):
    """Winners = losers + the synthetic property (latent channel 0 up)."""
    losers = latents(count, seed)
    winners = losers.clone()
    winners[:, 0] += PROPERTY_SHIFT / 4
    return uniform_pairs(conditioning, winners, losers)


def config(**overrides):
    from prefpersonalize.trainers.loop import DPOTrainingConfig

    values = dict(loss_mode="dpo", beta=100.0, steps=4, learning_rate=1e-3, rank=4, alpha=4.0, batch_size=4, seed=0)
    values.update(overrides)
    return DPOTrainingConfig(**values)


LEARNING = {"sd3": dict(steps=30, learning_rate=2e-3), "flux": dict(steps=10, learning_rate=1e-4)}


@pytest.mark.oldest_comfyui  # heavy; the 2026 families' learning tests run on 0.33
def test_trainer_learns_a_synthetic_preference_on_the_blocks(dit):
    from harness.evaluation import implicit_accuracy
    from prefpersonalize.trainers.loop import train_dpo_lora

    kind, model, positive, _ = dit
    train, held_out = synthetic_pairs(positive, 8, seed=1), synthetic_pairs(positive, 8, seed=2)
    with torch.inference_mode():  # as ComfyUI runs a node: the loaded weights are inference tensors
        result = train_dpo_lora(model, train, config(**LEARNING[kind]))
    layers = list(result.lora.layers)
    assert layers and all(".double_blocks." in n or ".single_blocks." in n or ".joint_blocks." in n for n in layers)
    assert not any("mod" in n.split(".")[-2] or "modulation" in n for n in layers), layers
    after = implicit_accuracy(result.lora, held_out)
    assert after >= 0.9, (after, result.history["accuracy"][-5:])


def prediction(patcher, x, sigma, conditioning):
    import comfy.model_management

    from prefpersonalize.trainers.pair_batches import batch_kwargs, conditioning_batches

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    conds = conditioning_batches(patcher.model, [conditioning], DIT_LATENT_SHAPE, patcher.load_device)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, **batch_kwargs(conds, [0] * x.shape[0], patcher.load_device)).float()


def test_saved_lora_reloads_through_the_stock_loader(dit, tmp_path):
    import comfy.sd
    import comfy.utils

    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.lora_files import save_lora

    kind, model, positive, _ = dit
    result = train_dpo_lora(model, synthetic_pairs(positive, 4, seed=6), config(steps=2, learning_rate=5e-3))
    path = save_lora(result.lora.state_dict(), str(tmp_path / f"{kind}.safetensors"), model, layout="kohya")
    tensors, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    assert all(key.startswith("lora_unet_") for key in tensors)
    assert metadata["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[kind]
    loaded, _ = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0)
    x, sigma = latents(2, 9), torch.tensor([0.4, 0.8])
    trained = prediction(result.lora.inference_patcher(), x, sigma, positive)
    base = prediction(model, x, sigma, positive)
    assert (trained - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(prediction(loaded, x, sigma, positive), trained, rtol=1e-4, atol=1e-4)


def test_joint_set_training_and_checkpointing_train_the_same_way(dit):
    from prefpersonalize.trainers.loop import train_dpo_lora

    kind, model, positive, _ = dit
    pairs = synthetic_pairs(positive, 4, seed=7)
    plain = train_dpo_lora(model, pairs, config(steps=2)).lora.state_dict()
    checkpointed = train_dpo_lora(model, pairs, config(steps=2, gradient_checkpointing=True, checkpoint_depth=2))
    for key, value in plain.items():  # Flux's blocks update their inputs in place: both paths must agree
        torch.testing.assert_close(checkpointed.lora.state_dict()[key], value, rtol=1e-4, atol=1e-6)
    pairs.references = latents(1, 8)
    joint_result = train_dpo_lora(with_joint_attention(model), pairs, config(steps=2))
    assert all(torch.isfinite(torch.tensor(values)).all() for values in joint_result.history.values())
    assert joint_result.memory is not None  # the memory check's fake step ran the joint batch too
    joint_lora = joint_result.lora.state_dict()
    assert any((joint_lora[key] - plain[key]).abs().max() > 1e-7 for key in plain)  # the references count


def test_pairs_of_another_latent_family_are_refused(dit):
    from prefpersonalize.pure.errors import InputError
    from prefpersonalize.trainers.loop import train_dpo_lora

    kind, model, positive, _ = dit
    four_channel = uniform_pairs(positive, torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))
    with pytest.raises(InputError, match="16"):
        train_dpo_lora(model, four_channel, config(steps=1))


def test_beta_left_at_zero_is_the_velocity_default(dit):
    """Flow models' errors are velocity errors: a run that names no beta uses 100, not the noise
    models' 5000 (the file header records it); a named beta stays."""
    from prefpersonalize.trainers.loop import DPOTrainingConfig, training_metadata

    _, model, positive, _ = dit
    pairs = synthetic_pairs(positive, 2, seed=3)
    assert training_metadata(DPOTrainingConfig(), pairs, model, 0)["prefp_beta"] == "100"
    assert training_metadata(DPOTrainingConfig(beta=700.0), pairs, model, 0)["prefp_beta"] == "700"
