"""Save DPO LoRA's layouts on each DiT family's tiny random model (``harness.tiny_dit``), in-process
on CPU: a random LoRA in the trainer's layout (``attach_lora``, no training) is saved in every
layout the family offers (``ModelFamily.lora_layouts``), the stock loader
(``comfy.sd.load_lora_for_models``, what LoraLoader calls) uses every key of each file and
predicts what the trainer's own adapters predict, ``read_lora_layers`` gives the same matrices
back, and a layout the family has no naming for is refused, naming those that work. diffusers'
own converters (a test-only dependency) read the layouts of Flux.1, Flux.2, Qwen-Image and Z-Image
as the same layers.

Klein runs on ComfyUI 0.33 only (``unsupported_reason``); Flux.2 dev (2.3 B) is not loaded here:
it has Klein's module names and layouts. HiDream is not built (the smallest file ComfyUI detects
as HiDream is the full 17 B model), so its layouts are checked as data only.
"""

import gc
import json
import logging
import os
import struct

import pytest
import torch

from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.dit_families import FAMILIES as DIT_FAMILIES
from harness.tiny_dit import DIT_LATENT_SHAPE, dit_conditioning, ensure_dit, unsupported_reason

pytestmark = pytest.mark.comfy

CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")
KINDS = ("sd3", "flux", "flux2_klein", "z_image", "qwen_image", "chroma")
RANK, ALPHA = 4, 2.0  # alpha != rank: the diffusers layout folds the scale into lora_B
SCALE = 0.05  # random LoRA entries: a visible change that keeps the model's output finite
TOKENS = 16
# Per kind: the family, the layouts it offers, ss_base_model_version (None: none is known).
EXPECTED = {
    "sd3": ("SD3/SD3.5", ("kohya", "diffusers", "comfyui"), "sd3"),
    "flux": ("Flux.1", ("kohya", "diffusers", "comfyui"), "flux1"),
    "flux2_klein": ("Flux.2", ("kohya", "comfyui"), "flux_2_klein_4b"),
    "z_image": ("Z-Image", ("diffusers", "comfyui"), "z_image"),
    "qwen_image": ("Qwen-Image", ("kohya", "diffusers", "comfyui"), "qwen_image"),
    "chroma": ("Chroma", ("kohya", "diffusers", "comfyui"), None),
}
DIFFUSERS_PREFIX = {"z_image": "diffusion_model."}  # the others: transformer.


def header(path):
    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(size)).get("__metadata__", {})


@pytest.fixture(scope="module", params=KINDS)
def family(request, comfy_modules):
    """One tiny model at a time, with a random LoRA on every layer the trainer adapts: its
    trainer-layout tensors and the trainer's own prediction with it."""
    import comfy.model_management
    import comfy.sd

    from prefpersonalize.trainers.lora_adapters import attach_lora

    kind = request.param
    reason = unsupported_reason(kind)
    if reason is not None:
        pytest.skip(reason)
    model = comfy.sd.load_diffusion_model(ensure_dit(comfyui_path(), CACHE, kind))
    lora = attach_lora(model, rank=RANK, alpha=ALPHA, seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, parameter in lora.parameters.items():
            if not key.endswith(".alpha"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * SCALE)
    state = lora.state_dict()
    wanted = prediction(lora.inference_patcher(), kind)
    yield kind, model, state, wanted
    del model, lora
    comfy.model_management.unload_all_models()
    gc.collect()


def prediction(patcher, kind):
    """One Euler step from pure noise at cfg 1: the model's denoised prediction."""
    import comfy.sample

    shape = DIT_FAMILIES[kind].latent_shape if kind in DIT_FAMILIES else DIT_LATENT_SHAPE
    latent = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(1, *shape))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    conditioning = dit_conditioning(kind, tokens=TOKENS)
    with torch.no_grad():
        return comfy.sample.sample(
            patcher, noise, 1, 1.0, "euler", "simple", conditioning, conditioning, latent, seed=0, disable_pbar=True
        ).float()


