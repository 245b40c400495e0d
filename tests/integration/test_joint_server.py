"""JeDi joint sampling inside a real ComfyUI server: graphs queued over HTTP, latents read
back from SaveLatent files and compared bit for bit or to numerical precision; bad input
answered with messages that name the node and the fix while the server keeps serving."""

import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from harness.comfy_server import PromptError, comfyui_path
from harness.graphs import attention_node

pytestmark = pytest.mark.server

CHECKPOINT = "tiny_sd15.safetensors"
SIZE = 64  # 8 x 8 latents


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session server, plus a tiny LoRA for the tiny checkpoint's self-attention, a
    grayscale photo in input/ and a tiny PixArt diffusion model, a family joint attention does
    not support (a DiT with cross-attention to the text and no joint attention)."""
    base = comfy_server.base_directory
    lora_path = os.path.join(base, "models", "loras", "tiny_attn_lora.safetensors")
    if not os.path.exists(lora_path):
        checkpoint = os.path.realpath(os.path.join(base, "models", "checkpoints", CHECKPOINT))
        with safetensors.safe_open(checkpoint, "pt") as handle:
            shapes = {
                key: handle.get_slice(key).get_shape()
                for key in handle.keys()
                if key.startswith("model.diffusion_model.") and ".attn1.to_" in key and key.endswith(".weight")
            }
        generator = torch.Generator().manual_seed(5)
        lora = {}
        for key, (out_features, in_features) in shapes.items():
            name = "lora_unet_" + key[len("model.diffusion_model.") : -len(".weight")].replace(".", "_")
            lora[f"{name}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.3
            lora[f"{name}.lora_down.weight"] = torch.randn(4, in_features, generator=generator) * 0.3
            lora[f"{name}.alpha"] = torch.tensor(4.0)
        os.makedirs(os.path.dirname(lora_path), exist_ok=True)
        safetensors.torch.save_file(lora, lora_path)
        gray = (np.linspace(0, 255, 80 * 50).reshape(50, 80)).astype(np.uint8)
        Image.fromarray(gray, mode="L").save(os.path.join(base, "input", "gray_subject.png"))
    pixart_path = os.path.join(base, "models", "diffusion_models", "tiny_pixart.safetensors")
    if not os.path.exists(pixart_path):
        os.makedirs(os.path.dirname(pixart_path), exist_ok=True)
        subprocess.run(
            [sys.executable, "-c", PIXART_SCRIPT, comfyui_path(), pixart_path],
            check=True,
            cwd=comfyui_path(),
            capture_output=True,
        )
    return comfy_server


PIXART_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
import comfy.ops, safetensors.torch
from comfy.ldm.pixart.pixartms import PixArtMS
net = PixArtMS(depth=1, input_size=32, operations=comfy.ops.disable_weight_init)  # its init reads values: no meta
generator = torch.Generator().manual_seed(0)
safetensors.torch.save_file(
    {k: (torch.randn(v.shape, generator=generator) * 0.02).half() for k, v in net.state_dict().items()}, sys.argv[2]
)
"""


# --- graph pieces -------------------------------------------------------------------------------


