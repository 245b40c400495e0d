"""Patch Quality Score node (PatchDPO): which patches of generated images agree with the
reference photos, as maps, a heat-map overlay and numbers."""

from __future__ import annotations

import comfy.utils
from comfy_api.v0_0_2 import io, ui

from ..comfy_glue.devices import on_compute_device
from ..pure.drawing import overlay_heat
from ..pure.patch_quality import score_patches
from .errors import check_number_inputs, node_errors
from .inputs import image_input_to_rgb, optional_mask
from .types import CATEGORY, PatchBackbone, PatchQuality


def format_scores(scores: list[float], backbone: str, references: int) -> str:
    lines = [f"image {index + 1}: {score:.3f}" for index, score in enumerate(scores)]
    lines.append(f"mean: {sum(scores) / len(scores):.3f}  ({backbone}, {references} reference image(s))")
    return "\n".join(lines)


class PatchQualityScore(io.ComfyNode):
    TITLE = "Patch Quality Score"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PatchQualityScore",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "PatchDPO patch quality: every patch of each generated image is matched against all "
                "reference patches (inside the subject mask); its quality is the best cosine similarity "
                "of centred backbone features, in [0, 1]. Red in the heat map = patches that do not "
                "look like any part of the subject."
            ),
            is_output_node=True,
            inputs=[
                PatchBackbone.Input("backbone", tooltip="From Patch Backbone Loader."),
                io.Image.Input("generated", tooltip="Generated images to score (a batch)."),
                io.Image.Input("references", tooltip="Reference photos of the subject (one or a batch; any size)."),
                io.Mask.Input(
                    "subject_mask",
                    optional=True,
                    tooltip="Optional subject mask for the references (one for all, or one per "
                    "reference): only patches inside it count as the subject.",
                ),
                io.Int.Input(
                    "resolution",
                    default=448,
                    min=64,
                    max=2048,
                    step=16,
                    tooltip="Short side images are resized to before feature extraction; "
                    "higher = finer patch grid, slower.",
                ),
                io.Float.Input(
                    "overlay_opacity",
                    default=0.55,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Opacity of the heat-map colours over the generated image.",
                ),
            ],
            outputs=[
                PatchQuality.Output(
                    display_name="patch_quality", tooltip="Per-patch quality maps, for preference-pair nodes."
                ),
                io.Mask.Output(
                    display_name="quality_mask",
                    tooltip="Quality upsampled to the generated image size (1 = matches the subject).",
                ),
                io.Image.Output(
                    display_name="heatmap", tooltip="Generated images with badness colours: red = worst patches."
                ),
                io.Float.Output(display_name="mean_score", tooltip="Mean patch quality over the batch."),
                io.String.Output(display_name="scores", tooltip="Per-image mean patch quality, as text."),
            ],
        )

    @classmethod
    def execute(cls, backbone, generated, references, resolution, overlay_opacity, subject_mask=None) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            check_number_inputs(cls, locals())
            generated_rgb = image_input_to_rgb(generated, "generated", cls.TITLE)
            references_rgb = image_input_to_rgb(references, "references", cls.TITLE)
            subject_mask = optional_mask(
                subject_mask,
                "the subject mask",
                cls.TITLE,
                meaning_when_empty="scoring against the whole reference images",
            )
            progress = comfy.utils.ProgressBar(generated_rgb.shape[0] + references_rgb.shape[0])
            with on_compute_device(backbone) as device:
                result = score_patches(
                    backbone,
                    generated_rgb.to(device),
                    references_rgb.to(device),
                    None if subject_mask is None else subject_mask.to(device),
                    resolution,
                    on_images=progress.update,
                )  # update() also honours Cancel
        result.quality = result.quality.cpu()
        quality_mask = result.upsampled()
        heatmap = overlay_heat(generated_rgb, 1.0 - quality_mask, overlay_opacity).movedim(1, -1)
        scores = [float(score) for score in result.scores]
        text = format_scores(scores, result.backbone, result.metadata["references"])
        preview = {**ui.PreviewImage(heatmap, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}
        return io.NodeOutput(result, quality_mask, heatmap, sum(scores) / len(scores), text, ui=preview)
