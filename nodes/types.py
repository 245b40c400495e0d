"""The pack's own ComfyUI socket types, defined once and imported by every node file."""
from comfy_api.latest import io

# A ``PatchBackboneHandle`` (nodes/backbone.py): a patch-feature model ready for ComfyUI's
# memory management.
PatchBackbone = io.Custom("PATCH_BACKBONE")

# A ``personalize.patch_quality.PatchQuality``: per-patch quality maps of a generated batch.
PatchQuality = io.Custom("PATCH_QUALITY")

CATEGORY = "personalization"
