"""The random-weight DiT files (``harness.tiny_dit``) on ComfyUI's stock loaders, in-process on
CPU: ``load_diffusion_model`` (what UNETLoader calls) detects each as its family's model class
with the intended layout, the stock sampler makes finite latents from ``dit_conditioning``, the
random TAESD files decode them through ``VAELoader``, and a stock ``CLIPLoader`` type ``sd3``
with CLIP-L alone conditions both families (no T5-XXL).

Flux stays at ComfyUI's fixed 3072 width (~0.55 B parameters), so it samples with 16 text tokens
to keep the steps short.

The 2026 families (``harness.dit_families``: Flux.2 dev and Klein, Z-Image, Qwen-Image, Chroma,
Lumina 2, AuraFlow) load through the same loader as their ``model_base`` and
``supported_models`` classes, with every weight from the file, and one sampling step (cfg 1: one
forward pass) turns ``dit_conditioning`` of the family's shapes into finite latents. One family
is one parameter, so a failure names it; Klein is skipped, saying why, on ComfyUI 0.3.75. The
tiny autoencoders ComfyUI has for their latents (taef1, taesdxl, 0.33's taef2) decode a latent
through ``VAELoader``.

The stock Flux text encoders (``DualCLIPLoader`` type ``flux`` with the random fp8 T5-XXL,
``harness.tiny_dit.ensure_t5xxl``) run in the browser test of ``workflows/joint_sampling_flux.json``
(an encode takes a minute or more on 2 cores, so it is not repeated here). The random Qwen3-4B
loads here as Z-Image's and Klein's encoder; it encodes in those families' workflow tests.
"""

import gc
import os

import pytest
import torch

from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.dit_families import FAMILIES, FAMILY_KINDS
from harness.logs import LoggedWarnings
from harness.tiny_checkpoint import ensure_checkpoint
from harness.tiny_dit import (
    DIT_KINDS,
    DIT_LATENT_SHAPE,
    QWEN3_4B_NAME,
    TAESD_CHANNELS,
    TAESD_NAMES,
    dit_conditioning,
    ensure_dit,
    ensure_full_text_encoder,
    ensure_taesd,
    unsupported_reason,
)

pytestmark = pytest.mark.comfy

CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")
MODEL_CLASSES = {"sd3": "SD3", "flux": "Flux"}
CFG = {"sd3": 2.0, "flux": 1.0}  # Flux dev is guidance-distilled: cfg 1, guidance in the conditioning
TOKENS = 16
T5XXL_ROOM = 6_000_000_000  # the 4.76 GB file and some headroom


@pytest.fixture(scope="module", params=DIT_KINDS)
def dit(request, comfy_modules):
    import comfy.sd

    kind = request.param
    return kind, comfy.sd.load_diffusion_model(ensure_dit(comfyui_path(), CACHE, kind))


@pytest.fixture(scope="module")
def clip_l_conditioning(comfy_modules):
    """CONDITIONING from the stock CLIPLoader, type sd3, given the random CLIP-L file alone."""
    import folder_paths
    import nodes

    path = ensure_checkpoint(comfyui_path(), CACHE, kind="sdxl_clip_l")
    folder_paths.add_model_folder_path("text_encoders", os.path.dirname(path))
    (clip,) = nodes.CLIPLoader().load_clip(os.path.basename(path), type="sd3")
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample(model, kind, conditioning, steps=2, seed=0):
    import comfy.sample

    empty = torch.zeros(1, *DIT_LATENT_SHAPE)
    noise = comfy.sample.prepare_noise(empty, seed)
    cfg = CFG[kind]
    return comfy.sample.sample(
        model, noise, steps, cfg, "euler", "simple", conditioning, conditioning, empty, seed=seed, disable_pbar=True
    )


def test_detected_as_the_family_model(dit):
    kind, model = dit
    config = model.model.model_config.unet_config
    assert type(model.model).__name__ == MODEL_CLASSES[kind]
    assert model.model.latent_format.latent_channels == 16
    if kind == "sd3":
        assert config["depth"] == 2 and config["patch_size"] == 2 and config["adm_in_channels"] == 2048
        assert config["context_embedder_config"]["params"] == {"in_features": 4096, "out_features": 128}
    else:
        assert config["guidance_embed"] is True  # Flux dev, not schnell
        assert (config["depth"], config["depth_single_blocks"]) == (1, 1)
        assert (config["vec_in_dim"], config["context_in_dim"], config["hidden_size"]) == (768, 4096, 3072)


def test_samples_finite_latents(dit):
    kind, model = dit
    samples = sample(model, kind, dit_conditioning(kind, tokens=TOKENS))
    assert samples.shape == (1, *DIT_LATENT_SHAPE)
    assert samples.isfinite().all() and samples.std() > 0


def test_taesd_decodes_through_the_stock_vae_loader(dit):
    import folder_paths
    import nodes

    kind, model = dit
    name = TAESD_NAMES[kind]
    folder_paths.add_model_folder_path("vae_approx", ensure_taesd(comfyui_path(), CACHE, kind))
    assert name in nodes.VAELoader.vae_list(nodes.VAELoader)
    with torch.inference_mode():
        (vae,) = nodes.VAELoader().load_vae(name)
        image = vae.decode(sample(model, kind, dit_conditioning(kind, tokens=TOKENS)))
    assert vae.latent_channels == 16
    assert image.shape == (1, 64, 64, 3) and image.isfinite().all()