def base(checkpoint=CHECKPOINT, negative="blurry, low quality"):
    """1: checkpoint, 2: positive, 3: negative (text or zeroed-out), 4/5: reference photos at
    SIZE (chelsea, coffee), 6: both references as a batch."""
    nodes = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "20": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "chelsea.png"}},
        "21": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "coffee.png"}},
        "4": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["20", 0],
                "upscale_method": "bilinear",
                "width": SIZE,
                "height": SIZE,
                "crop": "center",
            },
        },
        "5": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["21", 0],
                "upscale_method": "bilinear",
                "width": SIZE,
                "height": SIZE,
                "crop": "center",
            },
        },
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["5", 0]}},
    }
    if negative is None:
        nodes["30"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}}
        nodes["3"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["30", 0]}}
    else:
        nodes["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}}
    return nodes


def joint(
    node_id,
    references=None,
    model=("1", 0),
    new_images=2,
    cfg=4.0,
    strength=1.0,
    image_guidance=1.0,
    steps=2,
    seed=11,
    mask=None,
    size=SIZE,
    reference_timestep=None,
):
    inputs = {
        "model": list(model),
        "positive": ["2", 0],
        "negative": ["3", 0],
        "vae": ["1", 2],
        "new_images": new_images,
        "width": size,
        "height": size,
        "seed": seed,
        "steps": steps,
        "cfg": cfg,
        "sampler_name": "euler",
        "scheduler": "normal",
        "image_guidance": image_guidance,
        "strength": strength,
    }
    if references is not None:
        inputs["references"] = list(references)
    if mask is not None:
        inputs["subject_mask"] = list(mask)
    if reference_timestep is not None:
        inputs["reference_timestep"] = reference_timestep
    return {node_id: {"class_type": "PrefP_JointSampler", "inputs": inputs}}


def ksampler(node_id, model=("1", 0), batch=2, cfg=4.0, steps=2, seed=11):
    return {
        f"{node_id}e": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch},
        },
        node_id: {
            "class_type": "KSampler",
            "inputs": {
                "model": list(model),
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": [f"{node_id}e", 0],
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
    }


def save(node_id, latent):
    return {
        f"save_{node_id}": {
            "class_type": "SaveLatent",
            "inputs": {"samples": list(latent), "filename_prefix": f"joint_test/{node_id}_{uuid.uuid4().hex[:8]}"},
        }
    }


def encode(node_id, image):
    """VAE Encode of ``image`` with the checkpoint's VAE, saved as a latent."""
    return {
        node_id: {"class_type": "VAEEncode", "inputs": {"pixels": list(image), "vae": ["1", 2]}},
        **save(node_id, (node_id, 0)),
    }


def run_latents(server, prompt) -> dict[str, torch.Tensor]:
    """Run the prompt; return every SaveLatent's tensor by the node id it saved."""
    return run_graph(server, prompt)[1]


def run_graph(server, prompt) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run the prompt; return its history entry and the SaveLatent tensors by node id."""
    entry = server.run(prompt)
    latents = {}
    for node_id, output in entry["outputs"].items():
        for item in output.get("latents", []):
            path = server.output_path(item)
            latents[node_id[len("save_") :]] = safetensors.torch.load_file(path)["latent_tensor"]
    return entry, latents


# --- the plain sampler is untouched ------------------------------------------------------------


@pytest.mark.parametrize("new_images", [1, 3])
def test_no_references_and_strength_zero_are_bit_identical_to_ksampler(server, new_images):
    prompt = {
        **base(),
        **ksampler("10", batch=new_images),
        **save("10", ("10", 0)),
        **joint("11", new_images=new_images),
        **save("11", ("11", 1)),
        **attention_node("12", strength=0.0, adain=True),
        **ksampler("13", model=("12", 0), batch=new_images),
        **save("13", ("13", 0)),
        **joint("14", model=("12", 0), new_images=new_images),
        **save("14", ("14", 1)),
    }
    latents = run_latents(server, prompt)
    plain = latents["10"]
    assert plain.shape == (new_images, 4, SIZE // 8, SIZE // 8)
    for other in ("11", "13", "14"):
        assert torch.equal(latents[other], plain), other


def test_joint_attention_with_stock_ksampler_leaves_the_reference_image_alone(server):
    """Stock KSampler, batch 3, reference_count 1: image 1 leads (unchanged), 2 and 3 follow it."""
    prompt = {
        **base(),
        **ksampler("10", batch=3),
        **save("10", ("10", 0)),
        **attention_node("12"),
        **ksampler("13", model=("12", 0), batch=3),
        **save("13", ("13", 0)),
    }
    latents = run_latents(server, prompt)
    assert torch.equal(latents["13"][0], latents["10"][0])
    assert (latents["13"][1:] - latents["10"][1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


# --- the joint batch ----------------------------------------------------------------------------


def test_reference_slots_end_as_the_reference_latents(server):
    """In both reference timestep modes; clean references (timestep 0, with cfg: in both chunks)
    give other new images than noised ones."""
    prompt = {
        **base(),
        **joint("11", references=("6", 0), new_images=2, steps=3),
        **save("11", ("11", 2)),
        **save("11t", ("11", 1)),
        **joint("12", references=("6", 0), new_images=2, steps=3, reference_timestep="clean"),
        **save("12", ("12", 2)),
        **encode("15", ("6", 0)),
    }
    latents = run_latents(server, prompt)
    encoded = latents["15"]
    scale = encoded.abs().max()
    for joint_latent in (latents["11"], latents["12"]):
        assert joint_latent.shape == (4, 4, SIZE // 8, SIZE // 8)
        assert (joint_latent[:2] - encoded).abs().max() <= 1e-5 * max(1.0, float(scale))
    assert torch.equal(latents["11"][2:], latents["11t"])
    assert (latents["12"][2:] - latents["11"][2:]).abs().max() > 1e-3


@pytest.mark.parametrize("new_images", [1, 3])
@pytest.mark.parametrize(
    "cfg,negative",
    [(4.0, "blurry, low quality"), (4.0, None), (1.0, "blurry, low quality")],
    ids=["cfg-negative-prompt", "cfg-zeroed-negative", "cfg-1"],
)
def test_targets_depend_on_references_only_with_strength(server, new_images, cfg, negative):
    common = dict(new_images=new_images, cfg=cfg)
    prompt = {
        **base(negative=negative),
        **joint("a1", references=("4", 0), **common),
        **save("a1", ("a1", 1)),
        **joint("b1", references=("5", 0), **common),
        **save("b1", ("b1", 1)),
        **joint("a0", references=("4", 0), strength=0.0, **common),
        **save("a0", ("a0", 1)),
        **joint("b0", references=("5", 0), strength=0.0, **common),
        **save("b0", ("b0", 1)),
    }
    latents = run_latents(server, prompt)
    assert latents["a1"].shape == (new_images, 4, SIZE // 8, SIZE // 8)
    per_image = (latents["a1"] - latents["b1"]).abs().amax(dim=(1, 2, 3))
    assert per_image.min() > 1e-3, per_image  # every new image follows its reference
    assert torch.equal(latents["a0"], latents["b0"])  # strength 0: the references are ignored
    assert (latents["a0"] - latents["a1"]).abs().max() > 1e-3


def test_image_guidance_and_subject_mask(server):
    prompt = {
        **base(),
        **joint("g1", references=("6", 0)),
        **save("g1", ("g1", 2)),
        **joint("g3", references=("6", 0), image_guidance=3.0),
        **save("g3", ("g3", 2)),
        "40": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}},
        "41": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE // 2, "height": SIZE // 2}},
        "42": {
            "class_type": "MaskComposite",
            "inputs": {"destination": ["40", 0], "source": ["41", 0], "x": 0, "y": 0, "operation": "add"},
        },
        **joint("gm", references=("6", 0), mask=("42", 0)),
        **save("gm", ("gm", 2)),
        **encode("15", ("6", 0)),
    }
    latents = run_latents(server, prompt)
    assert (latents["g1"][2:] - latents["g3"][2:]).abs().max() > 1e-3
    assert (latents["g1"][2:] - latents["gm"][2:]).abs().max() > 1e-3
    for name in ("g3", "gm"):
        assert (latents[name][:2] - latents["15"]).abs().max() <= 1e-5 * max(1.0, float(latents["15"].abs().max()))


def test_joint_attention_node_settings_reach_the_sampler(server):
    prompt = {
        **base(),
        **joint("default", references=("4", 0)),
        **save("default", ("default", 1)),
        **attention_node("90", mode="blend", strength=0.5),
        **joint("blend_a", references=("4", 0), model=("90", 0)),
        **save("blend_a", ("blend_a", 1)),
        **joint("blend_b", references=("5", 0), model=("90", 0)),
        **save("blend_b", ("blend_b", 1)),
        **attention_node("91", input_blocks=False, middle_block=False, adain=True, start_percent=0.3),
        **joint("custom", references=("4", 0), model=("91", 0)),
        **save("custom", ("custom", 1)),
        **attention_node("92", strength=0.0),
        **joint("off_a", references=("4", 0), model=("92", 0)),
        **save("off_a", ("off_a", 1)),
        **joint("off_b", references=("5", 0), model=("92", 0)),
        **save("off_b", ("off_b", 1)),
    }
    latents = run_latents(server, prompt)
    assert (latents["blend_a"] - latents["blend_b"]).abs().max() > 1e-3
    for name in ("blend_a", "custom"):
        assert (latents[name] - latents["default"]).abs().max() > 1e-3, name
    assert torch.equal(latents["off_a"], latents["off_b"])  # strengths multiply: 0 on the node is off


# --- composition with other patches -------------------------------------------------------------


def test_composes_with_another_attn1_patch(server):
    """Token merging (ToMe) is an attn1_patch: with Joint Attention on top it still runs."""
    prompt = {
        **base(),
        "50": {"class_type": "TomePatchModel", "inputs": {"model": ["1", 0], "ratio": 0.5}},
        **attention_node("51", model=("50", 0)),
        **attention_node("52"),
        **ksampler("k_tome", model=("50", 0), batch=2),
        **save("k_tome", ("k_tome", 0)),
        **ksampler("k_both", model=("51", 0), batch=2),
        **save("k_both", ("k_both", 0)),
        **ksampler("k_joint", model=("52", 0), batch=2),
        **save("k_joint", ("k_joint", 0)),
        **joint("j_a", references=("4", 0), model=("50", 0)),
        **save("j_a", ("j_a", 1)),
        **joint("j_b", references=("5", 0), model=("50", 0)),
        **save("j_b", ("j_b", 1)),
    }
    latents = run_latents(server, prompt)
    # The leading image is plain attention with ToMe in both graphs: ToMe ran under the joint patch.
    assert torch.equal(latents["k_both"][0], latents["k_tome"][0])
    assert (latents["k_both"][0] - latents["k_joint"][0]).abs().max() > 1e-3
    # The follower attends jointly and still goes through ToMe.
    assert (latents["k_both"][1] - latents["k_tome"][1]).abs().max() > 1e-3
    assert (latents["k_both"][1] - latents["k_joint"][1]).abs().max() > 1e-3
    # The Joint Sampler on a ToMe model still follows its references.
    assert (latents["j_a"] - latents["j_b"]).abs().max() > 1e-3


def test_with_lora_and_perturbed_attention_guidance(server):
    prompt = {
        **base(),
        "60": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": "tiny_attn_lora.safetensors", "strength_model": 1.0},
        },
        "61": {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["60", 0], "scale": 2.0}},
        **joint("plain", references=("4", 0)),
        **save("plain", ("plain", 2)),
        **joint("lora", references=("4", 0), model=("60", 0)),
        **save("lora", ("lora", 2)),
        **joint("pag", references=("4", 0), model=("61", 0)),
        **save("pag", ("pag", 2)),
        **encode("15", ("4", 0)),
    }
    latents = run_latents(server, prompt)
    assert (latents["plain"][1:] - latents["lora"][1:]).abs().max() > 1e-3
    assert (latents["lora"][1:] - latents["pag"][1:]).abs().max() > 1e-3
    for name in ("lora", "pag"):
        assert (latents[name][:1] - latents["15"]).abs().max() <= 1e-5 * max(1.0, float(latents["15"].abs().max()))


# --- bad input ----------------------------------------------------------------------------------


def test_references_of_other_sizes_grayscale_and_rgba(server):
    prompt = {
        **base(),
        "70": {"class_type": "LoadImage", "inputs": {"image": "gray_subject.png"}},
        "71": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 451, "height": 300}},
        "72": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["20", 0], "alpha": ["71", 0]}},
        **joint("gray", references=("70", 0), size=96),
        **save("gray", ("gray", 2)),
        **joint("rgba", references=("72", 0), size=96),
        **save("rgba", ("rgba", 2)),
        **joint("full", references=("20", 0), size=96),
        **save("full", ("full", 2)),
        "73": {"class_type": "SaveImage", "inputs": {"images": ["full", 0], "filename_prefix": "joint_test/full"}},
    }
    entry, latents = run_graph(server, prompt)
    for name in ("gray", "rgba", "full"):
        assert latents[name].shape == (3, 4, 12, 12)  # 1 reference + 2 new images, 96 px
    images = entry["outputs"]["73"]["images"]
    assert len(images) == 2
    with Image.open(server.output_path(images[0])) as picture:
        assert picture.size == (96, 96)


def test_zero_new_images_is_rejected_before_running(server):
    prompt = {**base(), **joint("11", references=("4", 0), new_images=0), **save("11", ("11", 1))}
    with pytest.raises(PromptError) as error:
        server.queue(prompt)
    message = str(error.value.payload["node_errors"]["11"])
    assert "new_images" in message and "smaller than min of 1" in message
    server.assert_serving("PrefP_JointSampler")


def test_unsupported_model_names_the_supported_families(server):
    prompt = {
        **base(),
        "80": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "tiny_pixart.safetensors", "weight_dtype": "default"},
        },
        **joint("11", references=("4", 0), model=("80", 0)),
        **save("11", ("11", 1)),
    }
    with pytest.raises(
        PromptError,
        match=r"Joint Sampler: this MODEL \(PixArt\) has no self-attention blocks.*"
        r"Supported: SD1\.x, SD2\.x and SDXL.*SD3/SD3\.5, Flux\.1, Flux\.2, Chroma, Qwen-Image and Z-Image",
    ):
        server.run(prompt)
    attention = {
        **base(),
        "80": prompt["80"],
        **attention_node("81", model=("80", 0)),
        **ksampler("82", model=("81", 0)),
        **save("82", ("82", 0)),
    }
    with pytest.raises(PromptError, match="Joint Attention: this MODEL"):
        server.run(attention)
    server.assert_serving("PrefP_JointSampler")


def test_bad_settings_name_the_node_and_the_fix(server):
    masks = {
        "40": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE, "height": SIZE}},
        "41": {"class_type": "MaskToImage", "inputs": {"mask": ["40", 0]}},
        "42": {"class_type": "RepeatImageBatch", "inputs": {"image": ["41", 0], "amount": 3}},
        "43": {"class_type": "ImageToMask", "inputs": {"image": ["42", 0], "channel": "red"}},
    }
    prompt = {**base(), **masks, **joint("11", references=("6", 0), mask=("43", 0)), **save("11", ("11", 1))}
    with pytest.raises(PromptError, match="Joint Sampler: got 3 subject masks for 2 reference image"):
        server.run(prompt)
    prompt = {**base(), **joint("11", references=("4", 0), strength=-0.5), **save("11", ("11", 1))}
    with pytest.raises(PromptError, match="Joint Sampler: strength -0.5 is negative.*needs mode 'blend'"):
        server.run(prompt)
    prompt = {
        **base(),
        **attention_node("12", start_percent=0.8, end_percent=0.2),
        **ksampler("13", model=("12", 0)),
        **save("13", ("13", 0)),
    }
    with pytest.raises(PromptError, match="Joint Attention: start_percent 0.8 is after end_percent 0.2"):
        server.run(prompt)
    server.assert_serving("PrefP_JointSampler")


def test_joint_sampler_is_interruptible(server):
    prompt = {**base(), **joint("11", references=("4", 0), steps=5000), **save("11", ("11", 1))}
    offset = server.log_offset()
    prompt_id = server.queue(prompt)
    server.wait_for_log(offset, "/5000 [")  # the sampler's progress bar: it is in its sampling loop
    started = time.time()
    server.post("/interrupt", {})
    entry = server.finished_entry(prompt_id, timeout=60)
    events = [message[0] for message in entry["status"]["messages"]]
    assert "execution_interrupted" in events
    assert time.time() - started < 30
    server.assert_serving("PrefP_JointSampler")
