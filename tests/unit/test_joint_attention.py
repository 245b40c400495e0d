"""JeDi joint attention and the joint batch on tensors: the batch layout contract, exact
formulas against hand-written softmax attention, strength modes, AdaIN, subject masks, the
schedule, image guidance; and the UNet patch (``comfy_glue/joint_unet.py``, with ComfyUI's
modules): composition with another attention replacement, inside ComfyUI's own UNet."""

import math

import pytest
import torch

from prefpersonalize.pure.errors import InputError
from prefpersonalize.pure.images import fit_to_size
from prefpersonalize.pure.joint_attention import (
    LAYOUT_KEY,
    AttentionKernels,
    JointAttentionSettings,
    JointCall,
    active_call,
    adain,
    check_strength,
    joint_attention,
    joint_layout,
    masks_to_tokens,
    merge_heads,
    parse_block_list,
    sdpa_attention,
    sdpa_kernel,
    split_heads,
    token_attention,
    with_subject_masks,
)
from prefpersonalize.pure.joint_sampling import image_guided_pair, joint_batch, with_clean_references


def naive_attention(q, k, v, heads, key_bias=None):
    """Softmax attention written out: ``[B, Tq, H*D]`` x ``[B, Tk, H*D]``."""
    q, k, v = (split_heads(t.double(), heads) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_bias is not None:
        logits = logits + key_bias.double()
    return merge_heads(logits.softmax(dim=-1) @ v).float()


def batch(chunks, references, targets, tokens=6, channels=16, seed=0, key_tokens=None):
    generator = torch.Generator().manual_seed(seed)
    size = chunks * (references + targets)
    q = torch.randn(size, tokens, channels, generator=generator)
    k = torch.randn(size, key_tokens or tokens, channels, generator=generator)
    v = torch.randn(size, key_tokens or tokens, channels, generator=generator)
    return q, k, v


def kernels(heads):
    return AttentionKernels(heads=heads, attention=lambda q, k, v: sdpa_attention(q, k, v, heads))


def joint(q, k, v, heads, references, chunks, **call):
    """``joint_attention`` on PyTorch SDPA; ``call``: the other ``JointCall`` fields."""
    call = JointCall(references=references, chunks=chunks, **call)
    return joint_attention(q, k, v, call=call, kernels=kernels(heads))


def expected_joint(q, k, v, heads, references, chunks, strength=1.0, keep=None):
    """Target rows by hand: own keys followed by all same-chunk reference keys."""
    per_chunk = q.shape[0] // chunks
    rows = []
    for chunk in range(chunks):
        start = chunk * per_chunk
        ref_k = k[start : start + references]
        ref_v = v[start : start + references]
        if keep is not None:
            ref_k, ref_v = ref_k[keep], ref_v[keep]
        ref_k, ref_v = ref_k.reshape(-1, k.shape[-1]), ref_v.reshape(-1, v.shape[-1])
        for row in range(start, start + per_chunk):
            if row - start < references:
                rows.append(naive_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], heads))
                continue
            keys = torch.cat([k[row], ref_k]).unsqueeze(0)
            values = torch.cat([v[row], ref_v]).unsqueeze(0)
            bias = torch.zeros(keys.shape[1])
            bias[k.shape[1] :] = math.log(strength)
            rows.append(naive_attention(q[row : row + 1], keys, values, heads, bias))
    return torch.cat(rows)


# --- kernels -----------------------------------------------------------------------------------


def test_heads_roundtrip_and_sdpa_match_naive_attention():
    q, k, v = batch(1, 1, 1, tokens=5, channels=12, key_tokens=7)
    assert torch.equal(merge_heads(split_heads(q, 3)), q)
    torch.testing.assert_close(sdpa_attention(q, k, v, 3), naive_attention(q, k, v, 3), atol=1e-5, rtol=1e-5)
    bias = torch.linspace(-2, 2, 7)
    torch.testing.assert_close(
        sdpa_attention(q, k, v, 3, key_bias=bias), naive_attention(q, k, v, 3, bias), atol=1e-5, rtol=1e-5
    )


# --- the joint batch ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunks,references,targets", [(1, 1, 1), (2, 1, 3), (2, 2, 3), (3, 1, 2)])
def test_joint_attention_matches_hand_written_concatenation(chunks, references, targets):
    q, k, v = batch(chunks, references, targets)
    out = joint(q, k, v, 2, references, chunks)
    torch.testing.assert_close(out, expected_joint(q, k, v, 2, references, chunks), atol=1e-5, rtol=1e-5)