def test_stock_clip_l_conditions_both_families(dit, clip_l_conditioning):
    kind, model = dit
    cond, extras = clip_l_conditioning[0]
    assert cond.shape == (1, 77, 4096) and extras["pooled_output"].shape == (1, 2048)
    samples = sample(model, kind, clip_l_conditioning)
    assert samples.isfinite().all()


# --- the 2026 families ---


@pytest.fixture(scope="module", params=FAMILY_KINDS)
def family(request, comfy_modules):
    """A 2026 family's tiny file through ``load_diffusion_model``, with the warnings it logged;
    one at a time (Flux.2 alone is 2.3 B parameters), unloaded after its tests."""
    import comfy.model_management
    import comfy.sd

    kind = request.param
    reason = unsupported_reason(kind)
    if reason is not None:
        pytest.skip(reason)
    path = ensure_dit(comfyui_path(), CACHE, kind)
    with LoggedWarnings() as warnings:
        # bf16, as the file is: in ComfyUI's fp32 on CPU, Flux.2 dev-shaped takes 9 GB and, beside
        # the session's server and the other tiers' models, ran a 23 GB machine out of memory.
        model = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.bfloat16})
    yield kind, model, warnings.messages
    del model
    comfy.model_management.unload_all_models()
    gc.collect()


def test_family_detected_as_its_model(family):
    kind, model, warnings = family
    expected = FAMILIES[kind]
    assert type(model.model).__name__ == expected.model_base
    assert type(model.model.model_config).__name__ == expected.config
    assert model.model.latent_format.latent_channels == expected.latent_shape[0]
    assert not [message for message in warnings if message.startswith("unet missing")]


def test_family_forward_pass_is_finite(family):
    import comfy.sample

    kind, model, _ = family
    # as KSampler does: Qwen-Image's Wan 2.1 latents gain a frame axis, [1, 16, 1, 8, 8]
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, *FAMILIES[kind].latent_shape))
    noise = comfy.sample.prepare_noise(latent, 0)
    conditioning = dit_conditioning(kind, tokens=TOKENS)
    with torch.inference_mode():
        samples = comfy.sample.sample(
            model, noise, 1, 1.0, "euler", "simple", conditioning, conditioning, latent, seed=0, disable_pbar=True
        )
    assert samples.shape == latent.shape
    assert samples.isfinite().all() and samples.std() > 0


TAESD_FAMILIES = sorted({family.taesd for family in FAMILIES.values() if family.taesd} - set(TAESD_NAMES.values()))


@pytest.mark.parametrize("name", TAESD_FAMILIES)
def test_family_taesd_decodes_through_the_stock_vae_loader(name, comfy_modules):
    import folder_paths
    import nodes

    kind = next(kind for kind, family in FAMILIES.items() if family.taesd == name)
    if name not in nodes.VAELoader.image_taes:
        pytest.skip(f"this ComfyUI's VAELoader has no {name}")
    folder_paths.add_model_folder_path("vae_approx", ensure_taesd(comfyui_path(), CACHE, kind))
    assert name in nodes.VAELoader.vae_list(nodes.VAELoader)
    latent = torch.randn(1, *FAMILIES[kind].latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (vae,) = nodes.VAELoader().load_vae(name)
        image = vae.decode(latent)
    assert vae.latent_channels == TAESD_CHANNELS[name]
    assert image.shape == (1, 64, 64, 3) and image.isfinite().all()


# CLIPLoader type -> (text encoder class, tokenizer class) for the random Qwen3-4B file.
QWEN3_4B_ENCODERS = {"lumina2": ("ZImageTEModel", "ZImageTokenizer"), "flux2": ("Flux2TEModel", "KleinTokenizer")}


@pytest.mark.parametrize("clip_type", sorted(QWEN3_4B_ENCODERS))
def test_qwen3_4b_loads_as_the_familys_text_encoder(clip_type, comfy_modules, tmp_path_factory):
    """The full-size random Qwen3-4B (``ensure_full_text_encoder``) is what the stock CLIPLoader
    detects as Z-Image's encoder (type lumina2) and Flux.2 Klein's (type flux2, 0.33), with every
    weight from the file. Encoding runs in the Z-Image and Klein workflows' browser tests."""
    import folder_paths
    import nodes

    if clip_type == "flux2" and unsupported_reason("flux2_klein"):
        pytest.skip(f"no Flux.2 Klein in this ComfyUI: {unsupported_reason('flux2_klein')}")
    folder = tmp_path_factory.mktemp("text_encoders")
    os.symlink(ensure_full_text_encoder(comfyui_path(), CACHE, "qwen3_4b"), folder / QWEN3_4B_NAME)
    folder_paths.add_model_folder_path("text_encoders", str(folder))
    with LoggedWarnings() as warnings:
        (clip,) = nodes.CLIPLoader().load_clip(QWEN3_4B_NAME, clip_type)
    encoder, tokenizer = QWEN3_4B_ENCODERS[clip_type]
    assert encoder in [cls.__name__ for cls in type(clip.cond_stage_model).__mro__]
    assert type(clip.tokenizer).__name__ == tokenizer
    assert not [message for message in warnings.messages if "missing" in message]
    del clip
    gc.collect()


def test_hidream_conditioning_has_its_encoders_shapes():
    """HiDream is not built (detection fixes the full 17 B model); its CONDITIONING is what its
    ``model_base.extra_conds`` reads: T5 states, CLIP-L + CLIP-G pooled, Llama's 32 layers."""
    ((cond, extras),) = dit_conditioning("hidream", batch=2, tokens=TOKENS)
    assert cond.shape == (2, 128, 4096)
    assert extras["pooled_output"].shape == (2, 2048)
    assert extras["conditioning_llama3"].shape == (2, 32, TOKENS, 4096)
