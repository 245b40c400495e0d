"""LoRA files on ComfyUI's real model classes (tiny SD1.5 checkpoint, CPU, in-process): the
trained LoRA saved in kohya and comfyui layout with the run in its header, loaded back by the
stock LoRA loader and by resume_lora, and bad files refused. The full-size SD1.5 file against
diffusers' own LoRA loader is in test_full_size.py."""

import json
import logging
import os
import struct

import pytest
import torch

from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.pairs import uniform_pairs
from harness.tiny_checkpoint import DENOISER_PROMPT, LATENT_SHAPE, ensure_checkpoint

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def tiny(comfy_modules):
    import comfy.sd

    path = ensure_checkpoint(comfyui_path(), os.path.join(DEFAULT_CACHE, "checkpoints"), kind="sd15")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(DENOISER_PROMPT), return_pooled=True)
    return model, [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def trained(tiny):
    """(model, pairs, config, result) of a short run whose LoRA changes the prediction."""
    from prefpersonalize.trainers.loop import DPOTrainingConfig, train_dpo_lora

    model, conditioning = tiny
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(8, *LATENT_SHAPE, generator=generator)
    pairs = uniform_pairs(conditioning, latents[:4], latents[4:])
    config = DPOTrainingConfig(loss_mode="dpo", beta=2000.0, steps=3, learning_rate=5e-3, rank=4, alpha=2.0)
    return model, pairs, config, train_dpo_lora(model, pairs, config)


def header(path):
    """A safetensors file's ``__metadata__``, read from its JSON header."""
    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(size)).get("__metadata__", {})


def prediction(patcher, conditioning):
    import comfy.model_management

    from prefpersonalize.trainers.pair_batches import PairBatcher

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    x = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([1.5, 4.0])
    pairs = uniform_pairs(conditioning, x[:1], x[1:])
    kwargs = PairBatcher(patcher, pairs).batch([0], torch.tensor([0.5]), torch.Generator().manual_seed(0)).kwargs
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, **kwargs)


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_saved_file_loads_and_resumes_as_the_trained_lora(trained, tiny, tmp_path, caplog, layout):
    import comfy.sd
    import comfy.utils

    from prefpersonalize.comfy_glue.versions import pack_version
    from prefpersonalize.trainers.loop import training_metadata
    from prefpersonalize.trainers.lora_adapters import attach_lora
    from prefpersonalize.trainers.lora_files import LoraWithMetadata, read_lora_layers, save_lora

    model, pairs, config, result = trained
    _, conditioning = tiny
    state = result.lora.state_dict()
    path = save_lora(
        LoraWithMetadata(state, training_metadata(config, pairs, model, result.steps_done)),
        os.path.join(tmp_path, "lora.safetensors"),
        model,
        layout,
    )
    assert os.listdir(tmp_path) == ["lora.safetensors"]
    meta = header(path)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["prefp_base_family"] == "SD15"
    assert meta["prefp_loss_mode"] == "dpo" and meta["prefp_beta"] == "2000"
    assert meta["ss_steps"] == "3" and meta["prefp_pair_count"] == "4" and meta["ss_resolution"] == "(64, 64)"
    assert meta["prefp_layout"] == layout and meta["prefp_pack_version"] == pack_version() != "unknown"

    tensors = comfy.utils.load_torch_file(path)
    if layout == "kohya":
        assert all(key.startswith("lora_unet_") for key in tensors)
        assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in tensors  # diffusers names
        assert tensors["lora_unet_conv_in.lora_down.weight"].shape == (4, 4, 3, 3)  # conv LoRAs are 4-D
        assert tensors["lora_unet_conv_in.lora_up.weight"].shape == (320, 4, 1, 1)
        # Save DPO LoRA also converts a LoRA loaded from a file of another layout.
        back = save_lora(tensors, os.path.join(tmp_path, "back.safetensors"), model, "comfyui")
        converted = comfy.utils.load_torch_file(back)
        assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
        os.remove(back)
    else:
        assert tensors.keys() == state.keys()

    with caplog.at_level(logging.WARNING):  # what LoraLoader does
        loaded, _ = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    assert not [record for record in caplog.records if "lora key not loaded" in record.getMessage()]
    base, wanted = prediction(model, conditioning), prediction(result.model, conditioning)
    assert (wanted - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(prediction(loaded, conditioning), wanted, rtol=1e-4, atol=1e-5)

    layers = read_lora_layers(tensors, model)
    assert len(layers) == len(result.lora.layers)
    for name, (up, down, alpha) in layers.items():
        assert torch.equal(up, state[f"{name}.lora_up.weight"]) and torch.equal(down, state[f"{name}.lora_down.weight"])
        assert alpha == pytest.approx(float(state[f"{name}.alpha"]))
    resumed = attach_lora(model, rank=8, alpha=8.0, resume=layers).inference_patcher()
    torch.testing.assert_close(prediction(resumed, conditioning), wanted, rtol=1e-4, atol=1e-5)


def test_trainer_node_output_carries_the_run(trained):
    """The LORA_MODEL the node outputs is a plain dict for core nodes, with the run attached."""
    from prefpersonalize.trainers.loop import training_metadata
    from prefpersonalize.trainers.lora_files import LoraWithMetadata

    model, pairs, config, result = trained
    lora = LoraWithMetadata(result.lora.state_dict(), training_metadata(config, pairs, model, result.steps_done))
    assert isinstance(lora, dict) and lora.keys() == result.lora.state_dict().keys()
    assert lora.metadata["ss_max_train_steps"] == "3" and lora.metadata["prefp_timestep_range"] == "0-1"


def test_bad_lora_files_are_refused(trained, tmp_path):
    from prefpersonalize.trainers.loop import train_dpo_lora
    from prefpersonalize.trainers.lora_files import read_lora_layers, save_lora

    model, pairs, config, result = trained
    with pytest.raises(ValueError, match="unknown layout or made for another model family"):
        read_lora_layers({"transformer.blocks.0.attn.lora_A.weight": torch.zeros(2, 8)}, model)
    with pytest.raises(ValueError, match="unknown layout"):
        train_dpo_lora(model, pairs, config, resume={"some.layer.hada_w1_a": torch.zeros(2, 2)})
    # A LoHa on a real layer: ComfyUI reads it, but it is no plain LoRA to continue.
    shapes = {"hada_w1_a": (320, 2), "hada_w1_b": (2, 320), "hada_w2_a": (320, 2), "hada_w2_b": (2, 320)}
    loha = {f"lora_unet_input_blocks_1_1_proj_in.{name}": torch.zeros(shape) for name, shape in shapes.items()}
    with pytest.raises(ValueError, match="holds a loha patch .* continues plain LoRAs"):
        read_lora_layers(loha, model)
    state = result.lora.state_dict()
    with pytest.raises(ValueError, match="unknown LoRA layout 'a1111'"):
        save_lora(state, os.path.join(tmp_path, "a.safetensors"), model, "a1111")
    with pytest.raises(ValueError, match="no LoRA tensor; save in the comfyui layout"):
        save_lora({**state, "diffusion_model.out.2.diff": torch.zeros(4)}, os.path.join(tmp_path, "b.st"), model)
    assert os.listdir(tmp_path) == []  # nothing half-written