def test_sdxl_shaped_heads_and_fewer_queries_than_keys():
    # SDXL: 10 heads of 64 channels; token merging (ToMe) can leave fewer queries than keys.
    q, k, v = batch(2, 1, 2, tokens=9, channels=640, key_tokens=16)
    out = joint(q, k, v, 10, 1, 2)
    assert out.shape == q.shape
    torch.testing.assert_close(out, expected_joint(q, k, v, 10, 1, 2), atol=1e-4, rtol=1e-4)


def test_reference_rows_are_plain_attention_and_ignore_targets():
    q, k, v = batch(2, 2, 2)
    out = joint(q, k, v, 2, 2, 2)
    reference_rows = [0, 1, 4, 5]
    torch.testing.assert_close(out[reference_rows], sdpa_attention(q, k, v, 2)[reference_rows])
    changed_targets = [t.clone() for t in (q, k, v)]
    for t in changed_targets:
        t[[2, 3, 6, 7]] = torch.randn_like(t[[2, 3, 6, 7]])
    again = joint(*changed_targets, 2, 2, 2)
    assert torch.equal(again[reference_rows], out[reference_rows])


def test_targets_pair_with_references_of_their_own_chunk():
    # chunk 0 = cond, chunk 1 = uncond: changing the uncond reference changes only uncond targets.
    q, k, v = batch(2, 1, 2)
    out = joint(q, k, v, 2, 1, 2)
    k2, v2 = k.clone(), v.clone()
    k2[3], v2[3] = torch.randn_like(k[3]), torch.randn_like(v[3])
    again = joint(q, k2, v2, 2, 1, 2)
    assert torch.equal(again[:3], out[:3])
    assert (again[4:] - out[4:]).abs().max() > 1e-3


def test_key_scaling_strength():
    q, k, v = batch(1, 1, 2)
    for strength in (0.25, 2.5):
        out = joint(q, k, v, 2, 1, 1, strength=strength)
        torch.testing.assert_close(out, expected_joint(q, k, v, 2, 1, 1, strength), atol=1e-5, rtol=1e-5)
    # A tiny weight is (numerically) self-attention; a huge one is attention to the reference alone.
    weak = joint(q, k, v, 2, 1, 1, strength=1e-9)
    torch.testing.assert_close(weak[1:], sdpa_attention(q, k, v, 2)[1:], atol=1e-5, rtol=1e-5)
    strong = joint(q, k, v, 2, 1, 1, strength=1e9)
    to_reference = sdpa_attention(q[1:], k[:1].expand(2, -1, -1), v[:1].expand(2, -1, -1), 2)
    torch.testing.assert_close(strong[1:], to_reference, atol=1e-4, rtol=1e-4)


def test_reference_key_scale_scales_the_keys_the_targets_see():
    q, k, v = batch(2, 1, 2, seed=4)
    scaled = k.clone()
    scaled[[0, 3]] *= 1.3  # the references' keys (first row of each chunk of 3)
    out = joint(q, k, v, 2, 1, 2, key_scale=1.3)
    expected = expected_joint(q, scaled, v, 2, 1, 2)
    expected[[0, 3]] = sdpa_attention(q[[0, 3]], k[[0, 3]], v[[0, 3]], 2)  # references attend as before
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(joint(q, k, v, 2, 1, 2, key_scale=1.0), joint(q, k, v, 2, 1, 2))


@pytest.mark.parametrize("strength", [0.3, -0.5, 1.0])
def test_blend_mode_is_refdrop(strength):
    q, k, v = batch(2, 2, 1)
    out = joint(q, k, v, 2, 2, 2, strength=strength, mode="blend")
    for row, refs in ((2, [0, 1]), (5, [3, 4])):
        own = naive_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], 2)
        ref_k = k[refs].reshape(1, -1, 16)
        ref_v = v[refs].reshape(1, -1, 16)
        to_refs = naive_attention(q[row : row + 1], ref_k, ref_v, 2)
        torch.testing.assert_close(out[row : row + 1], (1 - strength) * own + strength * to_refs, atol=1e-5, rtol=1e-5)


