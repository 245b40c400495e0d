"""Preference pairs and the DPO LoRA Trainer inside a real ComfyUI server: the saved LoRA
loads with the stock LoraLoaderModelOnly and changes the model like the trainer's MODEL does;
pairs save and load; Cancel mid-training stops cleanly and keeps the last good LoRA."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from harness import REPO_ROOT
from harness.comfy_server import ComfyServer, PromptError, comfyui_path
from harness.graphs import BUILTIN_BACKBONE as BUILTIN
from harness.graphs import attention_node, generation

pytestmark = pytest.mark.server


def candidates_and_pairs():
    """Nodes 1-10: tiny checkpoint, 3 candidates at 64 px, patch quality, ranked pairs."""
    return {
        **generation(size=64, batch=3, seed=5, steps=3, cfg=3.0),
        "7": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "chelsea.png"}},
        "8": {"class_type": "PrefP_PatchBackboneLoader", "inputs": {"backbone": BUILTIN}},
        "9": {
            "class_type": "PrefP_PatchQualityScore",
            "inputs": {
                "backbone": ["8", 0],
                "generated": ["6", 0],
                "references": ["7", 0],
                "resolution": 128,
                "overlay_opacity": 0.5,
            },
        },
        "10": {
            "class_type": "PrefP_PairsFromRankedCandidates",
            "inputs": {
                "vae": ["1", 2],
                "positive": ["2", 0],
                "candidates": ["6", 0],
                "patch_quality": ["9", 0],
                "pairing": "all_above_margin",
                "margin": 0.0,
            },
        },
    }


def trainer(steps=4, **overrides):
    inputs = {
        "model": ["1", 0],
        "pairs": ["10", 0],
        "loss_mode": "patch_dpo",
        "beta": 2000.0,
        "steps": steps,
        "learning_rate": 2e-3,
        "rank": 4,
        "alpha": 4.0,
        "batch_size": 1,
        "grad_accumulation": 1,
        "seed": 0,
        "timestep_start": 0.0,
        "timestep_end": 1.0,
        "timestep_sampling": "uniform",
        "training_dtype": "auto",
        "gradient_checkpointing": False,
        "stats_weight": 0.1,
        "preserve_outside": 0.0,
        "save_every": 0,
        "save_prefix": "test_lora",
    }
    inputs.update(overrides)
    return {"class_type": "PrefP_DPOLoraTrainer", "inputs": inputs}


def sample_and_save(model_ref, prefix, node_base):
    a, b = str(node_base), str(node_base + 1)
    return {
        a: {
            "class_type": "KSampler",
            "inputs": {
                "model": model_ref,
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 9,
                "steps": 3,
                "cfg": 3.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        b: {"class_type": "SaveLatent", "inputs": {"samples": [a, 0], "filename_prefix": prefix}},
    }


def saved_latent(server, entry, node_id):
    info = entry["outputs"][node_id]["latents"][0]
    return safetensors.torch.load_file(server.output_path(info))["latent_tensor"]


def sampled_with_lora(server, path, name):
    """The latent ``sample_and_save`` makes of the candidates' empty latent with the LoRA file at ``path``
    copied to models/loras/ and loaded by the stock LoraLoaderModelOnly."""
    loras = os.path.join(server.base_directory, "models", "loras")
    os.makedirs(loras, exist_ok=True)
    shutil.copy(path, os.path.join(loras, f"{name}.safetensors"))
    loader = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": f"{name}.safetensors", "strength_model": 1.0},
    }
    prompt = {**candidates_and_pairs(), "30": loader, **sample_and_save(["30", 0], name, 31)}
    return saved_latent(server, server.run(prompt), "32")


def test_saved_lora_loads_with_stock_loader_like_the_trained_model(comfy_server):
    """Save DPO LoRA writes the kohya layout with the run in the header; the stock LoraLoader
    reproduces the trained MODEL from it; core Save LoRA Weights still takes the trainer's LoRA."""
    prompt = {
        **candidates_and_pairs(),
        "11": trainer(),
        "12": {
            "class_type": "PrefP_SaveDPOLora",
            "inputs": {
                "lora": ["11", 1],
                "model": ["1", 0],
                "filename_prefix": "server_test",
                "layout": "kohya",
                "steps": ["11", 4],
            },
        },
        "13": {"class_type": "PrefP_PreviewPreferencePairs", "inputs": {"pairs": ["10", 0], "max_pairs": 4}},
        "14": {"class_type": "SaveLoRA", "inputs": {"lora": ["11", 1], "prefix": "loras/core_saved"}},
        **sample_and_save(["11", 0], "trained", 20),
        **sample_and_save(["1", 0], "base", 22),
    }
    entry = comfy_server.run(prompt)
    assert len(entry["outputs"]["13"]["images"]) == 1
    trained, base = saved_latent(comfy_server, entry, "21"), saved_latent(comfy_server, entry, "23")
    assert (trained - base).abs().max() > 1e-3

    folder = os.path.join(comfy_server.base_directory, "output", "loras")
    assert glob.glob(os.path.join(folder, "core_saved*.safetensors"))
    saved = glob.glob(os.path.join(folder, "server_test*.safetensors"))
    assert [os.path.basename(path) for path in saved] == ["server_test_4_steps.safetensors"]
    assert f"Saved {saved[0]}" in entry["outputs"]["12"]["text"][0]
    with safetensors.safe_open(saved[0], "pt") as file:
        header = file.metadata()
        assert all(key.startswith("lora_unet_") for key in file.keys())
    assert header["ss_steps"] == "4" and header["prefp_loss_mode"] == "patch_dpo"
    assert header["prefp_pair_count"] == "3" and header["ss_base_model_version"] == "sd_v1"
    reloaded = sampled_with_lora(comfy_server, saved[0], "server_test")
    assert (reloaded - trained).abs().max() < 1e-3, (reloaded - trained).abs().max()


