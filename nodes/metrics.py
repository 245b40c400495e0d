"""Personalization Metrics node: DreamBench-style DINO, CLIP-I and CLIP-T numbers, with an
optional before/after comparison."""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io, ui

from ..comfy_glue.devices import on_compute_device
from ..comfy_glue.metrics import clip_t_row
from ..pure.backbone import ClipVisionPatchBackbone
from ..pure.drawing import render_text_image
from ..pure.errors import InputError
from ..pure.metrics import MetricRow, dino_label, dreambench_crop, format_table, metric_row
from .errors import node_errors
from .inputs import image_input_to_rgb
from .types import CATEGORY, PatchBackbone

NOT_COMPUTED = -1.0


class PersonalizationMetrics(io.ComfyNode):
    TITLE = "Personalization Metrics"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PersonalizationMetrics",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "DreamBench-style numbers: DINO (generated vs reference, DINO embeddings), CLIP-I (the same with "
                "CLIP image embeddings) and CLIP-T (generated images vs the prompt). Each is the mean cosine over "
                "all pairs. Connect generated_before to get a before/after table with deltas. A metric whose "
                "model is not connected is reported as n/a (and -1 on its output)."
            ),
            is_output_node=True,
            inputs=[
                io.Image.Input("generated", tooltip="Generated images to evaluate (after)."),
                io.Image.Input("references", tooltip="Reference photos of the subject."),
                io.String.Input(
                    "prompt_text",
                    default="",
                    multiline=True,
                    tooltip="The prompt the images were generated from (for CLIP-T).",
                ),
                PatchBackbone.Input(
                    "backbone",
                    optional=True,
                    tooltip="For DINO: a DINOv2 from Patch Backbone Loader (the built-in one "
                    "gives an approximate, labelled DINO*).",
                ),
                io.ClipVision.Input(
                    "clip_vision",
                    optional=True,
                    tooltip="For CLIP-I and CLIP-T: Load CLIP Vision (models/clip_vision/).",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="For CLIP-T: the CLIP text encoder that pairs with clip_vision "
                    "(e.g. CLIP-L with ViT-L/14).",
                ),
                io.Image.Input(
                    "generated_before",
                    optional=True,
                    tooltip="Optional: images before a change (e.g. without the LoRA) for a delta column.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="The table as text."),
                io.Float.Output(
                    display_name="dino", tooltip="DINO (or DINO*) score of `generated`; -1 if not computed."
                ),
                io.Float.Output(display_name="clip_i", tooltip="CLIP-I score of `generated`; -1 if not computed."),
                io.Float.Output(display_name="clip_t", tooltip="CLIP-T score of `generated`; -1 if not computed."),
                io.Image.Output(display_name="table", tooltip="The table as an image."),
            ],
        )

    @classmethod
    def execute(
        cls, generated, references, prompt_text, backbone=None, clip_vision=None, clip=None, generated_before=None
    ) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            if backbone is None and clip_vision is None:
                raise InputError(
                    "connect a backbone (DINO) and/or a CLIP_VISION (CLIP-I, CLIP-T); with neither "
                    "there is nothing to measure."
                )
            sets = {
                "after": image_input_to_rgb(generated, "generated", cls.TITLE),
                "references": image_input_to_rgb(references, "references", cls.TITLE),
            }
            if generated_before is not None:
                sets["before"] = image_input_to_rgb(generated_before, "generated_before", cls.TITLE)

        rows = []
        if backbone is not None:
            label, note = dino_label(backbone)
            with on_compute_device(backbone) as device, torch.no_grad():
                embeddings = {
                    key: backbone.embed(dreambench_crop(images).to(device)).cpu() for key, images in sets.items()
                }
            rows.append(metric_row(label, embeddings, embeddings["references"], note=note))
        else:
            rows.append(
                MetricRow("DINO", None, note="connect a Patch Backbone Loader (DINOv2 in models/patch_backbones/)")
            )

        if clip_vision is not None:
            encoder = ClipVisionPatchBackbone(clip_vision, int(getattr(clip_vision, "image_size", 224)))
            with torch.no_grad():
                embeddings = {key: encoder.embed(images) for key, images in sets.items()}
            rows.append(metric_row("CLIP-I", embeddings, embeddings["references"]))
            rows.append(clip_t_row(embeddings, clip, prompt_text))
        else:
            missing = "connect Load CLIP Vision (e.g. CLIP ViT-L/14 in models/clip_vision/)"
            rows += [MetricRow("CLIP-I", None, note=missing), MetricRow("CLIP-T", None, note=missing)]

        report = format_table(rows)
        table = render_text_image(report).unsqueeze(0)
        values = [NOT_COMPUTED if row.after is None else row.after for row in rows]
        return io.NodeOutput(
            report, *values, table, ui={**ui.PreviewImage(table, cls=cls).as_dict(), **ui.PreviewText(report).as_dict()}
        )