def test_adain_matches_statistics_and_feeds_joint_attention():
    x = torch.randn(2, 50, 8) * 3 + 1
    style = torch.randn(1, 40, 8) * torch.arange(1, 9) - torch.arange(8)
    out = adain(x, style)
    torch.testing.assert_close(out.mean(dim=1), style.mean(dim=1).expand(2, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        out.std(dim=1, correction=0), style.std(dim=1, correction=0).expand(2, -1), atol=1e-3, rtol=1e-3
    )

    q, k, v = batch(1, 1, 2)
    out = joint(q, k, v, 2, 1, 1, adain_queries=True, adain_keys=True)
    q2, k2 = q.clone(), k.clone()
    q2[1:] = adain(q[1:], q[:1])
    k2[1:] = adain(k[1:], k[:1])
    expected = expected_joint(q2, k2, v, 2, 1, 1)
    torch.testing.assert_close(out[1:], expected[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1], sdpa_attention(q[:1], k[:1], v[:1], 2))


def test_subject_masks_select_reference_tokens():
    masks = torch.zeros(2, 4, 4)
    masks[0, :2, :2] = 1  # top-left quarter
    masks[1, 3, 3] = 0.2  # too little anywhere: keeps its best-covered token
    keep = masks_to_tokens(masks, (2, 2))
    assert keep.tolist() == [[True, False, False, False], [False, False, False, True]]

    q, k, v = batch(1, 2, 2, tokens=4)
    out = joint(q, k, v, 2, 2, 1, reference_keep=keep)
    torch.testing.assert_close(out, expected_joint(q, k, v, 2, 2, 1, keep=keep), atol=1e-5, rtol=1e-5)


def test_no_room_for_targets_is_an_error():
    q, k, v = batch(2, 1, 0)
    with pytest.raises(ValueError, match="no room"):
        joint(q, k, v, 2, 1, 2)


# --- the schedule and the UNet patch --------------------------------------------------------------


def extra(batch_size, chunks=2, **options):
    return {
        "n_heads": 2,
        "cond_or_uncond": list(range(chunks)),
        "sigmas": torch.full((batch_size,), 5.0),
        "block": ("input", 1),
        "original_shape": [batch_size, 4, 2, 3],
        "activations_shape": [batch_size, 16, 2, 3],
        **options,
    }


@pytest.fixture(scope="module")
def joint_unet(comfy_modules):
    from prefpersonalize.comfy_glue import joint_unet

    return joint_unet


def test_schedule_switches_joint_attention_off():
    on = active_call(JointAttentionSettings(strength=1.0, reference_count=1), 6, extra(6))
    assert (on.references, on.chunks, on.strength, on.mode) == (1, 2, 1.0, "joint")
    cases = [
        (JointAttentionSettings(strength=0.0), extra(6)),
        (JointAttentionSettings(), extra(6, **{LAYOUT_KEY: joint_layout(0)})),
        (JointAttentionSettings(), extra(6, **{LAYOUT_KEY: joint_layout(1, enabled=False)})),
        (JointAttentionSettings(), extra(6, **{LAYOUT_KEY: joint_layout(1, strength=0.0)})),
        (JointAttentionSettings(reference_count=3), extra(6)),  # no room for targets in a chunk of 3
        (JointAttentionSettings(blocks=frozenset({"output"})), extra(6)),
        (JointAttentionSettings(sigma_start=4.0, sigma_end=1.0), extra(6)),
        (JointAttentionSettings(sigma_start=9.0, sigma_end=6.0), extra(6)),
    ]
    for settings, options in cases:
        assert active_call(settings, 6, options) is None, settings


def test_block_list_names_indices_and_ranges():
    assert parse_block_list("0-2, 7,9 - 10") == frozenset({0, 1, 2, 7, 9, 10})
    assert parse_block_list("") is None and parse_block_list(" , ") is None
    with pytest.raises(InputError, match="'x3' is not an index or a range"):
        parse_block_list("1, x3")
    with pytest.raises(InputError, match="runs backwards; write it as 2-5"):
        parse_block_list("5-2")


def test_block_indices_choose_the_blocks_instead_of_the_thirds():
    options = extra(6, block=("output", 3))
    assert active_call(JointAttentionSettings(block_indices=frozenset({3}), blocks=frozenset({"input"})), 6, options)
    assert active_call(JointAttentionSettings(block_indices=frozenset({2, 4})), 6, options) is None
    assert active_call(JointAttentionSettings(), 6, options) is not None


def test_schedule_reads_layout_and_chunks():
    q, k, v = batch(2, 2, 1)
    settings = JointAttentionSettings(strength=0.5, reference_count=1, mode="blend", adain_keys=True)

    def run(options):
        call = active_call(settings, 6, options)
        assert (call.mode, call.adain_queries, call.adain_keys) == ("blend", False, True)
        return joint(q, k, v, 2, call.references, call.chunks, strength=call.strength)

    out = run(extra(6, **{LAYOUT_KEY: joint_layout(2, strength=1.0)}))
    torch.testing.assert_close(out, expected_joint(q, k, v, 2, 2, 2), atol=1e-5, rtol=1e-5)
    # one chunk of six (cfg 1): references are rows 0 and 1 only
    out = run(extra(6, chunks=1, **{LAYOUT_KEY: joint_layout(2, strength=1.0)}))
    torch.testing.assert_close(out, expected_joint(q, k, v, 2, 2, 1), atol=1e-5, rtol=1e-5)
    # stock sampler: the settings' own reference count and strength
    out = run(extra(6))
    torch.testing.assert_close(out, expected_joint(q, k, v, 2, 1, 2, strength=0.5), atol=1e-5, rtol=1e-5)


def test_subject_masks_of_the_layout_on_a_token_grid():
    masks = torch.zeros(1, 4, 6)
    masks[0, :2, :2] = 1  # the top-left token of a 2 x 3 grid
    options = {LAYOUT_KEY: joint_layout(1, reference_masks=masks)}
    call = with_subject_masks(JointCall(references=1), options, (2, 3))
    assert call.reference_keep.tolist() == [[True, False, False, False, False, False]]
    assert with_subject_masks(JointCall(references=1), options, None).reference_keep is None  # no grid
    assert with_subject_masks(JointCall(references=2), options, (2, 3)).reference_keep is None  # other count


@pytest.mark.comfy
def test_unet_patch_applies_subject_masks_on_the_block_grid(joint_unet):
    q, k, v = batch(1, 1, 1)
    masks = torch.zeros(1, 4, 6)
    masks[0, :2, :2] = 1  # the top-left token of a 2 x 3 grid
    patch = joint_unet.JointUnetAttention(JointAttentionSettings(), kernel=sdpa_kernel, joint_kernel=sdpa_kernel)
    out = patch(q, k, v, extra(2, chunks=1, **{LAYOUT_KEY: joint_layout(1, reference_masks=masks)}))
    keep = torch.tensor([[True, False, False, False, False, False]])
    torch.testing.assert_close(out, expected_joint(q, k, v, 2, 1, 1, keep=keep), atol=1e-5, rtol=1e-5)


@pytest.mark.comfy
def test_unet_patch_composes_with_a_previous_replacement(joint_unet):
    q, k, v = batch(2, 1, 1)
    calls = []

    def previous(q_, k_, v_, extra_options):  # e.g. another node's attention replacement
        calls.append(q_.shape[0])
        return sdpa_attention(q_, k_, v_, extra_options["n_heads"]) * 2

    patch = joint_unet.JointUnetAttention(JointAttentionSettings(), previous=previous, joint_kernel=sdpa_kernel)
    out = patch(q, k, v, extra(4))
    assert calls == [4]
    doubled = sdpa_attention(q, k, v, 2) * 2
    torch.testing.assert_close(out[[0, 2]], doubled[[0, 2]])  # references: the previous replacement
    torch.testing.assert_close(out[[1, 3]], expected_joint(q, k, v, 2, 1, 2)[[1, 3]], atol=1e-5, rtol=1e-5)
    off = patch(q, k, v, extra(4, **{LAYOUT_KEY: joint_layout(0)}))
    assert torch.equal(off, doubled)


def test_layout_and_strength_validation():
    assert joint_layout(2, 0.5) == {"references": 2, "enabled": True, "strength": 0.5}
    with pytest.raises(ValueError, match="2 reference masks for 1 references"):
        joint_layout(1, reference_masks=torch.ones(2, 4, 4))
    check_strength("joint", 2.0)
    check_strength("blend", -1.0)
    with pytest.raises(ValueError, match="needs mode 'blend'"):
        check_strength("joint", -0.5)
    with pytest.raises(ValueError, match=r"outside \[-1, 1\]"):
        check_strength("blend", 1.5)


# --- the joint batch and image guidance ---------------------------------------------------------


def test_fit_to_size_crops_centre_then_resizes():
    tall = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 2)  # rows 0..7
    cropped = fit_to_size(tall, (2, 2))  # square: keep the middle two rows
    assert cropped.shape == (1, 1, 2, 2)
    assert cropped[0, 0, :, 0].tolist() == [3.0, 4.0]
    wide = torch.rand(2, 3, 30, 90)
    out = fit_to_size(wide, (16, 16))
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out.mean(), wide[..., 30:60].mean(), atol=0.02, rtol=0)
    same = torch.rand(1, 3, 8, 8)
    assert fit_to_size(same, (8, 8)) is same


