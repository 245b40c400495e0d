"""Personalization Metrics node: DreamBench-style DINO, CLIP-I and CLIP-T numbers, with an
optional before/after comparison."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..personalize.backbones import ClipVisionPatchBackbone, Dinov2PatchBackbone, TunedPatchBackbone
from ..personalize.metrics import MetricRow, dreambench_crop, format_table, mean_pairwise_cosine, render_text_image
from .backbone import on_compute_device
from .inputs import image_input_to_rgb
from .types import CATEGORY, PatchBackbone

NODE_NAME = "Personalization Metrics"
NOT_COMPUTED = -1.0


def dino_label(backbone) -> tuple[str, str]:
    """Label and note: real DINO only for DINOv2 backbones; anything else is an approximation."""
    base = backbone.base if isinstance(backbone, TunedPatchBackbone) else backbone
    if isinstance(base, Dinov2PatchBackbone):
        return "DINO", ""
    return "DINO*", (f"approximate, from {backbone.name}; put DINOv2 in models/patch_backbones/ for the "
                     "DreamBench DINO number")


class PersonalizationMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_PersonalizationMetrics",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "DreamBench-style numbers: DINO (generated vs reference, DINO embeddings), CLIP-I (the same with "
                "CLIP image embeddings) and CLIP-T (generated images vs the prompt). Each is the mean cosine over "
                "all pairs. Connect generated_before to get a before/after table with deltas. A metric whose "
                "model is not connected is reported as n/a (and -1 on its output)."),
            is_output_node=True,
            inputs=[
                io.Image.Input("generated", tooltip="Generated images to evaluate (after)."),
                io.Image.Input("references", tooltip="Reference photos of the subject."),
                io.String.Input("prompt_text", default="", multiline=True,
                                tooltip="The prompt the images were generated from (for CLIP-T)."),
                PatchBackbone.Input("backbone", optional=True,
                                    tooltip="For DINO: a DINOv2 from Patch Backbone Loader (the built-in one "
                                            "gives an approximate, labelled DINO*)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="For CLIP-I and CLIP-T: Load CLIP Vision (models/clip_vision/)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="For CLIP-T: the CLIP text encoder that pairs with clip_vision "
                                      "(e.g. CLIP-L with ViT-L/14)."),
                io.Image.Input("generated_before", optional=True,
                               tooltip="Optional: images before a change (e.g. without the LoRA) for a delta column."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="The table as text."),
                io.Float.Output(display_name="dino", tooltip="DINO (or DINO*) score of `generated`; -1 if not computed."),
                io.Float.Output(display_name="clip_i", tooltip="CLIP-I score of `generated`; -1 if not computed."),
                io.Float.Output(display_name="clip_t", tooltip="CLIP-T score of `generated`; -1 if not computed."),
                io.Image.Output(display_name="table", tooltip="The table as an image."),
            ],
        )

    @classmethod
    def execute(cls, generated, references, prompt_text, backbone=None, clip_vision=None, clip=None,
                generated_before=None) -> io.NodeOutput:
        if backbone is None and clip_vision is None:
            raise ValueError(f"{NODE_NAME}: connect a backbone (DINO) and/or a CLIP_VISION (CLIP-I, CLIP-T); "
                             "with neither there is nothing to measure.")
        sets = {"after": image_input_to_rgb(generated, "generated", NODE_NAME),
                "references": image_input_to_rgb(references, "references", NODE_NAME)}
        if generated_before is not None:
            sets["before"] = image_input_to_rgb(generated_before, "generated_before", NODE_NAME)

        rows = []
        if backbone is not None:
            label, note = dino_label(backbone)
            with on_compute_device(backbone) as device, torch.no_grad():
                embeddings = {key: backbone.embed(dreambench_crop(images).to(device)).cpu() for key, images in sets.items()}
            rows.append(MetricRow(label, *cls._scores(embeddings, embeddings["references"]), note=note))
        else:
            rows.append(MetricRow("DINO", None, note="connect a Patch Backbone Loader (DINOv2 in models/patch_backbones/)"))

        if clip_vision is not None:
            encoder = ClipVisionPatchBackbone(clip_vision, int(getattr(clip_vision, "image_size", 224)))
            with torch.no_grad():
                embeddings = {key: encoder.embed(images) for key, images in sets.items()}
            rows.append(MetricRow("CLIP-I", *cls._scores(embeddings, embeddings["references"])))
            rows.append(cls._clip_t(embeddings, clip, prompt_text))
        else:
            missing = "connect Load CLIP Vision (e.g. CLIP ViT-L/14 in models/clip_vision/)"
            rows += [MetricRow("CLIP-I", None, note=missing), MetricRow("CLIP-T", None, note=missing)]

        report = format_table(rows)
        table = render_text_image(report).unsqueeze(0)
        values = [NOT_COMPUTED if row.after is None else row.after for row in rows]
        return io.NodeOutput(report, *values, table, ui={**ui.PreviewImage(table, cls=cls).as_dict(),
                                                         **ui.PreviewText(report).as_dict()})

    @staticmethod
    def _scores(embeddings: dict, targets: torch.Tensor) -> tuple[float, float | None]:
        after = mean_pairwise_cosine(embeddings["after"], targets)
        before = mean_pairwise_cosine(embeddings["before"], targets) if "before" in embeddings else None
        return after, before

    @classmethod
    def _clip_t(cls, image_embeddings: dict, clip, prompt: str) -> MetricRow:
        if clip is None or not prompt.strip():
            return MetricRow("CLIP-T", None, note="connect the CLIP text encoder and write the prompt")
        _, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        text = pooled.float().reshape(1, -1).cpu()
        try:
            return MetricRow("CLIP-T", *cls._scores(image_embeddings, text))
        except ValueError as error:
            return MetricRow("CLIP-T", None, note=f"{error}; use the CLIP text encoder of the same CLIP model")
