"""Focus Regions, Train Patch Quality Estimator and Personalization Metrics inside a real
ComfyUI server, through /prompt."""

import os

import numpy as np
import pytest
from PIL import Image

from harness.comfy_server import PromptError
from harness.graphs import BUILTIN_BACKBONE as BUILTIN
from prefpersonalize.pure.backbone import read_tuned_head

pytestmark = pytest.mark.server


def base_nodes():
    return {
        "1": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "chelsea.png"}},
        "2": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "coffee.png"}},
        "3": {"class_type": "ImageFlip", "inputs": {"image": ["1", 0], "flip_method": "y-axis: horizontally"}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["2", 0]}},  # [cat, coffee]
        "5": {"class_type": "PrefP_PatchBackboneLoader", "inputs": {"backbone": BUILTIN}},
    }


def focus_node(**overrides):
    inputs = {
        "backbone": ["5", 0],
        "generated": ["4", 0],
        "references": ["1", 0],
        "percent": 0.0,
        "gate_start": 0.3,
        "gate_end": 0.7,
        "complexity_weight": 1.0,
        "strip_frames": 4,
        "resolution": 192,
        "overlay_opacity": 0.5,
    }
    inputs.update(overrides)
    return {"class_type": "PrefP_FocusRegions", "inputs": inputs}


def saved_pixels(server, entry, node_id):
    return [
        np.asarray(Image.open(server.output_path(image)), dtype=np.float32) / 255.0
        for image in entry["outputs"][node_id]["images"]
    ]


def test_focus_regions_mismatch_and_strip(comfy_server):
    prompt = {
        **base_nodes(),
        "10": focus_node(),
        "11": {"class_type": "MaskToImage", "inputs": {"mask": ["10", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "focus_test/focus"}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["10", 2], "filename_prefix": "focus_test/strip"}},
        "14": {"class_type": "MaskToImage", "inputs": {"mask": ["10", 4]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "focus_test/complexity"}},
    }
    entry = comfy_server.run(prompt)
    cat_focus, coffee_focus = (image.mean() for image in saved_pixels(comfy_server, entry, "12"))
    assert coffee_focus > cat_focus + 0.3  # the unrelated image is all mismatch at noisy steps
    strips = saved_pixels(comfy_server, entry, "13")
    assert len(strips) == 2 and strips[0].shape[1] > 3 * strips[0].shape[0] // 2  # 4 frames side by side
    complexity = saved_pixels(comfy_server, entry, "15")
    assert all(0.0 < image.mean() < 1.0 for image in complexity)


def test_focus_strip_frames_sit_at_the_connected_sigmas(comfy_server):
    """With a scheduler's sigmas and the MODEL, the strip's frames are those steps, at percents
    from the MODEL's schedule. The low-noise half of an 8-step schedule starts near percent 0.5,
    where the complexity map is half gated in; the high-noise half and the even spacing without
    sigmas both start at percent 0 (correspondence only)."""
    save = {"class_type": "SaveImage"}
    prompt = {
        **base_nodes(),
        "20": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "21": {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["20", 0], "scheduler": "normal", "steps": 8, "denoise": 1.0},
        },
        "22": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["21", 0], "step": 4}},
        "10": focus_node(sigmas=["22", 1], model=["20", 0], strip_frames=2),  # steps 5-8
        "11": focus_node(sigmas=["22", 0], model=["20", 0], strip_frames=2),  # steps 1-4
        "12": focus_node(strip_frames=2),  # no sigmas: percents 0 and 1
        "13": {**save, "inputs": {"images": ["10", 2], "filename_prefix": "focus_test/strip_low"}},
        "14": {**save, "inputs": {"images": ["11", 2], "filename_prefix": "focus_test/strip_high"}},
        "15": {**save, "inputs": {"images": ["12", 2], "filename_prefix": "focus_test/strip_even"}},
    }
    entry = comfy_server.run(prompt)
    low, high, even = (saved_pixels(comfy_server, entry, node)[1] for node in ("13", "14", "15"))  # the coffee
    assert low.shape == high.shape == even.shape
    frame_width = (even.shape[1] - 4) // 2  # two frames, a 4-px gap
    caption = max(14, (even.shape[0] - 14) // 12) + 1

    def first_frame(strip):
        return strip[caption:, :frame_width]

    assert np.abs(first_frame(high) - first_frame(even)).mean() < 0.01  # both at percent 0
    assert np.abs(first_frame(low) - first_frame(even)).mean() > 0.03  # percent ~0.5: complexity counts


def test_focus_regions_bad_masks(comfy_server):
    prompt = {
        **base_nodes(),
        "30": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "10": focus_node(subject_masks=["30", 0]),
        "13": {"class_type": "SaveImage", "inputs": {"images": ["10", 2], "filename_prefix": "focus_test/bad"}},
    }
    with pytest.raises(PromptError, match="Focus Regions: the subject mask covers no reference patch"):
        comfy_server.run(prompt)
    prompt["10"]["inputs"]["gate_end"] = 0.1
    with pytest.raises(PromptError, match="gate_end"):
        comfy_server.run(prompt)
    comfy_server.assert_serving("PrefP_FocusRegions")


def estimator_node(**overrides):
    """Train Patch Quality Estimator on the built-in backbone and the cat photo, 0 steps by default."""
    inputs = {
        "backbone": ["5", 0],
        "references": ["1", 0],
        "steps": 0,
        "learning_rate": 0.001,
        "resolution": 128,
        "seed": 0,
        "save_name": "",
    }
    return {"class_type": "PrefP_TrainPatchQualityEstimator", "inputs": {**inputs, **overrides}}


def test_train_estimator_saves_a_loadable_backbone(comfy_server):
    name = "chelsea_tuned_test"
    prompt = {
        **base_nodes(),
        "40": estimator_node(
            references=["4", 0], steps=15, learning_rate=0.002, resolution=160, save_name=f"../{name}"
        ),
    }
    entry = comfy_server.run(prompt)
    report = entry["outputs"]["40"]["text"][0]
    assert "held-out views" in report and "15 steps" in report
    path = os.path.join(comfy_server.base_directory, "models", "patch_backbones", f"{name}.safetensors")
    assert os.path.isfile(path) and f"saved {path}" in report
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".partial")]

    listed = comfy_server.object_info("PrefP_PatchBackboneLoader")["PrefP_PatchBackboneLoader"]
    assert f"{name}.safetensors" in listed["input"]["required"]["backbone"][1]["options"]
    scoring = {
        **base_nodes(),
        "5": {"class_type": "PrefP_PatchBackboneLoader", "inputs": {"backbone": f"{name}.safetensors"}},
        "41": {
            "class_type": "PrefP_PatchQualityScore",
            "inputs": {
                "backbone": ["5", 0],
                "generated": ["1", 0],
                "references": ["1", 0],
                "resolution": 128,
                "overlay_opacity": 0.5,
            },
        },
    }
    text = comfy_server.run(scoring)["outputs"]["41"]["text"][0]
    assert "tuned" in text and float(text.splitlines()[0].split(": ")[1]) == pytest.approx(1.0, abs=1e-3)


