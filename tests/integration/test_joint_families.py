"""Joint attention and the Joint Sampler on the 2026 DiT families (Flux.2 Klein, Chroma and
Qwen-Image through ComfyUI's DiT block replacements, Z-Image through the attention override of
the whole model call), in-process on CPU with the random-weight
tiny models of ``harness.dit_families`` and CONDITIONING built as tensors: the off switch is
bit-exact, references end where they started, every joint attention call is a block's whole
sequence plus exactly the references' image tokens (half of them under a half mask), never their
text, the RoPE offset of the references changes the sample, and clean references enter every
model call at timestep 0.

One family is one parameter, so a failure names it. The module runs on ComfyUI 0.33 only
(``current_comfyui``) to keep CI within the hour; Klein needs 0.33 anyway (0.3.75 builds Flux.2
with 48 heads).
"""

import os

import pytest
import torch

from harness import release_memory
from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.dit_families import FAMILIES
from harness.tiny_dit import dit_conditioning, ensure_dit, unsupported_reason

# Heavy (four families, several samplings each): on ComfyUI 0.33 only, to keep CI within the hour.
pytestmark = [pytest.mark.comfy, pytest.mark.current_comfyui]

CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")
JOINT_KINDS = ("flux2_klein", "chroma", "qwen_image", "z_image")
TEXT_TOKENS = 16
SIZE = (64, 64)  # pixels: FAMILIES[kind].latent_shape is a 64 px image's latent
SEED = 3
STEPS = 2  # at the first step (sigma 1) the references are pure noise: the second one reads them


@pytest.fixture(scope="module", params=JOINT_KINDS)
def family(request, comfy_modules):
    import comfy.model_management
    import comfy.sample
    import comfy.sd

    kind = request.param
    reason = unsupported_reason(kind)
    if reason is not None:
        pytest.skip(reason)
    model = comfy.sd.load_diffusion_model(ensure_dit(comfyui_path(), CACHE, kind))
    # The model's latent layout (Qwen-Image's Wan latents carry a frame axis), as KSampler makes it.
    shape = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, *FAMILIES[kind].latent_shape)).shape[1:]
    positive = dit_conditioning(kind, tokens=TEXT_TOKENS)
    negative = dit_conditioning(kind, tokens=TEXT_TOKENS, seed=1)
    # A list, emptied below: pytest keeps the yielded value until after this teardown.
    loaded = [kind, model, positive, negative, tuple(shape)]
    del model
    yield loaded
    loaded.clear()
    comfy.model_management.unload_all_models()
    release_memory()


