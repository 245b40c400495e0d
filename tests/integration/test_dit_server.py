"""Flux and SD3 graphs inside a real ComfyUI server, with the stock loaders of those families
(UNETLoader, CLIPLoader with CLIP-L alone, VAELoader's TAESD3/TAEF1) on the tiny random-weight
DiTs: joint sampling (bit-exact off, references kept, followed), and the DPO LoRA Trainer on pairs
built with the 16-channel VAE, its LoRA saved and reloaded by LoraLoaderModelOnly; pairs of
another latent family are refused with the node's name and the fix."""

import os
import shutil

import pytest
import safetensors
import safetensors.torch
import torch

from harness.comfy_server import PromptError
from harness.graphs import attention_node

pytestmark = pytest.mark.server

KINDS = ("sd3", "flux")
CFG = {"sd3": 3.0, "flux": 1.0}
SIZE = 64


@pytest.fixture(scope="module")
def server(comfy_server):
    for kind in KINDS:
        comfy_server.provide_dit(kind, f"tiny_{kind}.safetensors")
        comfy_server.provide_taesd(kind)
    comfy_server.provide_text_encoder("clip_l", "clip_l.safetensors")
    return comfy_server


def base(kind):
    """1 model, 2 CLIP-L (type sd3: Flux reads the same 768 pooled values), 3 positive (FluxGuidance
    on Flux), 4 negative (zeroed out), 5 VAE, 7 the reference photo at SIZE."""
    nodes = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": f"tiny_{kind}.safetensors", "weight_dtype": "default"},
        },
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "sd3"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["2", 0]}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": {"sd3": "taesd3", "flux": "taef1"}[kind]}},
        "6": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "chelsea.png"}},
        "7": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["6", 0],
                "upscale_method": "bilinear",
                "width": SIZE,
                "height": SIZE,
                "crop": "center",
            },
        },
    }
    if kind == "flux":
        nodes["3t"] = nodes["3"]
        nodes["3"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3t", 0], "guidance": 3.5}}
    return nodes


def joint(kind, node_id, model=("1", 0), references=("7", 0), strength=1.0):
    inputs = {
        "model": list(model),
        "positive": ["3", 0],
        "negative": ["4", 0],
        "vae": ["5", 0],
        "new_images": 2,
        "width": SIZE,
        "height": SIZE,
        "seed": 11,
        "steps": 2,
        "cfg": CFG[kind],
        "sampler_name": "euler",
        "scheduler": "simple",
        "image_guidance": 1.0,
        "strength": strength,
    }
    if references is not None:
        inputs["references"] = list(references)
    return {node_id: {"class_type": "PrefP_JointSampler", "inputs": inputs}, **save(node_id, (node_id, 1))}


def ksampler(kind, node_id, model=("1", 0), batch=2):
    return {
        f"{node_id}e": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch},
        },
        node_id: {
            "class_type": "KSampler",
            "inputs": {
                "model": list(model),
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": [f"{node_id}e", 0],
                "seed": 11,
                "steps": 2,
                "cfg": CFG[kind],
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        **save(node_id, (node_id, 0)),
    }


def save(node_id, latent):
    return {
        f"save_{node_id}": {
            "class_type": "SaveLatent",
            "inputs": {"samples": list(latent), "filename_prefix": f"dit_test/{node_id}"},
        }
    }


def latents(server, entry) -> dict[str, torch.Tensor]:
    out = {}
    for node_id, output in entry["outputs"].items():
        for item in output.get("latents", []):
            out[node_id.removeprefix("save_")] = safetensors.torch.load_file(server.output_path(item))["latent_tensor"]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_joint_sampling_with_the_families_stock_loaders(server, kind):
    prompt = {
        **base(kind),
        **ksampler(kind, "10"),
        **joint(kind, "11", references=None),
        **joint(kind, "12"),
        **joint(kind, "13", strength=0.0),
        **attention_node("14", reference_positions="shared"),
        **joint(kind, "15", model=("14", 0)),
        "16": {"class_type": "VAEEncode", "inputs": {"pixels": ["7", 0], "vae": ["5", 0]}},
        **save("16", ("16", 0)),
        **{"12j": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 2], "filename_prefix": "dit_test/12j"}}},
    }
    out = latents(server, server.run(prompt))
    assert out["10"].shape == (2, 16, SIZE // 8, SIZE // 8)
    assert torch.equal(out["11"], out["10"])  # no references: KSampler, bit for bit
    assert (out["12"] - out["13"]).abs().max() > 1e-3  # the references count
    reference = out["16"]
    assert (out["12j"][:1] - reference).abs().max() <= 1e-5 * max(1.0, float(reference.abs().max()))
    moved = (out["15"] - out["12"]).abs().max()
    assert moved > 1e-4 if kind == "flux" else moved == 0  # RoPE positions matter on Flux only
    server.assert_serving("PrefP_JointSampler")


def trainer(steps=2, pairs=("20", 0)):
    return {
        "class_type": "PrefP_DPOLoraTrainer",
        "inputs": {
            "model": ["1", 0],
            "pairs": list(pairs),
            "loss_mode": "dpo",
            "beta": 100.0,
            "steps": steps,
            "learning_rate": 5e-3,
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
            "stats_weight": 0.0,
            "preserve_outside": 0.0,
            "save_every": 0,
            "save_prefix": "dit_lora",
        },
    }


def test_dpo_training_on_sd3_pairs_from_its_own_vae(server):
    """Real photos over generated images, encoded by TAESD3: the trainer runs as ComfyUI runs nodes
    (inference mode), Save DPO LoRA writes sd-scripts names, LoraLoaderModelOnly reproduces it."""
    kind = "sd3"
    prompt = {
        **base(kind),
        **ksampler(kind, "10"),
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["5", 0]}},
        "18": {"class_type": "RepeatImageBatch", "inputs": {"image": ["7", 0], "amount": 2}},
        "20": {
            "class_type": "PrefP_PairsFromRealPhotos",
            "inputs": {"vae": ["5", 0], "positive": ["3", 0], "real_photos": ["18", 0], "generated": ["17", 0]},
        },
        "21": trainer(),
        "22": {
            "class_type": "PrefP_SaveDPOLora",
            "inputs": {
                "lora": ["21", 1],
                "model": ["1", 0],
                "filename_prefix": "dit_server",
                "layout": "kohya",
                "steps": ["21", 4],
            },
        },
        **ksampler(kind, "23", model=("21", 0)),
    }
    entry = server.run(prompt)
    trained = latents(server, entry)["23"]
    base_latent = latents(server, entry)["10"]
    assert (trained - base_latent).abs().max() > 1e-4
    path = os.path.join(server.base_directory, "output", "loras", "dit_server_2_steps.safetensors")
    with safetensors.safe_open(path, "pt") as handle:
        keys, header = list(handle.keys()), handle.metadata()
    assert keys and all(key.startswith("lora_unet_joint_blocks_") for key in keys), keys[:3]
    assert header["ss_base_model_version"] == "sd3" and header["prefp_base_family"] == "SD3"
    loras = os.path.join(server.base_directory, "models", "loras")
    os.makedirs(loras, exist_ok=True)
    shutil.copy(path, os.path.join(loras, "dit_server.safetensors"))
    reloaded_prompt = {
        **base(kind),
        "30": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": "dit_server.safetensors", "strength_model": 1.0},
        },
        **ksampler(kind, "31", model=("30", 0)),
    }
    reloaded = latents(server, server.run(reloaded_prompt))["31"]
    assert (reloaded - trained).abs().max() < 1e-3, (reloaded - trained).abs().max()


def test_pairs_of_another_latent_family_name_the_node_and_the_fix(server):
    prompt = {
        **base("sd3"),
        "40": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "18": {"class_type": "RepeatImageBatch", "inputs": {"image": ["7", 0], "amount": 2}},
        "19": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 2, "color": 0}},
        "20": {
            "class_type": "PrefP_PairsFromRealPhotos",
            "inputs": {"vae": ["40", 2], "positive": ["3", 0], "real_photos": ["18", 0], "generated": ["19", 0]},
        },
        "21": trainer(steps=1),
        "22": {
            "class_type": "PrefP_SaveDPOLora",
            "inputs": {"lora": ["21", 1], "model": ["1", 0], "filename_prefix": "never", "layout": "kohya"},
        },
    }
    with pytest.raises(
        PromptError, match=r"DPO LoRA Trainer: .*4-channel latents but this model expects 16.*this model's VAE"
    ):
        server.run(prompt)
    assert not os.path.exists(os.path.join(server.base_directory, "output", "loras", "never_1_steps.safetensors"))
    server.assert_serving("PrefP_DPOLoraTrainer")
