"""Focus Regions node (FocusDPO): where a preference update should concentrate, from semantic
correspondence and image complexity, and how that moves over the sampling steps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..personalize.focus import blend_focus, compute_focus_maps, percent_for_sigma
from ..personalize.heatmap import labelled_strip, overlay_heat
from .backbone import on_compute_device
from .inputs import image_input_to_rgb
from .types import CATEGORY, PatchBackbone

NODE_NAME = "Focus Regions"


def strip_progress(frames: int, sigmas: torch.Tensor | None, model) -> list[tuple[float, str]]:
    """``(progress, label)`` for each strip frame: evenly spaced percents, or the given sigmas
    (percent from the model's own schedule when a MODEL is connected, else the step fraction)."""
    if sigmas is None or len(sigmas) < 2:
        values = torch.linspace(0, 1, frames).tolist()
        return [(value, f"p={value:.2f}") for value in values]
    steps = len(sigmas) - 1  # the last sigma is where sampling ends
    picks = sorted({round(index) for index in torch.linspace(0, steps - 1, min(frames, steps)).tolist()})
    if model is not None:
        sampling = model.get_model_object("model_sampling")
        percents = [percent_for_sigma(float(sigmas[index]), sampling.percent_to_sigma) for index in picks]
    else:
        percents = [index / max(steps - 1, 1) for index in picks]
    return [(percent, f"step {index + 1}/{steps} p={percent:.2f}") for index, percent in zip(picks, percents)]


class FocusRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_FocusRegions",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "FocusDPO focus map: where a preference update should concentrate. Correspondence = regions "
                "that match no subject of the references (high priority); complexity = local entropy (detail). "
                "At noisy steps only correspondence counts; the complexity map fades in between gate_start "
                "and gate_end. Red = high focus. The strip shows the map at several steps."),
            is_output_node=True,
            inputs=[
                PatchBackbone.Input("backbone", tooltip="From Patch Backbone Loader."),
                io.Image.Input("generated", tooltip="Generated images (a batch)."),
                io.Image.Input("references", tooltip="Reference photos of the subject(s)."),
                io.Mask.Input("subject_masks", optional=True,
                              tooltip="Optional subject masks: one for all references, one per reference, or "
                                      "several (one per subject) for a single reference image."),
                io.Float.Input("percent", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress of the focus/overlay outputs: 0 = first (noisiest) "
                                       "step, 1 = last step (ComfyUI's start/end percent convention)."),
                io.Float.Input("gate_start", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Progress where the complexity map starts to count."),
                io.Float.Input("gate_end", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="Progress from which the complexity map counts fully."),
                io.Float.Input("complexity_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the complexity map against correspondence once gated in."),
                io.Int.Input("strip_frames", default=5, min=2, max=16,
                             tooltip="Frames in the over-time strip."),
                io.Int.Input("resolution", default=448, min=64, max=2048, step=16,
                             tooltip="Short side for feature extraction (finer grid = slower)."),
                io.Float.Input("overlay_opacity", default=0.55, min=0.0, max=1.0, step=0.05,
                               tooltip="Opacity of the focus colours over the image."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional sigmas from a scheduler node: the strip then shows those steps."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional MODEL to convert the sigmas to percents exactly "
                                       "(otherwise the step fraction is used)."),
            ],
            outputs=[
                io.Mask.Output(display_name="focus", tooltip="Focus weights at `percent`, image size, 1 = focus."),
                io.Image.Output(display_name="overlay", tooltip="Focus colours over the generated images."),
                io.Image.Output(display_name="strip", tooltip="One strip per generated image: focus over the steps."),
                io.Mask.Output(display_name="correspondence", tooltip="Mismatch priority (1 = matches no subject)."),
                io.Mask.Output(display_name="complexity", tooltip="Local entropy of the blurred image (1 = detail-rich)."),
            ],
        )

    @classmethod
    def execute(cls, backbone, generated, references, percent, gate_start, gate_end, complexity_weight,
                strip_frames, resolution, overlay_opacity, subject_masks=None, sigmas=None, model=None) -> io.NodeOutput:
        generated_rgb = image_input_to_rgb(generated, "generated", NODE_NAME)
        references_rgb = image_input_to_rgb(references, "references", NODE_NAME)
        if gate_end < gate_start:
            raise ValueError(f"{NODE_NAME}: gate_end ({gate_end}) is below gate_start ({gate_start}); swap them.")
        if subject_masks is not None and subject_masks.ndim == 2:
            subject_masks = subject_masks.unsqueeze(0)
        with on_compute_device(backbone) as device:
            try:
                maps = compute_focus_maps(backbone, generated_rgb.to(device), references_rgb.to(device),
                                          None if subject_masks is None else subject_masks.to(device), resolution)
            except ValueError as error:
                raise ValueError(f"{NODE_NAME}: {error}. Paint each subject mask so it covers part of its "
                                 "reference image, or disconnect subject_masks.") from error
        size = tuple(generated_rgb.shape[-2:])
        correspondence, complexity = (m.cpu() for m in maps.on_grid(size))
        settings = dict(gate_start=gate_start, gate_end=gate_end, complexity_weight=complexity_weight)

        focus = blend_focus(correspondence, complexity, percent, **settings)
        overlay = overlay_heat(generated_rgb, focus, overlay_opacity)
        frames = strip_progress(strip_frames, sigmas, model)
        thumbnail = F.interpolate(generated_rgb, scale_factor=min(1.0, 256 / max(size)), mode="area")
        # The blend is per pixel, so blending at thumbnail size equals blending then shrinking.
        small_correspondence, small_complexity = (m.cpu() for m in maps.on_grid(tuple(thumbnail.shape[-2:])))
        frame_overlays = [overlay_heat(thumbnail, blend_focus(small_correspondence, small_complexity, progress,
                                                              **settings), overlay_opacity)
                          for progress, _ in frames]  # each [B, 3, th, tw]
        labels = [label for _, label in frames]
        strip = torch.stack([labelled_strip(torch.stack([frame[index] for frame in frame_overlays]), labels)
                             for index in range(generated_rgb.shape[0])]).movedim(1, -1)
        overlay = overlay.movedim(1, -1)
        # The strip says the most at a glance (it includes the overlay's progress range).
        return io.NodeOutput(focus, overlay, strip, correspondence, complexity, ui=ui.PreviewImage(strip, cls=cls))
