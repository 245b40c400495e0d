"""Train Patch Quality Estimator node: PatchDPO's self-supervised tuning of the patch backbone
on the artist's own reference photos (no labels)."""

from __future__ import annotations

import logging
import os

import comfy.utils
import torch
from comfy_api.v0_0_2 import io, ui

from ..comfy_glue.backbone import backbones_folder
from ..comfy_glue.devices import on_compute_device
from ..pure.backbone import TunedPatchBackbone
from ..pure.errors import InputError
from ..pure.files import sanitize_file_stem, unused_stem
from ..trainers.estimator import EstimatorSettings, train_patch_estimator
from .errors import check_number_inputs, node_errors
from .inputs import image_input_to_rgb
from .types import CATEGORY, PatchBackbone


class TrainPatchQualityEstimator(io.ComfyNode):
    TITLE = "Train Patch Quality Estimator"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_TrainPatchQualityEstimator",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "Tunes the patch backbone on your reference photos so the same point of the subject "
                "gets the same feature across views (PatchDPO's self-supervised step). Pairs of randomly "
                "warped views with known geometry give the true patch matches; a dense contrastive loss "
                "trains a small head on top of the frozen backbone. Reports patch-matching accuracy on "
                "held-out views before and after."
            ),
            is_output_node=True,
            inputs=[
                PatchBackbone.Input("backbone", tooltip="From Patch Backbone Loader (built-in or DINOv2)."),
                io.Image.Input("references", tooltip="Reference photos of the subject (one or more)."),
                io.Int.Input(
                    "steps",
                    default=200,
                    min=0,
                    max=20000,
                    tooltip="Training steps; 0 measures accuracy only and returns the backbone unchanged.",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=1e-3,
                    min=1e-6,
                    max=1e-1,
                    step=1e-5,
                    tooltip="AdamW learning rate of the tuned head.",
                ),
                io.Int.Input(
                    "resolution",
                    default=224,
                    min=64,
                    max=1024,
                    step=16,
                    tooltip="Side of the square training views in pixels.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    tooltip="Seed of the random views: same seed, same result.",
                ),
                io.String.Input(
                    "save_name",
                    default="",
                    tooltip="If set, saves the tuned head to models/patch_backbones/<name>.safetensors, "
                    "selectable in Patch Backbone Loader (its base must stay there too).",
                ),
            ],
            outputs=[
                PatchBackbone.Output(display_name="backbone", tooltip="The tuned backbone."),
                io.String.Output(display_name="report", tooltip="Accuracy before/after and the loss."),
            ],
        )

    @classmethod
    def execute(cls, backbone, references, steps, learning_rate, resolution, seed, save_name) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            check_number_inputs(cls, locals())
            photos = image_input_to_rgb(references, "references", cls.TITLE)
            stem = sanitize_file_stem(save_name) if save_name.strip() else ""
            if save_name.strip() and not stem:
                raise InputError(f"save_name '{save_name}' has no usable characters; use letters and digits.")
            base_id = backbone.base_id if isinstance(backbone, TunedPatchBackbone) else backbone.source_id
            if stem and base_id is None:
                raise InputError(
                    "this backbone cannot be saved (it was not loaded by Patch Backbone Loader); "
                    "connect the loader's output or clear save_name."
                )
            progress = comfy.utils.ProgressBar(max(steps, 1))

            def on_step(step, loss):
                progress.update_absolute(step)  # also raises when the user presses Cancel
                if step == 1 or step % 50 == 0 or step == steps:
                    logging.info("%s: step %d/%d, loss %.4f", cls.TITLE, step, steps, loss)

            with on_compute_device(backbone) as device, torch.inference_mode(False), torch.enable_grad():
                result = train_patch_estimator(
                    backbone,
                    base_id or "",
                    photos.clone().to(device),
                    EstimatorSettings(steps=steps, learning_rate=learning_rate, resolution=resolution, seed=seed),
                    on_step=on_step,
                )
        tuned = result.backbone.cpu()
        report = (
            f"patch-matching top-1 on held-out views: {result.accuracy_before:.3f} -> {result.accuracy_after:.3f}"
            f" ({steps} steps"
        )
        report += f", loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f})" if result.losses else ")"
        if stem:
            folder = backbones_folder()
            path = os.path.join(folder, f"{unused_stem(folder, stem)}.safetensors")  # never over a model
            tuned.save(path)
            report += f"\nsaved {path}"
        return io.NodeOutput(tuned, report, ui=ui.PreviewText(report))