def test_pairs_from_the_graph_train_headless_and_load_back(comfy_server):
    """The README's loop: Export Training Job in the graph, tools/train_dpo.py, LoraLoader."""
    options = {key: value for key, value in trainer(steps=2)["inputs"].items() if key not in ("model", "pairs")}
    del options["save_prefix"]
    export = {
        "class_type": "PrefP_ExportTrainingJob",
        "inputs": {
            "pairs": ["10", 0],
            "model": ["1", 0],
            "model_file": "checkpoints/tiny_sd15.safetensors",
            "name": "loop",
            "layout": "kohya",
            **options,
        },
    }
    entry = comfy_server.run({**candidates_and_pairs(), "14": export})
    job = re.search(r"Wrote (\S+job\.json)", entry["outputs"]["14"]["text"][0]).group(1)
    assert os.path.dirname(job) == os.path.join(comfy_server.base_directory, "output", "training_jobs", "loop")
    tool = os.path.join(REPO_ROOT, "tools", "train_dpo.py")
    environment = {**os.environ, "COMFYUI_PATH": comfyui_path()}
    run = subprocess.run([sys.executable, tool, job, "--cpu"], capture_output=True, text=True, env=environment)
    assert run.returncode == 0, run.stdout + run.stderr
    lora = os.path.join(os.path.dirname(job), "loop.safetensors")
    with safetensors.safe_open(lora, "pt") as file:
        assert file.metadata()["ss_steps"] == "2" and file.metadata()["prefp_pair_count"] == "3"

    base_prompt = {**candidates_and_pairs(), **sample_and_save(["1", 0], "loop_base", 20)}
    base = saved_latent(comfy_server, comfy_server.run(base_prompt), "21")
    assert (sampled_with_lora(comfy_server, lora, "loop") - base).abs().max() > 1e-4


@pytest.fixture(scope="module")
def saved_pair_set(comfy_server):
    """The candidates' ranked pairs saved as 'server test' (-> server_test.safetensors)."""
    prompt = {
        **candidates_and_pairs(),
        "14": {"class_type": "PrefP_SavePreferencePairs", "inputs": {"pairs": ["10", 0], "name": "server test"}},
    }
    entry = comfy_server.run(prompt)
    assert "saved 3 pairs" in entry["outputs"]["14"]["text"][0]  # 3 candidates, all gaps > 0
    return "server_test.safetensors"


def test_pairs_reload_and_train(comfy_server, saved_pair_set):
    saved = sorted(os.listdir(os.path.join(comfy_server.base_directory, "output", "preference_pairs")))
    assert "server_test.safetensors" in saved and "server_test.json" in saved
    info = comfy_server.object_info("PrefP_LoadPreferencePairs")["PrefP_LoadPreferencePairs"]
    assert "server_test.safetensors" in info["input"]["required"]["file"][1]["options"]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "10": {"class_type": "PrefP_LoadPreferencePairs", "inputs": {"file": "server_test.safetensors"}},
        "11": trainer(steps=2, loss_mode="focus_dpo"),
    }
    entry = comfy_server.run(prompt)
    assert len(entry["outputs"]["11"]["images"]) == 1  # the plot preview


