"""The pack's own ComfyUI socket types and category, defined once for every node file."""
from comfy_api.latest import io

CATEGORY = "personalization"

# A ``personalize.backbones.PatchBackbone``: a patch-feature model.
PatchBackbone = io.Custom("PATCH_BACKBONE")

# A ``personalize.patch_quality.PatchQuality``: per-patch quality maps of a generated batch.
PatchQuality = io.Custom("PATCH_QUALITY")

# A ``trainers.preference_pairs.PreferencePairs``: winner/loser latents, conditioning, maps.
PreferencePairsType = io.Custom("PREFERENCE_PAIRS")