def test_joint_batch_layout():
    references = torch.randn(2, 4, 3, 5)
    target_noise, reference_noise = torch.randn(3, 4, 3, 5), torch.randn(2, 4, 3, 5)
    latent, noise, mask = joint_batch(references, target_noise, reference_noise)
    assert torch.equal(latent[:2], references) and not latent[2:].any()
    assert torch.equal(noise, torch.cat([reference_noise, target_noise]))
    assert mask.shape == (5, 1, 3, 5)
    assert mask[:2].eq(0).all() and mask[2:].eq(1).all()
    with pytest.raises(ValueError, match="at least 1"):
        joint_batch(references, target_noise[:0], reference_noise)
    with pytest.raises(ValueError, match="latent size"):
        joint_batch(references, torch.randn(1, 4, 3, 4), reference_noise)


def test_clean_references_set_each_chunks_reference_rows_only():
    x, sigma = torch.randn(6, 4, 2, 3), torch.full((6,), 0.7)
    references = torch.randn(2, 4, 2, 3)
    clean_x, clean_sigma = with_clean_references(x, sigma, references, chunks=2, clean_sigma=0.0)
    for rows in (slice(0, 2), slice(3, 5)):  # the references of the cond and of the uncond chunk
        assert torch.equal(clean_x[rows], references) and clean_sigma[rows].eq(0).all()
    assert torch.equal(clean_x[[2, 5]], x[[2, 5]]) and clean_sigma[[2, 5]].eq(0.7).all()
    assert sigma.eq(0.7).all() and not torch.equal(x[:2], references)  # the inputs are not changed
    # one sigma for the whole batch becomes one per row
    _, per_row = with_clean_references(x, torch.tensor([0.7]), references, chunks=2, clean_sigma=0.0)
    assert torch.equal(per_row, clean_sigma)
    # a chunk with no room for a target: left as it is
    kept_x, kept_sigma = with_clean_references(x[:4], sigma[:4], references, chunks=2, clean_sigma=0.0)
    assert torch.equal(kept_x, x[:4]) and kept_sigma.eq(0.7).all()