def test_joint_set_training_in_the_graph(comfy_server):
    """Reference photos given to the pair builder travel with the pairs (saved too) and the
    trainer trains in the joint batch when its MODEL went through Joint Attention."""
    prompt = candidates_and_pairs()
    prompt["10"]["inputs"]["references"] = ["7", 0]
    prompt.update(
        {
            **attention_node("11"),
            "12": trainer(steps=2, model=["11", 0]),
            "13": {
                "class_type": "PrefP_SavePreferencePairs",
                "inputs": {"pairs": ["10", 0], "name": "with references"},
            },
        }
    )
    offset = comfy_server.log_offset()
    entry = comfy_server.run(prompt)
    assert len(entry["outputs"]["12"]["images"]) == 1
    assert "Training in the joint batch with 1 reference latents" in comfy_server.log_since(offset)
    saved = safetensors.torch.load_file(
        os.path.join(comfy_server.base_directory, "output", "preference_pairs", "with_references.safetensors")
    )
    assert saved["references"].shape == (1, 4, 8, 8)  # one photo, encoded at the candidates' 64 px


def test_artist_choice_and_real_photo_pairs(comfy_server):
    """Artist Choice: a winner of another aspect is centre-cropped to the loser's size and its
    painted mask is cropped with it; mismatched counts are refused. Real Photos: photos are
    cycled over the generated images."""

    def image(width, height, batch, color):
        return {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": color},
        }

    base = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": image(128, 64, 1, 0x804020),
        "4": image(64, 64, 1, 0x204080),
        "5": image(64, 64, 3, 0x408020),
        # winner_good_mask: columns 48..80 of the 128-px-wide winner
        "6": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 64}},
        "7": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
        "8": {
            "class_type": "MaskComposite",
            "inputs": {"destination": ["6", 0], "source": ["7", 0], "x": 48, "y": 0, "operation": "add"},
        },
    }
    prompt = {
        **base,
        "10": {
            "class_type": "PrefP_PairsFromArtistChoice",
            "inputs": {
                "vae": ["1", 2],
                "positive": ["2", 0],
                "winner": ["3", 0],
                "loser": ["4", 0],
                "winner_good_mask": ["8", 0],
            },
        },
        "11": {"class_type": "PrefP_SavePreferencePairs", "inputs": {"pairs": ["10", 0], "name": "artist"}},
        "12": {
            "class_type": "PrefP_PairsFromRealPhotos",
            "inputs": {"vae": ["1", 2], "positive": ["2", 0], "real_photos": ["3", 0], "generated": ["5", 0]},
        },
        "13": {"class_type": "PrefP_SavePreferencePairs", "inputs": {"pairs": ["12", 0], "name": "real"}},
    }
    comfy_server.run(prompt)
    folder = os.path.join(comfy_server.base_directory, "output", "preference_pairs")
    artist = safetensors.torch.load_file(os.path.join(folder, "artist.safetensors"))
    # The crop keeps winner columns 32..96, so the mask lands on columns 16..48 of 64: latent 2..5.
    weights = artist["winner_weights"][0]
    assert weights.shape == (8, 8)
    assert (weights[:, 2:6] > 0.99).all() and (weights[:, :2] < 0.01).all() and (weights[:, 6:] < 0.01).all(), weights
    real = safetensors.torch.load_file(os.path.join(folder, "real.safetensors"))
    assert real["winners"].shape == (3, 4, 8, 8)
    torch.testing.assert_close(real["winners"][0], real["winners"][2])

    with pytest.raises(PromptError, match="2 winners and 3 losers cannot be paired"):
        comfy_server.run(
            {
                **base,
                "3": image(64, 64, 2, 0),
                "10": {
                    "class_type": "PrefP_PairsFromArtistChoice",
                    "inputs": {"vae": ["1", 2], "positive": ["2", 0], "winner": ["3", 0], "loser": ["5", 0]},
                },
                "11": {"class_type": "PrefP_SavePreferencePairs", "inputs": {"pairs": ["10", 0], "name": "refused"}},
            }
        )
    assert not [name for name in os.listdir(folder) if name.startswith("refused") or name.endswith(".partial")]


