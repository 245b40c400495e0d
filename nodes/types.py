"""The pack's own ComfyUI socket types and category, defined once for every node file."""

from comfy_api.v0_0_2 import io

CATEGORY = "personalization"

# A ``pure.backbone.PatchBackbone``: a patch-feature model.
PatchBackbone = io.Custom("PATCH_BACKBONE")

# A ``pure.patch_quality.PatchQuality``: per-patch quality maps of a generated batch.
PatchQuality = io.Custom("PATCH_QUALITY")

# A ``pure.pairs.PreferencePairs``: winner/loser latents, conditioning, maps.
PreferencePairsType = io.Custom("PREFERENCE_PAIRS")