def image_tokens(family) -> int:
    _, model, _, _, shape = family
    patch = model.get_model_object("diffusion_model").patch_size
    return (shape[-2] // patch) * (shape[-1] // patch)


def latents(family, count, seed, scale=1.0):
    return torch.randn(count, *family[4], generator=torch.Generator().manual_seed(seed)) * scale


def joint(family, model=None, references=None, strength=1.0, masks=None, reference_timestep="noised"):
    """Joint Sampler's sampling (two euler steps, cfg 1) with ``references`` given as latents."""
    from prefpersonalize.comfy_glue.joint import JointSamplerSettings, sample_joint

    _, base, positive, negative, _ = family
    images = None if references is None else torch.zeros(references.shape[0], *SIZE, 3)
    encode = None if references is None else (lambda _: references)
    settings = JointSamplerSettings(
        new_images=2,
        size=SIZE,
        seed=SEED,
        steps=STEPS,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        strength=strength,
        reference_timestep=reference_timestep,
    )
    return sample_joint(
        model or base, positive, negative, settings=settings, encode=encode, references=images, masks=masks
    )


def with_first_reference(family, cache={}):  # noqa: B006 (one entry per family, for the module)
    """``joint`` with ``latents(family, 1, 1)`` as the reference and every default: the sample
    several tests compare against, computed once per family."""
    kind = family[0]
    if kind not in cache:
        cache[kind] = joint(family, references=latents(family, 1, 1))
    return cache[kind]


def stock(family, batch=2):
    """Stock KSampler's sampling of ``batch`` images (same seed, steps and sampler)."""
    import comfy.sample

    _, model, positive, negative, shape = family
    empty = torch.zeros(batch, *shape)
    noise = comfy.sample.prepare_noise(empty, SEED)
    return comfy.sample.sample(
        model, noise, STEPS, 1.0, "euler", "simple", positive, negative, empty, seed=SEED, disable_pbar=True
    )


def with_joint_attention(model, **settings):
    from prefpersonalize.comfy_glue.joint import apply_joint_attention
    from prefpersonalize.pure.joint_attention import JointAttentionSettings

    return apply_joint_attention(model, JointAttentionSettings(**settings))


class KeyCounter:
    """An ``optimized_attention_override`` another node might set: it computes every attention
    with ComfyUI's own kernel and records each call's key count, in call order."""

    def __init__(self):
        self.key_counts = []

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model options for sampling: record in one place
        return self

    def __call__(self, func, q, k, v, *rest, **kwargs):
        self.key_counts.append(k.shape[2] if kwargs.get("skip_reshape") else k.shape[1])
        return func(q, k, v, *rest, **kwargs)


def key_counts(family, **joint_kwargs) -> set[int]:
    model = family[1].clone()
    counter = KeyCounter()
    model.model_options["transformer_options"]["optimized_attention_override"] = counter
    joint(family, model=model, **joint_kwargs)
    return set(counter.key_counts)


def test_off_switch_is_bit_exact(family):
    plain = stock(family)
    without_references, _ = joint(family)
    assert torch.equal(without_references, plain)
    # strength 0 with references: the new images ignore them
    first, _ = joint(family, references=latents(family, 1, 1), strength=0.0)
    second, _ = joint(family, references=latents(family, 1, 2, scale=3.0), strength=0.0)
    assert torch.equal(first, second)


def test_references_are_kept_and_followed(family):
    reference = latents(family, 1, 1)
    new, whole = with_first_reference(family)
    other, _ = joint(family, references=latents(family, 1, 2))
    assert whole.shape == (3, *family[4])
    assert (whole[:1] - reference).abs().max() <= 1e-5 * max(1.0, float(reference.abs().max()))
    assert torch.equal(whole[1:], new)
    dims = tuple(range(1, new.dim()))
    assert (new - other).abs().amax(dim=dims).min() > 1e-3  # every new image follows its reference


def test_joint_calls_see_exactly_the_reference_image_tokens(family):
    reference = latents(family, 1, 1)
    plain = key_counts(family, references=reference, strength=0.0)
    # a block's whole text + image sequence (Z-Image's refiners attend over the text or image alone)
    sequence, image = max(plain), image_tokens(family)
    assert key_counts(family, references=reference) - plain == {sequence + image}
    mask = torch.zeros(1, *SIZE)
    mask[:, :, : SIZE[1] // 2] = 1.0  # the left half: half of the reference's image tokens
    masked = key_counts(family, references=reference, masks=mask)
    assert masked - plain == {sequence + image // 2}


def test_reference_positions_offset_changes_the_sample(family):
    model = family[1]
    reference = latents(family, 1, 1)
    offset, _ = joint(family, model=with_joint_attention(model, positions="offset"), references=reference)
    shared, _ = joint(family, model=with_joint_attention(model, positions="shared"), references=reference)
    default, _ = with_first_reference(family)
    assert torch.equal(default, offset)
    assert (offset - shared).abs().max() > 1e-4  # RoPE: where the targets see the references matters


def joint_call_count(family, joint_keys: int, **settings) -> int:
    """How many attention calls with ``joint_keys`` keys (a block's whole sequence plus the
    reference's image tokens: joint ones) one Joint Sampler run (one reference) makes with a
    Joint Attention of ``settings``."""
    model = with_joint_attention(family[1], **settings)
    counter = KeyCounter()
    model.model_options["transformer_options"]["optimized_attention_override"] = counter
    joint(family, model=model, references=latents(family, 1, 1))
    return counter.key_counts.count(joint_keys)


def test_block_list_patches_exactly_the_listed_blocks(family):
    from prefpersonalize.comfy_glue.joint import self_attention_blocks

    blocks = len(self_attention_blocks(family[1]))
    plain = key_counts(family, references=latents(family, 1, 1), strength=0.0)
    joint_keys = max(plain) + image_tokens(family)
    every = joint_call_count(family, joint_keys)
    assert every > 0 and every % blocks == 0
    assert joint_call_count(family, joint_keys, block_indices=frozenset({blocks - 1})) == every // blocks
    assert joint_call_count(family, joint_keys, block_indices=frozenset({blocks})) == 0  # past the last: none


def test_reference_key_scale_changes_the_sample(family):
    reference = latents(family, 1, 1)
    default, _ = with_first_reference(family)
    sharper, _ = joint(family, model=with_joint_attention(family[1], reference_key_scale=1.3), references=reference)
    assert sharper.isfinite().all() and (sharper - default).abs().max() > 1e-4


def test_block_list_past_the_last_block_is_refused_naming_the_count(family):
    from prefpersonalize.comfy_glue.joint import self_attention_blocks
    from prefpersonalize.nodes.joint import chosen_block_indices
    from prefpersonalize.pure.errors import InputError

    blocks = len(self_attention_blocks(family[1]))
    assert chosen_block_indices(family[1], f"0-{blocks - 1}") == frozenset(range(blocks))
    with pytest.raises(InputError, match=f"names block {blocks}, but this model has {blocks} blocks"):
        chosen_block_indices(family[1], f"0, {blocks}")


def test_block_list_on_a_unet_is_refused(comfy_modules):
    import comfy.sd

    from harness.tiny_checkpoint import ensure_checkpoint
    from prefpersonalize.nodes.joint import chosen_block_indices
    from prefpersonalize.pure.errors import InputError

    model = comfy.sd.load_checkpoint_guess_config(
        ensure_checkpoint(comfyui_path(), CACHE, kind="sd15"), output_vae=False, output_clip=False
    )[0]
    assert chosen_block_indices(model, " ") is None
    with pytest.raises(InputError, match="block_list picks a DiT's blocks; on a UNet choose them with"):
        chosen_block_indices(model, "0-3")


REFERENCE_LATENT_KINDS = ("flux2_klein", "qwen_image")  # models that read core ReferenceLatent's latents


def test_composes_with_core_reference_latents(family):
    """Core's ReferenceLatent (Flux.2, Kontext, Qwen-Image-Edit) appends the edit reference's tokens
    after the image tokens; joint attention keeps to the image grid, so both run at once."""
    kind, model, positive, negative, _ = family
    if kind not in REFERENCE_LATENT_KINDS:
        pytest.skip(f"{kind}: Chroma ignores reference latents; Z-Image refuses them with joint attention")
    edited = [[cond, {**extras, "reference_latents": [latents(family, 1, 5)]}] for cond, extras in positive]
    reference = latents(family, 1, 1)
    plain, _ = joint(family, references=reference)
    both, whole = joint((kind, model, edited, negative, family[4]), references=reference)
    assert both.isfinite().all() and (both - plain).abs().max() > 1e-4  # the edit reference is read
    assert (whole[:1] - reference).abs().max() <= 1e-5 * max(1.0, float(reference.abs().max()))
    solo, _ = joint((kind, model, edited, negative, family[4]), references=reference, strength=0.0)
    assert (both - solo).abs().max() > 1e-4  # and so are the joint references


def test_reference_latents_with_z_image_joint_attention_are_refused(family):
    """Z-Image (0.33) puts reference latents' tokens between the text and the image, which its
    joint attention (told apart by token counts) does not follow: refused, naming the fix."""
    import inspect

    from prefpersonalize.pure.errors import InputError

    kind, model, positive, negative, _ = family
    if kind != "z_image":
        pytest.skip("Z-Image only")
    if "ref_latents" not in inspect.signature(model.get_model_object("diffusion_model")._forward).parameters:
        pytest.skip("this ComfyUI's Z-Image ignores reference latents")
    edited = [[cond, {**extras, "reference_latents": [latents(family, 1, 5)]}] for cond, extras in positive]
    with pytest.raises(InputError, match="cannot run with reference latents.*Remove the ReferenceLatent node"):
        joint((kind, model, edited, negative, family[4]), references=latents(family, 1, 1))


def recorded_joint(family, **joint_kwargs):
    """``joint`` with the latents and timesteps the diffusion model receives in every call (every
    family here modulates each row by its own timestep): ``(samples, latents, timesteps)``."""
    latents_in, timesteps = [], []

    def record(_, args):
        latents_in.append(args[0].detach().float().clone())
        timesteps.append(args[1].detach().float().clone())

    hook = family[1].model.diffusion_model.register_forward_pre_hook(record)
    try:
        samples = joint(family, **joint_kwargs)
    finally:
        hook.remove()
    return samples, latents_in, timesteps


def test_clean_reference_timestep_gives_the_references_timestep_zero(family):
    reference = latents(family, 1, 1)
    noised, _ = with_first_reference(family)  # noised references: one timestep for every row
    (clean, whole), clean_latents, clean_steps = recorded_joint(
        family, references=reference, reference_timestep="clean"
    )
    expected = family[1].model.process_latent_in(reference)[0]
    for latent, step in zip(clean_latents, clean_steps, strict=True):
        assert step[0] == 0 and (step[1:] > 0).all()  # the reference row is modulated at t = 0
        torch.testing.assert_close(latent[0], expected, rtol=1e-2, atol=1e-2)  # and is the clean reference
    assert (whole[:1] - reference).abs().max() <= 1e-5 * max(1.0, float(reference.abs().max()))
    assert clean.isfinite().all() and (clean - noised).abs().max() > 1e-4