def test_family_offers_its_layouts(family):
    from prefpersonalize.comfy_glue.families import model_family

    kind, model, _, _ = family
    name, layouts, version = EXPECTED[kind]
    described = model_family(model.model)
    assert described.name == name
    assert tuple(layout for layout, _ in described.lora_layouts) == layouts
    assert described.base_model_version(model.model.model_config.unet_config) == version


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "comfyui"])
def test_each_layout_loads_in_the_stock_loader_and_resumes(family, layout, tmp_path, caplog):
    import comfy.sd
    import comfy.utils

    from prefpersonalize.trainers.lora_files import read_lora_layers, save_lora

    kind, model, state, wanted = family
    _, layouts, version = EXPECTED[kind]
    path = str(tmp_path / f"{kind}_{layout}.safetensors")
    if layout not in layouts:
        works = " or ".join(layouts)
        with pytest.raises(ValueError, match=f"the {layout} layout has no naming for .*; save in the {works} layout"):
            save_lora(state, path, model, layout)
        assert not os.path.exists(path)
        return
    save_lora(state, path, model, layout)
    tensors = comfy.utils.load_torch_file(path)
    meta = header(path)
    assert meta["prefp_layout"] == layout and meta["ss_network_dim"] == str(RANK)
    assert meta["prefp_base_family"] == type(model.model.model_config).__name__
    assert meta["ss_network_alpha"] == (str(RANK) if layout == "diffusers" else f"{ALPHA:g}")
    assert meta.get("ss_base_model_version") == version
    if layout == "kohya":
        assert all(key.startswith("lora_unet_") for key in tensors)
    elif layout == "diffusers":
        prefix = DIFFUSERS_PREFIX.get(kind, "transformer.")
        assert all(key.startswith(prefix) and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in tensors)
    else:
        assert tensors.keys() == state.keys()

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # what LoraLoader does
        loaded, _ = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    assert not [record.getMessage() for record in caplog.records if "lora key not loaded" in record.getMessage()]
    base, got = prediction(model, kind), prediction(loaded, kind)
    assert (wanted - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4)

    layers = read_lora_layers(tensors, model)
    assert sorted(layers) == sorted({key.rsplit(".", 2)[0] for key in state if key.endswith(".lora_up.weight")})
    for name, (up, down, alpha) in layers.items():
        scale = ALPHA / RANK if layout == "diffusers" else 1.0
        torch.testing.assert_close(up, state[f"{name}.lora_up.weight"] * scale, rtol=0, atol=0)
        assert torch.equal(down, state[f"{name}.lora_down.weight"])
        assert alpha == (RANK if layout == "diffusers" else ALPHA)


def diffusers_modules(tensors):
    return {key.rsplit(".", 2)[0] for key in tensors if key.endswith((".lora_A.weight", ".lora_B.weight"))}


def test_diffusers_converters_read_the_layouts_as_the_same_layers(family, tmp_path):
    """diffusers' own converters (its readers of the community's files) give the same diffusers
    module names for each layout the pack writes: Flux.1 kohya = the diffusers layout, Flux.2
    kohya = comfyui (ai-toolkit's names), Qwen-Image comfyui = diffusers, Z-Image's diffusers
    layout (ai-toolkit's names) read as Z-Image's."""
    import comfy.utils

    from prefpersonalize.trainers.lora_files import save_lora

    kind, model, state, _ = family
    if kind not in ("flux", "flux2_klein", "qwen_image", "z_image"):
        pytest.skip(f"diffusers has no converter of {kind} LoRAs")
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")

    def saved(layout):
        return comfy.utils.load_torch_file(save_lora(state, str(tmp_path / f"{layout}.safetensors"), model, layout))

    def transformer(tensors):
        return {
            key if key.startswith("transformer.") else f"transformer.{key}": value for key, value in tensors.items()
        }

    if kind == "flux":
        ours, theirs = saved("diffusers"), conversion._convert_kohya_flux_lora_to_diffusers(saved("kohya"))
    elif kind == "flux2_klein":
        # ai-toolkit's Flux.2 files carry no .alpha, which this converter refuses: compare names.
        comfyui = {key: value for key, value in saved("comfyui").items() if not key.endswith(".alpha")}
        ours = conversion._convert_non_diffusers_flux2_lora_to_diffusers(comfyui)
        theirs = conversion._convert_kohya_flux2_lora_to_diffusers(saved("kohya"))
    elif kind == "qwen_image":
        ours, theirs = saved("diffusers"), conversion._convert_non_diffusers_qwen_lora_to_diffusers(saved("comfyui"))
    else:
        file = saved("diffusers")
        ours = {key.replace("diffusion_model.", "transformer.", 1): value for key, value in file.items()}
        theirs = conversion._convert_non_diffusers_z_image_lora_to_diffusers(file)
    assert diffusers_modules(transformer(theirs)) == diffusers_modules(transformer(ours)) != set()


def test_hidream_offers_diffusers_and_comfyui_names(comfy_modules):
    """HiDream is not built (17 B); its description says which layouts it offers and refuses."""
    from prefpersonalize.comfy_glue.families import FAMILIES

    hidream = next(family for family in FAMILIES if family.name == "HiDream")
    assert [layout for layout, _ in hidream.lora_layouts] == ["diffusers", "comfyui"]
    assert hidream.lora_naming("diffusers").prefix == "transformer."
    assert hidream.base_model_version({"hidden_size": 2560}) is None
    with pytest.raises(ValueError, match="kohya layout has no naming for HiDream models; save in the diffusers or"):
        hidream.lora_naming("kohya")
