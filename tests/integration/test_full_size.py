"""The Joint Sampler and the DPO LoRA Trainer on full-size random-weight models (CPU,
in-process): SD1.5 as one checkpoint, SDXL as a UNet file plus CLIP-L and CLIP-G files, loaded
with ComfyUI's stock loaders, on ComfyUI 0.33 only (``current_comfyui``: CI's hour). Size is
the point: every UNet level's shapes, and memory (the SDXL trainer step at 256 px must fit a
24 GB machine). Speed is measured by
``bench/bench_dpo_trainer.py``, not here.

On each model: a joint batch samples and keeps its reference; one step of every loss mode
trains (bypass LoRA, per-block checkpointing); the saved LoRA loads through the stock LoRA
loader with every key used, and (SD1.5) gives the trained MODEL's prediction.
"""

import glob
import logging
import os
import shutil

import pytest
import safetensors.torch
import torch

from harness import release_memory
from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.pairs import uniform_pairs
from harness.tiny_checkpoint import FULL_SIZE_KINDS, checkpoint_path, ensure_checkpoint, full_size_file_bytes

pytestmark = [pytest.mark.comfy, pytest.mark.slow, pytest.mark.current_comfyui]

SD15_PX, SDXL_PX = 128, 256
CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")
FAMILY_KINDS = {"sd15": ("sd15_full",), "sdxl": ("sdxl_unet", "sdxl_clip_l", "sdxl_clip_g")}
HEADROOM = 2_000_000_000  # pytest's tmp files and the saved LoRAs


def cached(kind):
    return ensure_checkpoint(comfyui_path(), CACHE, kind=kind)


def make_room_for(family):
    """Skip, saying why, unless the family's files are cached or fit on the disk; other families'
    cached full-size files (rebuilt when next needed) are removed first if that makes room."""
    missing = [kind for kind in FAMILY_KINDS[family] if not os.path.exists(checkpoint_path(CACHE, kind))]
    needed = sum(full_size_file_bytes(kind) for kind in missing) + HEADROOM if missing else 0
    os.makedirs(CACHE, exist_ok=True)
    if needed and shutil.disk_usage(CACHE).free < needed:
        for kind in set(FULL_SIZE_KINDS) - set(FAMILY_KINDS[family]):
            for path in glob.glob(os.path.join(CACHE, f"random_{kind}_r*.safetensors")):
                os.remove(path)
    free = shutil.disk_usage(CACHE).free
    if needed and free < needed:
        pytest.skip(
            f"the {family} full-size files need {needed / 1e9:.1f} GB free in {CACHE} and "
            f"{free / 1e9:.1f} GB are; free disk space to run this tier"
        )


def encode(clip, prompt="a photo of a cat"):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def load_sd15():
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(cached("sd15_full"), output_vae=False)
    return model, encode(clip), SD15_PX


def load_sdxl():
    import comfy.sd

    clip = comfy.sd.load_clip([cached("sdxl_clip_l"), cached("sdxl_clip_g")])  # DualCLIPLoader, type sdxl
    conditioning = encode(clip)
    del clip
    return comfy.sd.load_diffusion_model(cached("sdxl_unet")), conditioning, SDXL_PX  # UNETLoader


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def full_size(request, comfy_modules):
    """(MODEL, conditioning, image size); one model in memory at a time (pytest runs every test
    of one parameter before it builds the next)."""
    import comfy.model_management

    make_room_for(request.param)
    comfy.model_management.unload_all_models()
    # A list, emptied below: pytest keeps the yielded value until after this teardown, which would
    # keep the model's memory from release_memory.
    loaded = list({"sd15": load_sd15, "sdxl": load_sdxl}[request.param]())
    yield loaded
    loaded.clear()
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    release_memory()


def random_pairs(conditioning, px, count=1, seed=0):
    latents = torch.randn(2 * count, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(seed))
    return uniform_pairs(conditioning, latents[:count], latents[count:], loser_quality=0.5)