def test_previews_while_training_and_a_run_resumed_from_its_state(comfy_server):
    """preview_every 1: a preview row per step in the previews output (two images at 64 px each,
    decoded by the VAE); save_every writes the state, which the resume_state list then offers and
    a second run continues (steps 3-4); a state of other options is refused, naming them."""
    import numpy
    from PIL import Image

    first = {
        **candidates_and_pairs(),
        "11": trainer(steps=2, save_every=2, save_prefix="resumable", preview_every=1, preview_steps=2, vae=["1", 2]),
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 5], "filename_prefix": "previews"}},
    }
    entry = comfy_server.run(first)
    image = entry["outputs"]["12"]["images"][0]
    grid = Image.open(os.path.join(comfy_server.base_directory, "output", image["subfolder"], image["filename"]))
    rows = torch.from_numpy(numpy.asarray(grid.convert("RGB"), dtype=numpy.float32))
    caption = (rows.shape[0] - 2 * 64) // 2
    assert grid.size == (2 * 64 + 4, 2 * (64 + caption)) and caption >= 14  # two steps x two images
    step_1, step_2 = rows[caption : caption + 64], rows[2 * caption + 64 :]
    assert (step_1 - step_2).abs().max() > 0  # the LoRA moved between the previews
    assert (step_1[:, :64] - step_1[:, 68:]).abs().max() > 0  # two prompts/seeds, two images

    state = "resumable_step00002.state.safetensors"
    info = comfy_server.object_info("PrefP_DPOLoraTrainer")["PrefP_DPOLoraTrainer"]
    assert state in info["input"]["optional"]["resume_state"][1]["options"]
    resumed = comfy_server.run(
        {**candidates_and_pairs(), "11": trainer(steps=2, save_every=2, save_prefix="resumable", resume_state=state)}
    )
    assert os.path.isfile(
        os.path.join(comfy_server.base_directory, "output", "loras", "resumable_step00004.safetensors")
    )
    assert resumed["outputs"]["11"]["images"]
    with pytest.raises(PromptError, match=r"other options \(rank 4 -> 8\)"):
        comfy_server.run({**candidates_and_pairs(), "11": trainer(steps=2, rank=8, resume_state=state)})
    comfy_server.assert_serving("PrefP_DPOLoraTrainer")


def test_bad_trainer_input_is_reported(comfy_server):
    with pytest.raises(PromptError, match="timestep_end"):
        comfy_server.run({**candidates_and_pairs(), "11": trainer(timestep_start=0.8, timestep_end=0.2)})
    with pytest.raises(PromptError) as error:
        comfy_server.queue(
            {
                "10": {"class_type": "PrefP_LoadPreferencePairs", "inputs": {"file": "nope.safetensors"}},
                "11": {"class_type": "PrefP_PreviewPreferencePairs", "inputs": {"pairs": ["10", 0], "max_pairs": 2}},
            }
        )
    assert "nope.safetensors" in str(error.value.payload)
    comfy_server.assert_serving("PrefP_DPOLoraTrainer")


def test_a_run_larger_than_the_free_memory_is_refused_before_it_loads():
    """A server that keeps back more memory than the machine has (ComfyUI's --reserve-vram, in
    GB) leaves no room: the trainer refuses with its estimate and what to change, before a step
    or a file, and the server keeps serving."""
    with ComfyServer(extra_args=("--reserve-vram", "100000")) as server:
        server.provide_checkpoint("tiny_sd15.safetensors")
        offset = server.log_offset()
        with pytest.raises(PromptError, match=r"DPO LoRA Trainer: this run needs about [\d.]+ GiB") as error:
            server.run({**candidates_and_pairs(), "11": trainer(steps=2, save_every=1, save_prefix="too_big")})
        assert "To fit: " in str(error.value) and "gradient_checkpointing" in str(error.value)
        assert "DPO LoRA Trainer: step" not in server.log_since(offset)
        assert not glob.glob(os.path.join(server.base_directory, "output", "loras", "too_big*"))
        server.assert_serving("PrefP_DPOLoraTrainer")


def test_cancel_mid_training_saves_the_last_good_lora(comfy_server):
    offset = comfy_server.log_offset()
    prompt_id = comfy_server.queue({**candidates_and_pairs(), "11": trainer(steps=2000, save_prefix="cancelled")})
    loras = os.path.join(comfy_server.base_directory, "output", "loras")
    comfy_server.wait_for_log(offset, "DPO LoRA Trainer: step", timeout=300)  # training has made a step
    comfy_server.post("/interrupt", {})
    with pytest.raises(PromptError):
        comfy_server.wait(prompt_id, timeout=300)
    files = glob.glob(os.path.join(loras, "cancelled_interrupted_step*.safetensors"))
    assert len(files) == 1 and not glob.glob(os.path.join(loras, "*.partial"))
    assert safetensors.torch.load_file(files[0])
    comfy_server.assert_serving("PrefP_DPOLoraTrainer")
