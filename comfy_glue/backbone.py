"""Patch backbones in ComfyUI's model folders: ``models/patch_backbones/`` (DINOv2 folders and
files, tuned heads) and the built-in offline backbone."""

from __future__ import annotations

import json
import os

import folder_paths
from safetensors import SafetensorError

from ..pure.backbone import EfficientNetLitePatchBackbone, PatchBackbone, apply_tuned_head, load_dinov2, read_tuned_head
from ..pure.errors import InputError

MODELS_FOLDER = "patch_backbones"
BUILTIN_BACKBONE = "built-in: EfficientNet-Lite0 (ImageNet, offline)"
WHERE_TO_PUT = (
    "Put a DINOv2 model in ComfyUI/models/patch_backbones/: either a transformers folder "
    "(e.g. models/patch_backbones/dinov2-small/ holding config.json and model.safetensors from "
    "facebook/dinov2-small) or that single model.safetensors renamed (e.g. dinov2-small.safetensors)."
)
# What reading a damaged or foreign file raises (a wrong file is the user's to fix; anything
# else is a bug and propagates).
UNREADABLE_FILE_ERRORS = (InputError, OSError, json.JSONDecodeError, SafetensorError, KeyError)


def register_model_folders() -> None:
    """Register ``models/patch_backbones`` with ComfyUI (idempotent)."""
    path = os.path.join(folder_paths.models_dir, MODELS_FOLDER)
    if path not in folder_paths.folder_names_and_paths.get(MODELS_FOLDER, ([], set()))[0]:
        folder_paths.add_model_folder_path(MODELS_FOLDER, path, is_default=True)


def backbones_folder() -> str:
    """The folder tuned heads are saved to (the first registered one)."""
    register_model_folders()
    return folder_paths.get_folder_paths(MODELS_FOLDER)[0]


def available_backbones() -> list[str]:
    """The built-in backbone, then DINOv2 folders (``name/``) and ``.safetensors`` files."""
    register_model_folders()
    entries = []
    for root in folder_paths.get_folder_paths(MODELS_FOLDER):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            full = os.path.join(root, name)
            if os.path.isdir(full) and os.path.isfile(os.path.join(full, "config.json")):
                entries.append(name + "/")
            elif name.endswith(".safetensors"):
                entries.append(name)
    return [BUILTIN_BACKBONE] + entries


def backbone_path(choice: str) -> str | None:
    """Full path of a listed DINOv2 entry, or None when it is not on disk."""
    for root in folder_paths.get_folder_paths(MODELS_FOLDER):
        full = os.path.join(root, choice.rstrip("/"))
        if os.path.exists(full):
            return full
    return None


def load_backbone_choice(choice: str, _depth: int = 0) -> PatchBackbone:
    """Load a Patch Backbone Loader choice: the built-in backbone, a DINOv2 folder or file, or
    a tuned head saved by Train Patch Quality Estimator (which names its base choice).

    Raises:
        InputError: the choice is not on disk, or its file cannot be read as a backbone.
    """
    if choice == BUILTIN_BACKBONE:
        return EfficientNetLitePatchBackbone.from_package()
    path = backbone_path(choice)
    if path is None:
        raise InputError(f"'{choice}' was not found. {WHERE_TO_PUT}")
    try:
        tuned = read_tuned_head(path) if os.path.isfile(path) else None
        if tuned is not None:
            base_id, head_state = tuned
            if _depth or (base_id != BUILTIN_BACKBONE and backbone_path(base_id) is None):
                raise InputError(f"its base backbone '{base_id}' is not in models/patch_backbones/")
            return apply_tuned_head(load_backbone_choice(base_id, _depth + 1), base_id, head_state)
        return load_dinov2(path)
    except UNREADABLE_FILE_ERRORS as error:
        raise InputError(f"cannot load '{choice}': {error} {WHERE_TO_PUT}") from error