def test_joint_sampler_keeps_the_reference(full_size):
    from prefpersonalize.comfy_glue.joint import JointSamplerSettings, sample_joint

    model, conditioning, px = full_size
    reference = torch.randn(1, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(1))
    settings = JointSamplerSettings(new_images=1, size=(px, px), seed=0, steps=2, cfg=1.0, scheduler="normal")
    new, samples = sample_joint(
        model,
        conditioning,
        conditioning,
        settings=settings,
        encode=lambda images: reference,
        references=torch.zeros(1, px, px, 3),
    )
    assert new.shape == (1, 4, px // 8, px // 8) and torch.isfinite(new).all()
    torch.testing.assert_close(samples[:1].float(), reference, rtol=1e-3, atol=1e-3)


# Full size is about real layer and latent shapes: the two modes that weigh the loss on the
# latent grid run here (every loss mode runs on the tiny models; CI time).
@pytest.mark.parametrize("mode", ["patch_dpo", "focus_dpo"])
def test_one_step_of_the_grid_weighted_loss_modes(full_size, mode):
    from prefpersonalize.trainers.loop import DPOTrainingConfig, train_dpo_lora

    model, conditioning, px = full_size
    config = DPOTrainingConfig(loss_mode=mode, steps=1, rank=4, alpha=4.0, gradient_checkpointing=True)
    result = train_dpo_lora(model, random_pairs(conditioning, px), config)
    assert all(torch.isfinite(torch.tensor(values)).all() for values in result.history.values()), result.history
    assert any(value.abs().sum() > 0 for key, value in result.lora.state_dict().items() if "lora_down" in key)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_memory_estimate_is_within_a_quarter_of_the_measured_peak(full_size, checkpointing):
    """As on the tiny model (test_dpo_training.py), on full-size SD1.5 (the issue's model; SDXL
    would add minutes of CI for the same code path)."""
    from prefpersonalize.trainers.loop import DPOTrainingConfig, train_dpo_lora
    from prefpersonalize.trainers.memory_check import LiveTensorBytes

    model, conditioning, px = full_size
    if px != SD15_PX:
        pytest.skip("the estimate is checked on full-size SD1.5")
    config = DPOTrainingConfig(steps=1, rank=4, alpha=4.0, gradient_checkpointing=checkpointing)
    measured = LiveTensorBytes()
    with measured:
        result = train_dpo_lora(model, random_pairs(conditioning, px), config)
    assert 0.75 <= result.memory.total / measured.peak <= 1.25, (result.memory, measured.peak)


def test_saved_lora_loads_with_the_stock_loader(full_size, tmp_path, caplog):
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    from prefpersonalize.trainers.loop import DPOTrainingConfig, train_dpo_lora
    from prefpersonalize.trainers.pair_batches import PairBatcher

    model, conditioning, px = full_size
    pairs = random_pairs(conditioning, px)
    config = DPOTrainingConfig(steps=1, rank=4, alpha=4.0, learning_rate=1e-2, gradient_checkpointing=True)
    result = train_dpo_lora(model, pairs, config)
    path = os.path.join(tmp_path, "lora.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in result.lora.state_dict().items()}, path)
    with caplog.at_level(logging.WARNING):  # what LoraLoader does
        loaded, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path), 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]

    def predict(patcher):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        batch = PairBatcher(patcher, pairs).batch([0], torch.tensor([0.5]), torch.Generator().manual_seed(2))
        with torch.no_grad():
            return PairBatcher(patcher, pairs).predict(batch.x_t, batch.sigma, batch.kwargs)

    if px == SDXL_PX:
        return  # SDXL: LoraLoader's merged copy of every adapted weight does not fit beside the fp32 model in 24 GB
    trained, reloaded, base = predict(result.model), predict(loaded), predict(model)
    assert (trained - base).abs().max() > 1e-4  # the step changed the model
    torch.testing.assert_close(reloaded, trained, rtol=1e-3, atol=1e-4)


# The SD1.5 UNet's config in diffusers (unet/config.json of the SD1.5 release; other entries default).
SD15_DIFFUSERS_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_LAYERS_PER_BLOCK = 2  # diffusers' SDXL UNet config: what its sgm -> diffusers renaming needs