def test_image_guidance_formula():
    generator = torch.Generator().manual_seed(1)
    cond_refs, uncond_refs, without = (torch.randn(2, 4, 3, 3, generator=generator) for _ in range(3))
    cfg, scale = 6.0, 2.5
    cond, uncond = image_guided_pair(cond_refs, uncond_refs, without, scale)
    expected = without + scale * (uncond_refs - without) + cfg * (cond_refs - uncond_refs)
    torch.testing.assert_close(uncond + cfg * (cond - uncond), expected)
    # s = 1 is plain joint CFG
    cond, uncond = image_guided_pair(cond_refs, uncond_refs, without, 1.0)
    torch.testing.assert_close(uncond + cfg * (cond - uncond), uncond_refs + cfg * (cond_refs - uncond_refs))
    # CFG off: eps_noref + s * (eps_ref - eps_noref)
    cond, uncond = image_guided_pair(cond_refs, None, without, scale)
    assert uncond is None
    torch.testing.assert_close(cond, without + scale * (cond_refs - without))


# --- inside ComfyUI's own UNet (SDXL-style attention: linear proj, 64-channel heads, depth 2) ----


@pytest.fixture(scope="module")
def sdxl_style_unet(comfy_modules):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(
        image_size=8,
        in_channels=4,
        model_channels=64,
        out_channels=4,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        num_head_channels=64,
        use_spatial_transformer=True,
        transformer_depth=[1, 2],
        transformer_depth_middle=2,
        transformer_depth_output=[1, 1, 2, 2],
        context_dim=96,
        use_linear_in_transformer=True,
        legacy=False,
        operations=comfy.ops.disable_weight_init,
    )
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if parameter.ndim == 1:
                parameter.copy_(torch.ones_like(parameter) if name.endswith("weight") else torch.zeros_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / math.sqrt(parameter[0].numel()))
    return unet.eval()


