"""Patch Backbone Loader nodes: DINOv2 from the pack's models folder, the built-in offline
backbone, or a CLIP_VISION the graph already loaded."""

from __future__ import annotations

from comfy import model_management
from comfy_api.v0_0_2 import io

from ..comfy_glue.backbone import (
    BUILTIN_BACKBONE,
    WHERE_TO_PUT,
    available_backbones,
    backbone_path,
    load_backbone_choice,
)
from ..pure.backbone import ClipVisionPatchBackbone
from .errors import node_errors
from .types import CATEGORY, PatchBackbone


class PatchBackboneLoader(io.ComfyNode):
    TITLE = "Patch Backbone Loader"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PatchBackboneLoader",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "Loads the vision model whose patch features Patch Quality Score compares. DINOv2 "
                "(best) comes from ComfyUI/models/patch_backbones/; the built-in EfficientNet-Lite0 "
                "needs no download but matches patches less reliably than DINOv2."
            ),
            inputs=[
                io.Combo.Input(
                    "backbone",
                    options=available_backbones(),
                    default=BUILTIN_BACKBONE,
                    tooltip="Built-in offline backbone, or a DINOv2 folder/.safetensors file "
                    "from ComfyUI/models/patch_backbones/.",
                ),
            ],
            outputs=[
                PatchBackbone.Output(display_name="backbone", tooltip="Patch-feature model for the scoring nodes.")
            ],
        )

    @classmethod
    def validate_inputs(cls, backbone):
        if backbone != BUILTIN_BACKBONE and backbone_path(backbone) is None:
            return f"{cls.TITLE}: '{backbone}' was not found. {WHERE_TO_PUT}"
        return True

    @classmethod
    def execute(cls, backbone) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            model = load_backbone_choice(backbone)
        model.source_id = backbone
        return io.NodeOutput(model.to(model_management.unet_offload_device()))


class PatchBackboneFromClipVision(io.ComfyNode):
    TITLE = "Patch Backbone from CLIP Vision"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PatchBackboneFromClipVision",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "Uses a CLIP_VISION model (e.g. the one loaded for IP-Adapter, or a DINOv2 loaded with "
                "Load CLIP Vision) as the patch backbone: its penultimate-layer patch tokens. The image "
                "is squashed to the encoder's square input, so the grid is coarse (16x16 for ViT-L/14)."
            ),
            inputs=[io.ClipVision.Input("clip_vision", tooltip="Output of Load CLIP Vision.")],
            outputs=[
                PatchBackbone.Output(display_name="backbone", tooltip="Patch-feature model for the scoring nodes.")
            ],
        )

    @classmethod
    def execute(cls, clip_vision) -> io.NodeOutput:
        image_size = int(getattr(clip_vision, "image_size", 224))
        return io.NodeOutput(ClipVisionPatchBackbone(clip_vision, image_size, name="CLIP vision"))