def random_lora(model, seed=0):
    """The trainer's LoRA on every layer it adapts, with nonzero down matrices (alpha = rank, so
    files without alpha, as diffusers writes them, apply it alike)."""
    from prefpersonalize.trainers.lora_adapters import attach_lora

    lora = attach_lora(model, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(seed)
    for key, parameter in sorted(lora.parameters.items()):
        if key.endswith("lora_down.weight"):
            parameter.data.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return lora.state_dict()


def assert_resumes_as(tensors, model, state):
    from prefpersonalize.trainers.lora_files import read_lora_layers

    layers = read_lora_layers(tensors, model)
    assert {f"{name}.lora_up.weight" for name in layers} == {key for key in state if key.endswith("lora_up.weight")}
    for name, (up, down, alpha) in layers.items():
        assert torch.equal(up, state[f"{name}.lora_up.weight"]) and torch.equal(down, state[f"{name}.lora_down.weight"])
        assert alpha == float(state[f"{name}.alpha"])


def test_kohya_and_diffusers_layouts_load_and_resume(full_size, tmp_path, caplog):
    """The kohya file loads in ComfyUI with every key used, and resume_lora reads it and the
    diffusers layout diffusers' own converter makes of it back to the same LoRA."""
    import comfy.sd
    import comfy.utils
    from diffusers.configuration_utils import FrozenDict
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    from prefpersonalize.trainers.lora_files import save_lora

    model, _, px = full_size
    state = random_lora(model)
    path = save_lora(state, os.path.join(tmp_path, "kohya.safetensors"), model, "kohya")
    kohya = comfy.utils.load_torch_file(path)
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(model, None, kohya, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert_resumes_as(kohya, model, state)

    if px == SDXL_PX:
        config = FrozenDict(layers_per_block=SDXL_LAYERS_PER_BLOCK)
        converted, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(path, unet_config=config)
    else:
        converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(path)
    assert converted and all(key.startswith("unet.") for key in converted) and set(alphas.values()) == {4.0}
    assert_resumes_as(converted, model, state)


@pytest.mark.parametrize("full_size", ["sd15"], indirect=True)
def test_kohya_file_changes_a_diffusers_unet_as_it_changes_comfyuis(full_size, tmp_path, caplog):
    """diffusers' UNet2DConditionModel, built from the SD1.5 config with this checkpoint's
    weights, loads the kohya file through diffusers' own LoRA loader with no unexpected or
    missing key and moves its output as ComfyUI's LoraLoader moves ComfyUI's; the file diffusers
    then saves (its own layout) resumes as the same LoRA."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import diffusers.utils.logging
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from prefpersonalize.trainers.lora_files import save_lora

    model, _, _ = full_size
    state = random_lora(model, seed=1)
    path = save_lora(state, os.path.join(tmp_path, "kohya.safetensors"), model, "kohya")

    unet = UNet2DConditionModel(**SD15_DIFFUSERS_CONFIG)
    weights = model.model.diffusion_model.state_dict()
    ldm_key = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    unet.load_state_dict({key: weights[ldm_key[key]].float() for key in unet.state_dict()})
    diffusers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(path)
            StableDiffusionLoraLoaderMixin.load_lora_into_unet(converted, alphas, unet, adapter_name="dpo")
    finally:
        diffusers.utils.logging.disable_propagation()
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage() or "missing keys" in r.getMessage()]
    assert sum(isinstance(module, LoraLayer) for module in unet.modules()) == len(state) // 3  # every layer

    generator = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([500.0])
    context = 0.5 * torch.randn(1, 77, 768, generator=generator)
    with torch.no_grad():
        diffusers_lora = unet(x, t, context).sample
        unet.disable_adapters()
        diffusers_base = unet(x, t, context).sample
        unet.enable_adapters()

    def comfy_output(patcher):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context=context)

    comfy_base = comfy_output(model)
    loaded, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path), 1.0, 0.0)
    comfy_lora = comfy_output(loaded)
    assert (comfy_lora - comfy_base).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(diffusers_base, comfy_base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(diffusers_lora, comfy_lora, rtol=1e-4, atol=1e-4)

    saved = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="dpo"))
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp_path), unet_lora_layers=saved)
    diffusers_file = comfy.utils.load_torch_file(os.path.join(tmp_path, "pytorch_lora_weights.safetensors"))
    assert all(key.startswith("unet.") for key in diffusers_file)
    assert_resumes_as(diffusers_file, model, state)