@pytest.mark.comfy
def test_patch_inside_comfyui_unet_with_sdxl_attention_shapes(sdxl_style_unet, joint_unet):
    from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention

    unet = sdxl_style_unet
    blocks = [
        (name, index)
        for name, group in (
            ("input", unet.input_blocks),
            ("middle", [unet.middle_block]),
            ("output", unet.output_blocks),
        )
        for index, block in enumerate(group)
        if any(isinstance(layer, SpatialTransformer) for layer in block)
    ]
    calls = []

    def kernel(q, k, v, heads, extra_options):
        calls.append((extra_options["block"], extra_options["block_index"], heads, q.shape[-1] // heads))
        return optimized_attention(
            q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
        )

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 8, 8, generator=generator)  # two chunks (cond, uncond) of 1 reference + 2 targets
    context = torch.randn(6, 5, 96, generator=generator)
    timesteps = torch.full((6,), 500.0)

    def run(layout=None, strength=1.0, latents=x):
        options = {"cond_or_uncond": [0, 1], "sigmas": torch.full((6,), 3.0)}
        if layout is not None:
            settings = JointAttentionSettings(strength=strength)
            patch = joint_unet.JointUnetAttention(settings, kernel=kernel, joint_kernel=kernel)
            options["patches_replace"] = {"attn1": {key: patch for key in blocks}}
            options[LAYOUT_KEY] = layout
        with torch.no_grad():
            return unet(latents, timesteps, context, transformer_options=options)

    plain = run()
    assert torch.equal(run(joint_layout(0)), plain)
    assert torch.equal(run(joint_layout(1), strength=0.0), plain)
    calls.clear()
    joint = run(joint_layout(1))
    # every transformer block of every patched UNet block ran the patch; SDXL-style 64-channel heads
    depth = {
        ("input", 1): 1,
        ("input", 3): 2,
        ("middle", 0): 2,
        ("output", 0): 2,
        ("output", 1): 2,
        ("output", 2): 1,
        ("output", 3): 1,
    }
    assert set(blocks) == set(depth)
    assert sorted({(block, index) for block, index, _, _ in calls}) == sorted(
        (key, index) for key, count in depth.items() for index in range(count)
    )
    assert {dim for _, _, _, dim in calls} == {64} and {heads for _, _, heads, _ in calls} == {1, 2}
    references, targets = [0, 3], [1, 2, 4, 5]
    torch.testing.assert_close(joint[references], plain[references], atol=1e-5, rtol=1e-5)
    assert (joint[targets] - plain[targets]).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    changed = x.clone()
    changed[3] = torch.randn(4, 8, 8, generator=generator)  # the uncond chunk's reference
    again = run(joint_layout(1), latents=changed)
    assert torch.equal(again[:3], joint[:3])
    assert (again[4:] - joint[4:]).abs().max() > 1e-4


@pytest.mark.comfy
def test_unet_patch_uses_its_joint_kernel_for_the_targets_only(joint_unet):
    q, k, v = batch(2, 1, 2)
    seen = []

    def joint_kernel(q_, k_, v_, heads, extra_options):
        seen.append((q_.shape[0], k_.shape[1]))
        return sdpa_kernel(q_, k_, v_, heads, extra_options)

    patch = joint_unet.JointUnetAttention(JointAttentionSettings(), kernel=sdpa_kernel, joint_kernel=joint_kernel)
    out = patch(q, k, v, extra(6))
    assert seen == [(4, 12)]  # 2 chunks x 2 targets, own 6 + reference 6 keys
    torch.testing.assert_close(out, expected_joint(q, k, v, 2, 1, 2), atol=1e-5, rtol=1e-5)
    off = joint_unet.JointUnetAttention(JointAttentionSettings(strength=0.0), kernel=sdpa_kernel)
    assert torch.equal(off(q, k, v, extra(6)), sdpa_attention(q, k, v, 2))


# DiT token sequences: text tokens then image tokens in one attention (Flux, SD3's MMDiT).
TEXT, IMAGE = 2, 4
IMAGE_SLICE = slice(TEXT, TEXT + IMAGE)


def test_token_attention_extends_only_the_targets_image_queries():
    heads = 2
    q, k, v = batch(chunks=2, references=1, targets=2, tokens=TEXT + IMAGE)
    plain = naive_attention(q, k, v, heads)
    out = token_attention(q, k, v, call=JointCall(references=1, chunks=2), kernels=kernels(heads), image=IMAGE_SLICE)
    for row in range(6):
        reference = row % 3 == 0
        ref_row = row - row % 3
        # references and every text query: the plain attention of the row itself
        if reference:
            torch.testing.assert_close(out[row], plain[row], atol=1e-5, rtol=1e-5)
            continue
        torch.testing.assert_close(out[row, :TEXT], plain[row, :TEXT], atol=1e-5, rtol=1e-5)
        # image queries: own text + image keys, then the reference's image keys (not its text)
        keys = torch.cat([k[row], k[ref_row, IMAGE_SLICE]])[None]
        values = torch.cat([v[row], v[ref_row, IMAGE_SLICE]])[None]
        by_hand = naive_attention(q[row : row + 1, IMAGE_SLICE], keys, values, heads)[0]
        torch.testing.assert_close(out[row, IMAGE_SLICE], by_hand, atol=1e-5, rtol=1e-5)


def test_token_attention_computes_the_targets_image_queries_only_jointly():
    heads = 2
    q, k, v = batch(chunks=2, references=1, targets=2, tokens=TEXT + IMAGE, seed=5)
    plain_queries = []

    def counting(q_, k_, v_):
        plain_queries.append(q_.shape[0] * q_.shape[1])
        return sdpa_attention(q_, k_, v_, heads)

    call = JointCall(references=1, chunks=2)
    counted = AttentionKernels(heads=heads, attention=counting, joint=lambda *a: sdpa_attention(*a, heads))
    out = token_attention(q, k, v, call=call, kernels=counted, image=IMAGE_SLICE)
    # the plain kernel sees the 2 references' rows and the 4 targets' text queries, nothing more
    assert sum(plain_queries) == 2 * (TEXT + IMAGE) + 4 * TEXT
    given = token_attention(
        q, k, v, call=call, kernels=kernels(heads), image=IMAGE_SLICE, plain=naive_attention(q, k, v, heads)
    )
    torch.testing.assert_close(out, given, atol=1e-5, rtol=1e-5)


def test_token_attention_masks_strength_and_reference_keys():
    heads = 2
    q, k, v = batch(chunks=1, references=1, targets=1, tokens=TEXT + IMAGE, seed=3)
    keep = torch.tensor([[True, False, True, False]])
    rotated = torch.randn_like(k)
    call = JointCall(references=1, strength=2.0, reference_keep=keep)
    out = token_attention(q, k, v, call=call, kernels=kernels(heads), image=IMAGE_SLICE, reference_k=rotated)
    kept = torch.tensor([TEXT, TEXT + 2])
    keys = torch.cat([k[1], rotated[0, kept]])[None]  # the targets see the given reference keys
    values = torch.cat([v[1], v[0, kept]])[None]
    bias = torch.tensor([0.0] * (TEXT + IMAGE) + [math.log(2.0)] * 2)
    by_hand = naive_attention(q[1:, IMAGE_SLICE], keys, values, heads, key_bias=bias)[0]
    torch.testing.assert_close(out[1, IMAGE_SLICE], by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], naive_attention(q, k, v, heads)[0], atol=1e-5, rtol=1e-5)


def test_token_attention_blend_and_adain_use_image_tokens_only():
    heads = 2
    q, k, v = batch(chunks=1, references=1, targets=1, tokens=TEXT + IMAGE, seed=5)
    call = JointCall(references=1, strength=0.5, mode="blend", adain_queries=True, adain_keys=True)
    out = token_attention(q, k, v, call=call, kernels=kernels(heads), image=IMAGE_SLICE)
    q_t, k_t = q[1:].clone(), k[1:].clone()
    q_t[:, IMAGE_SLICE] = adain(q[1:, IMAGE_SLICE], q[:1, IMAGE_SLICE])
    k_t[:, IMAGE_SLICE] = adain(k[1:, IMAGE_SLICE], k[:1, IMAGE_SLICE])
    own = naive_attention(q_t, k_t, v[1:], heads)[:, IMAGE_SLICE]
    to_refs = naive_attention(q_t[:, IMAGE_SLICE], k[:1, IMAGE_SLICE], v[:1, IMAGE_SLICE], heads)
    torch.testing.assert_close(out[1:, IMAGE_SLICE], 0.5 * own + 0.5 * to_refs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:, :TEXT], naive_attention(q, k, v, heads)[1:, :TEXT], atol=1e-5, rtol=1e-5)
