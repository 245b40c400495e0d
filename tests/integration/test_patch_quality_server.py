"""Patch-quality nodes inside a real ComfyUI server: registration, graphs queued over HTTP,
bad input answered with clear messages while the server keeps serving."""

import os

import pytest
import torch
import transformers
from PIL import Image

from harness.comfy_server import PromptError
from harness.graphs import BUILTIN_BACKBONE as BUILTIN
from harness.graphs import generation

pytestmark = pytest.mark.server


def scoring(generated=("6", 0), references=("10", 0), backbone=BUILTIN, mask=None):
    """Nodes 10-13: example photo, backbone, Patch Quality Score, SaveImage of the heat map."""
    score_inputs = {
        "backbone": ["11", 0],
        "generated": list(generated),
        "references": list(references),
        "resolution": 128,
        "overlay_opacity": 0.5,
    }
    if mask is not None:
        score_inputs["subject_mask"] = list(mask)
    return {
        "10": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "chelsea.png"}},
        "11": {"class_type": "PrefP_PatchBackboneLoader", "inputs": {"backbone": backbone}},
        "12": {"class_type": "PrefP_PatchQualityScore", "inputs": score_inputs},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 2], "filename_prefix": "pq_test"}},
    }


def test_scores_generated_batch_against_bundled_photo(comfy_server):
    entry = comfy_server.run({**generation(size=64, batch=2), **scoring()})
    heatmaps = entry["outputs"]["13"]["images"]
    assert len(heatmaps) == 2
    for image in heatmaps:
        with Image.open(comfy_server.output_path(image)) as picture:
            assert picture.size == (64, 64)
    text = entry["outputs"]["12"]["text"][0]
    lines = text.splitlines()
    assert lines[0].startswith("image 1: ") and lines[1].startswith("image 2: ")
    scores = [float(line.split(": ")[1]) for line in lines[:2]]
    assert all(0.0 <= score <= 1.0 for score in scores)


def test_identical_image_scores_one_through_the_graph(comfy_server):
    entry = comfy_server.run(scoring(generated=("10", 0)))
    score = float(entry["outputs"]["12"]["text"][0].splitlines()[0].split(": ")[1])
    assert score == pytest.approx(1.0, abs=1e-3)


def test_rgba_references_of_another_size_and_count(comfy_server):
    prompt = {
        **generation(size=64, batch=1),
        **scoring(references=("22", 0)),
        "20": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "coffee.png"}},
        "21": {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["20", 0]}},
        "23": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 451, "height": 300}},
        "24": {"class_type": "MaskToImage", "inputs": {"mask": ["23", 0]}},
        "25": {"class_type": "RepeatImageBatch", "inputs": {"image": ["24", 0], "amount": 2}},
        "26": {"class_type": "ImageToMask", "inputs": {"image": ["25", 0], "channel": "red"}},
        "22": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["21", 0], "alpha": ["26", 0]}},
    }
    entry = comfy_server.run(prompt)
    assert "2 reference image(s)" in entry["outputs"]["12"]["text"][0]


def test_subject_mask_count_mismatch_is_a_clear_error(comfy_server):
    prompt = {
        **generation(size=64, batch=1),
        **scoring(mask=("31", 0)),
        "30": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "31": {"class_type": "RepeatImageBatch", "inputs": {"image": ["32", 0], "amount": 3}},
        "32": {"class_type": "MaskToImage", "inputs": {"mask": ["30", 0]}},
        "33": {"class_type": "ImageToMask", "inputs": {"image": ["31", 0], "channel": "red"}},
    }
    prompt["12"]["inputs"]["subject_mask"] = ["33", 0]
    with pytest.raises(PromptError, match="Patch Quality Score: got 3 subject masks for 1 reference"):
        comfy_server.run(prompt)
    comfy_server.assert_serving("PrefP_PatchQualityScore")


def test_missing_reference_input_is_rejected_before_running(comfy_server):
    prompt = {**generation(size=64, batch=1), **scoring()}
    del prompt["12"]["inputs"]["references"]
    with pytest.raises(PromptError) as error:
        comfy_server.queue(prompt)
    assert "references" in str(error.value.payload["node_errors"]["12"])
    comfy_server.assert_serving("PrefP_PatchQualityScore")


def test_missing_backbone_file_says_where_it_goes(comfy_server):
    with pytest.raises(PromptError) as error:
        comfy_server.queue(scoring(generated=("10", 0), backbone="dinov2-small/"))
    message = str(error.value.payload["node_errors"]["11"])
    assert "was not found" in message and "models/patch_backbones" in message
    comfy_server.assert_serving("PrefP_PatchQualityScore")


def test_dinov2_from_models_folder_and_corrupt_file(comfy_server):
    folder = os.path.join(comfy_server.base_directory, "models", "patch_backbones")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    model = transformers.Dinov2Model(
        transformers.Dinov2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=1, patch_size=14, image_size=56
        )
    )
    model.save_pretrained(os.path.join(folder, "dinov2-tiny"))
    with open(os.path.join(folder, "broken.safetensors"), "wb") as handle:
        handle.write(b"not a safetensors file")

    options = comfy_server.object_info("PrefP_PatchBackboneLoader")["PrefP_PatchBackboneLoader"]
    listed = options["input"]["required"]["backbone"][1]["options"]
    assert "dinov2-tiny/" in listed and "broken.safetensors" in listed

    entry = comfy_server.run(scoring(generated=("10", 0), backbone="dinov2-tiny/"))
    assert "DINOv2 (dinov2-tiny)" in entry["outputs"]["12"]["text"][0]

    with pytest.raises(PromptError, match="Patch Backbone Loader: cannot load 'broken.safetensors'"):
        comfy_server.run(scoring(generated=("10", 0), backbone="broken.safetensors"))
    comfy_server.assert_serving("PrefP_PatchQualityScore")


def test_empty_subject_mask_means_whole_reference(comfy_server):
    prompt = {
        **scoring(generated=("10", 0), mask=("40", 0)),
        "40": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
    }
    entry = comfy_server.run(prompt)
    assert float(entry["outputs"]["12"]["text"][0].splitlines()[0].split(": ")[1]) == pytest.approx(1.0, abs=1e-3)
