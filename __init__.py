"""ComfyUI entry point: registers the pack's nodes (V3 schema), nothing else."""

from .comfy_glue.versions import check_comfyui_version, running_comfyui_version

check_comfyui_version(running_comfyui_version())  # before anything a too-old ComfyUI lacks

from comfy_api.v0_0_2 import ComfyExtension  # noqa: E402

from .comfy_glue.backbone import register_model_folders  # noqa: E402
from .nodes import NODE_LIST  # noqa: E402


class PreferencePersonalizationExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folders()

    async def get_node_list(self):
        register_model_folders()  # ComfyUI 0.3.75 does not call on_load yet
        return NODE_LIST


async def comfy_entrypoint() -> PreferencePersonalizationExtension:
    return PreferencePersonalizationExtension()
