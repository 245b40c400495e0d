"""Facts about the pack's workflow files that the tests and the demo share."""

from __future__ import annotations

import glob
import json
import os
import sys

from . import REPO_ROOT

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")

# Widget values that make a workflow run in seconds on the tiny random checkpoint on a CPU.
# The workflows keep artist-sized defaults (512 px, 20 steps); the browser test and the demo
# shrink only image size, batch and step count, never the pack's own settings.
QUICK_RUN_WIDGETS = {
    "EmptyLatentImage": {"width": 128, "height": 128, "batch_size": 2},
    "KSampler": {"steps": 2},
    "PrefP_TrainPatchQualityEstimator": {"steps": 10},
    "PrefP_DPOLoraTrainer": {"steps": 2},
    "PrefP_JointSampler": {"width": 128, "height": 128, "steps": 2, "new_images": 2},
    "EmptySD3LatentImage": {"width": 128, "height": 128, "batch_size": 2},
    "EmptyFlux2LatentImage": {"width": 128, "height": 128, "batch_size": 2},
}


def workflow_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json")))


def checkpoint_names(paths: list[str]) -> set[str]:
    """Every checkpoint file name the workflows ask a checkpoint loader for."""
    names = set()
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            workflow = json.load(handle)
        for node in workflow.get("nodes", []):
            if node.get("type") in ("CheckpointLoaderSimple", "CheckpointLoader") and node.get("widgets_values"):
                names.add(
                    node["widgets_values"][-1] if node["type"] == "CheckpointLoader" else node["widgets_values"][0]
                )
    return names


# Model loaders of the workflows: node type -> (models/ folder, positions of file names in its widgets).
MODEL_LOADERS = {
    "UNETLoader": ("diffusion_models", (0,)),
    "CLIPLoader": ("text_encoders", (0,)),
    "DualCLIPLoader": ("text_encoders", (0, 1)),
    "VAELoader": ("vae", (0,)),
}

# What the tests and the demo serve under each checkpoint name a workflow loads (default: the tiny
# SD1.5 checkpoint) and each other model file: a tiny random DiT of a family, a random text
# encoder or VAE (full size: their configs are fixed), or VAELoader's TAESD3/TAEF1.
WORKFLOW_CHECKPOINTS = {"sd3.5_large.safetensors": "sd3"}
WORKFLOW_MODEL_FILES = {
    ("diffusion_models", "flux1-dev.safetensors"): ("dit", "flux"),
    ("diffusion_models", "flux-2-klein-4b.safetensors"): ("dit", "flux2_klein"),
    ("diffusion_models", "z_image_turbo_bf16.safetensors"): ("dit", "z_image"),
    ("text_encoders", "clip_l.safetensors"): ("text_encoder", "clip_l"),
    ("text_encoders", "clip_g.safetensors"): ("text_encoder", "clip_g"),
    ("text_encoders", "t5xxl_fp8_e4m3fn.safetensors"): ("text_encoder", "t5xxl"),
    ("text_encoders", "qwen_3_4b.safetensors"): ("text_encoder", "qwen3_4b"),
    ("vae", "ae.safetensors"): ("vae", "kl_vae16"),
    ("vae", "flux2-vae.safetensors"): ("vae", "flux2_vae"),
    ("vae", "taef1"): ("taesd", "flux"),
    ("vae", "taesd3"): ("taesd", "sd3"),
}


def model_files(paths: list[str]) -> set[tuple[str, str]]:
    """``(models folder, file name)`` of every file the workflows' model loaders (other than
    checkpoint loaders) ask for."""
    files = set()
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            workflow = json.load(handle)
        for node in workflow.get("nodes", []):
            folder, positions = MODEL_LOADERS.get(node.get("type"), (None, ()))
            for position in positions:
                files.add((folder, node["widgets_values"][position]))
    return files


def provide_workflow_models(server, paths: list[str]) -> None:
    """Serve every checkpoint and model file the workflows load on ``server`` (a ComfyServer)."""
    for name in checkpoint_names(paths):
        if name in WORKFLOW_CHECKPOINTS:
            server.provide_dit_checkpoint(WORKFLOW_CHECKPOINTS[name], name)
        else:
            server.provide_checkpoint(name)
    for folder, name in sorted(model_files(paths)):
        if (folder, name) not in WORKFLOW_MODEL_FILES:
            raise KeyError(f"a workflow loads {folder}/{name}, which WORKFLOW_MODEL_FILES does not serve")
        what, kind = WORKFLOW_MODEL_FILES[(folder, name)]
        if what == "dit":
            server.provide_dit(kind, name)
        elif what == "taesd":
            server.provide_taesd(kind)
        elif what == "vae":
            server.provide_vae(kind, name)
        else:
            server.provide_text_encoder(kind, name)


def unsupported_reason(path: str) -> str | None:
    """Why the ComfyUI at hand (``comfyui_path()``, imported in this process) cannot run the
    workflow at ``path``, or ``None``: a diffusion model it loads that this ComfyUI does not
    build (Flux.2 Klein on 0.3.75)."""
    from .comfy_server import comfyui_path
    from .tiny_dit import unsupported_reason as dit_unsupported_reason

    if comfyui_path() not in sys.path:
        sys.path.insert(0, comfyui_path())
    for folder, name in sorted(model_files([path])):
        what, kind = WORKFLOW_MODEL_FILES.get((folder, name), (None, None))
        reason = dit_unsupported_reason(kind) if what == "dit" else None
        if reason:
            return f"{os.path.basename(path)} loads {name}, and {reason}"
    return None


def quick_run_widget_count(workflow: dict) -> int:
    """How many widgets ``QUICK_RUN_WIDGETS`` changes in ``workflow`` (every listed widget exists
    on its node type): a quick run that sets fewer has lost one to a rename."""
    return sum(
        len(QUICK_RUN_WIDGETS[node["type"]])
        for node in workflow.get("nodes", [])
        if node.get("type") in QUICK_RUN_WIDGETS
    )
