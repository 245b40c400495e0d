"""Focus Regions node (FocusDPO): where a preference update should concentrate, from semantic
correspondence and image complexity, and how that moves over the sampling steps."""

from __future__ import annotations

import torch.nn.functional as F
from comfy_api.v0_0_2 import io, ui

from ..comfy_glue.devices import on_compute_device
from ..comfy_glue.focus import strip_progress
from ..pure.drawing import overlay_heat
from ..pure.focus import blend_focus, compute_focus_maps, focus_strips
from .errors import check_number_inputs, node_errors
from .inputs import image_input_to_rgb
from .types import CATEGORY, PatchBackbone

# Longest side of the strip's frames.
STRIP_FRAME_SIZE = 256


class FocusRegions(io.ComfyNode):
    TITLE = "Focus Regions"
    ORDERED_INPUTS = (("gate_start", "gate_end"),)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_FocusRegions",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "FocusDPO focus map: where a preference update should concentrate. Correspondence = regions "
                "that match no subject of the references (high priority); complexity = local entropy (detail). "
                "At noisy steps only correspondence counts; the complexity map fades in between gate_start "
                "and gate_end. Red = high focus. The strip shows the map at several steps."
            ),
            is_output_node=True,
            inputs=[
                PatchBackbone.Input("backbone", tooltip="From Patch Backbone Loader."),
                io.Image.Input("generated", tooltip="Generated images (a batch)."),
                io.Image.Input("references", tooltip="Reference photos of the subject(s)."),
                io.Mask.Input(
                    "subject_masks",
                    optional=True,
                    tooltip="Optional subject masks: one for all references, one per reference, or "
                    "several (one per subject) for a single reference image.",
                ),
                io.Float.Input(
                    "percent",
                    default=0.8,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress of the focus/overlay outputs: 0 = first (noisiest) "
                    "step, 1 = last step (ComfyUI's start/end percent convention).",
                ),
                io.Float.Input(
                    "gate_start",
                    default=0.3,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Progress where the complexity map starts to count.",
                ),
                io.Float.Input(
                    "gate_end",
                    default=0.7,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Progress from which the complexity map counts fully.",
                ),
                io.Float.Input(
                    "complexity_weight",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Weight of the complexity map against correspondence once gated in.",
                ),
                io.Int.Input("strip_frames", default=5, min=2, max=16, tooltip="Frames in the over-time strip."),
                io.Int.Input(
                    "resolution",
                    default=448,
                    min=64,
                    max=2048,
                    step=16,
                    tooltip="Short side for feature extraction (finer grid = slower).",
                ),
                io.Float.Input(
                    "overlay_opacity",
                    default=0.55,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Opacity of the focus colours over the image.",
                ),
                io.Sigmas.Input(
                    "sigmas",
                    optional=True,
                    tooltip="Optional sigmas from a scheduler node: the strip then shows those steps.",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Optional MODEL to convert the sigmas to percents exactly "
                    "(otherwise the step fraction is used).",
                ),
            ],
            outputs=[
                io.Mask.Output(display_name="focus", tooltip="Focus weights at `percent`, image size, 1 = focus."),
                io.Image.Output(display_name="overlay", tooltip="Focus colours over the generated images."),
                io.Image.Output(display_name="strip", tooltip="One strip per generated image: focus over the steps."),
                io.Mask.Output(display_name="correspondence", tooltip="Mismatch priority (1 = matches no subject)."),
                io.Mask.Output(
                    display_name="complexity", tooltip="Local entropy of the blurred image (1 = detail-rich)."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        backbone,
        generated,
        references,
        percent,
        gate_start,
        gate_end,
        complexity_weight,
        strip_frames,
        resolution,
        overlay_opacity,
        subject_masks=None,
        sigmas=None,
        model=None,
    ) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            check_number_inputs(cls, locals())
            generated_rgb = image_input_to_rgb(generated, "generated", cls.TITLE)
            references_rgb = image_input_to_rgb(references, "references", cls.TITLE)
            if subject_masks is not None and subject_masks.ndim == 2:
                subject_masks = subject_masks.unsqueeze(0)
            hint = "Paint each subject mask so it covers part of its reference image, or disconnect subject_masks."
            with on_compute_device(backbone) as device, node_errors(cls.TITLE, hint):
                maps = compute_focus_maps(
                    backbone,
                    generated_rgb.to(device),
                    references_rgb.to(device),
                    None if subject_masks is None else subject_masks.to(device),
                    resolution,
                )
        size = tuple(generated_rgb.shape[-2:])
        correspondence, complexity = (m.cpu() for m in maps.on_grid(size))
        settings = dict(gate_start=gate_start, gate_end=gate_end, complexity_weight=complexity_weight)
        focus = blend_focus(correspondence, complexity, percent, **settings)
        overlay = overlay_heat(generated_rgb, focus, overlay_opacity).movedim(1, -1)
        thumbnail = F.interpolate(generated_rgb, scale_factor=min(1.0, STRIP_FRAME_SIZE / max(size)), mode="area")
        small_maps = (m.cpu() for m in maps.on_grid(tuple(thumbnail.shape[-2:])))
        strip = focus_strips(
            thumbnail, *small_maps, strip_progress(strip_frames, sigmas, model), overlay_opacity, **settings
        ).movedim(1, -1)
        # The strip says the most at a glance (it includes the overlay's progress range).
        return io.NodeOutput(focus, overlay, strip, correspondence, complexity, ui=ui.PreviewImage(strip, cls=cls))
