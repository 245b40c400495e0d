"""Patch Backbone Loader nodes: DINOv2 from the pack's models folder, the built-in offline
backbone, or a CLIP_VISION the graph already loaded."""
from __future__ import annotations

import os
from contextlib import contextmanager

import folder_paths
from comfy import model_management
from comfy_api.latest import io

from ..personalize.backbones import (ClipVisionPatchBackbone, EfficientNetLitePatchBackbone,
                                     PatchBackbone, apply_tuned_head, load_dinov2, read_tuned_head)
from .types import CATEGORY
from .types import PatchBackbone as PatchBackboneType

MODELS_FOLDER = "patch_backbones"
BUILTIN_BACKBONE = "built-in: EfficientNet-Lite0 (ImageNet, offline)"
WHERE_TO_PUT = (
    "Put a DINOv2 model in ComfyUI/models/patch_backbones/: either a transformers folder "
    "(e.g. models/patch_backbones/dinov2-small/ holding config.json and model.safetensors from "
    "facebook/dinov2-small) or that single model.safetensors renamed (e.g. dinov2-small.safetensors).")


def register_model_folders() -> None:
    """Register ``models/patch_backbones`` with ComfyUI (idempotent)."""
    path = os.path.join(folder_paths.models_dir, MODELS_FOLDER)
    if path not in folder_paths.folder_names_and_paths.get(MODELS_FOLDER, ([], set()))[0]:
        folder_paths.add_model_folder_path(MODELS_FOLDER, path, is_default=True)


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


@contextmanager
def on_compute_device(backbone: PatchBackbone):
    """Move a backbone to ComfyUI's compute device for a block of work, then offload it,
    freeing room first the way core loads upscale models."""
    device = model_management.get_torch_device()
    model_management.free_memory(model_management.module_size(backbone) * 2, device)
    backbone.to(device)
    try:
        yield device
    finally:
        backbone.to(model_management.unet_offload_device())


class PatchBackboneLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PatchBackboneLoader",
            display_name="Patch Backbone Loader",
            category=CATEGORY,
            description=(
                "Loads the vision model whose patch features Patch Quality Score compares. DINOv2 "
                "(best) comes from ComfyUI/models/patch_backbones/; the built-in EfficientNet-Lite0 "
                "needs no download but matches patches less reliably than DINOv2."),
            inputs=[
                io.Combo.Input("backbone", options=available_backbones(), default=BUILTIN_BACKBONE,
                               tooltip="Built-in offline backbone, or a DINOv2 folder/.safetensors file "
                                       "from ComfyUI/models/patch_backbones/."),
            ],
            outputs=[PatchBackboneType.Output(display_name="backbone",
                                              tooltip="Patch-feature model for the scoring nodes.")],
        )

    @classmethod
    def validate_inputs(cls, backbone):
        if backbone != BUILTIN_BACKBONE and backbone_path(backbone) is None:
            return f"Patch Backbone Loader: '{backbone}' was not found. {WHERE_TO_PUT}"
        return True

    @classmethod
    def execute(cls, backbone) -> io.NodeOutput:
        model = load_backbone_choice(backbone)
        model.source_id = backbone
        return io.NodeOutput(model.to(model_management.unet_offload_device()))


def load_backbone_choice(choice: str, _depth: int = 0) -> PatchBackbone:
    """Load a Patch Backbone Loader choice: the built-in backbone, a DINOv2 folder or file, or
    a tuned head saved by Train Patch Quality Estimator (which names its base choice)."""
    if choice == BUILTIN_BACKBONE:
        return EfficientNetLitePatchBackbone.from_package()
    path = backbone_path(choice)
    if path is None:
        raise FileNotFoundError(f"Patch Backbone Loader: '{choice}' was not found. {WHERE_TO_PUT}")
    try:
        tuned = read_tuned_head(path) if os.path.isfile(path) else None
        if tuned is not None:
            base_id, head_state = tuned
            if _depth or (base_id != BUILTIN_BACKBONE and backbone_path(base_id) is None):
                raise FileNotFoundError(f"its base backbone '{base_id}' is not in models/patch_backbones/")
            return apply_tuned_head(load_backbone_choice(base_id, _depth + 1), base_id, head_state)
        return load_dinov2(path)
    except Exception as error:  # safetensors/transformers raise their own error types
        raise ValueError(f"Patch Backbone Loader: cannot load '{choice}': {error} {WHERE_TO_PUT}") from error


class PatchBackboneFromClipVision(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PatchBackboneFromClipVision",
            display_name="Patch Backbone from CLIP Vision",
            category=CATEGORY,
            description=(
                "Uses a CLIP_VISION model (e.g. the one loaded for IP-Adapter, or a DINOv2 loaded with "
                "Load CLIP Vision) as the patch backbone: its penultimate-layer patch tokens. The image "
                "is squashed to the encoder's square input, so the grid is coarse (16x16 for ViT-L/14)."),
            inputs=[io.ClipVision.Input("clip_vision", tooltip="Output of Load CLIP Vision.")],
            outputs=[PatchBackboneType.Output(display_name="backbone",
                                              tooltip="Patch-feature model for the scoring nodes.")],
        )

    @classmethod
    def execute(cls, clip_vision) -> io.NodeOutput:
        image_size = int(getattr(clip_vision, "image_size", 224))
        return io.NodeOutput(ClipVisionPatchBackbone(clip_vision, image_size, name="CLIP vision"))