def test_train_estimator_zero_steps_is_well_defined_and_never_overwrites(comfy_server):
    def prompt(seed):
        return {
            **base_nodes(),
            "40": estimator_node(steps=0, seed=seed, save_name="zero_steps_head"),
        }

    report = comfy_server.run(prompt(0))["outputs"]["40"]["text"][0]
    before, after = (float(x) for x in report.split(": ")[1].split(" (")[0].split(" -> "))
    assert before == after
    folder = os.path.join(comfy_server.base_directory, "models", "patch_backbones")
    first = os.path.join(folder, "zero_steps_head.safetensors")
    assert f"saved {first}" in report
    written = os.stat(first)
    second = comfy_server.run(prompt(1))["outputs"]["40"]["text"][0]  # same name: a new file, not over the first
    assert f"saved {os.path.join(folder, 'zero_steps_head_2.safetensors')}" in second
    unchanged = os.stat(first)
    assert (unchanged.st_ino, unchanged.st_mtime_ns, unchanged.st_size) == (
        written.st_ino,
        written.st_mtime_ns,
        written.st_size,
    )
    for name in ("zero_steps_head.safetensors", "zero_steps_head_2.safetensors"):
        base, head = read_tuned_head(os.path.join(folder, name))
        assert base == BUILTIN and set(head) == {"weight", "bias"}
    options = comfy_server.object_info("PrefP_PatchBackboneLoader")["PrefP_PatchBackboneLoader"]
    assert {"zero_steps_head.safetensors", "zero_steps_head_2.safetensors"} <= set(
        options["input"]["required"]["backbone"][1]["options"]
    )


def metrics_node(**extra):
    inputs = {"generated": ["4", 0], "references": ["1", 0], "prompt_text": "a photo of a cat"}
    inputs.update(extra)
    return {"class_type": "PrefP_PersonalizationMetrics", "inputs": inputs}


def test_metrics_dino_clip_i_clip_t_and_delta(comfy_server):
    comfy_server.provide_clip_vision("clip_vit_l14_random.safetensors")
    prompt = {
        **base_nodes(),
        "20": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "50": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vit_l14_random.safetensors"}},
        "51": metrics_node(
            generated=["1", 0], backbone=["5", 0], clip_vision=["50", 0], clip=["20", 1], generated_before=["2", 0]
        ),
        "52": {"class_type": "SaveImage", "inputs": {"images": ["51", 4], "filename_prefix": "metrics_test/table"}},
    }
    entry = comfy_server.run(prompt)
    report = entry["outputs"]["51"]["text"][0]
    rows = {line.split()[0]: line.split() for line in report.splitlines()[1:4]}
    assert rows["DINO*"][1] == "1.0000" and rows["CLIP-I"][1] == "1.0000"  # identical images
    assert float(rows["DINO*"][3]) > 0 and float(rows["CLIP-I"][3]) > 0  # after (cat) beats before (coffee)
    assert rows["CLIP-T"][1] != "n/a"
    assert "approximate" in report
    assert len(entry["outputs"]["52"]["images"]) == 1


def test_metrics_missing_models_are_reported_or_refused(comfy_server):
    entry = comfy_server.run({**base_nodes(), "51": metrics_node(backbone=["5", 0])})
    report = entry["outputs"]["51"]["text"][0]
    assert "CLIP-I: connect Load CLIP Vision" in report
    with pytest.raises(PromptError, match="Personalization Metrics: connect a backbone"):
        comfy_server.run({**base_nodes(), "51": metrics_node()})


def test_image_warnings_name_the_node_they_come_from(comfy_server):
    prompt = {
        **base_nodes(),
        "60": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 451, "height": 300}},
        "61": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["60", 0]}},
        "10": focus_node(references=["61", 0]),
    }
    offset = comfy_server.log_offset()
    comfy_server.run(prompt)
    assert "Focus Regions: 'references' has 4 channel(s); converted to RGB" in comfy_server.log_since(offset)
