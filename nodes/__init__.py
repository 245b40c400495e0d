"""Thin ComfyUI nodes over the pure-torch algorithms in ``personalize/``."""
from .backbone import PatchBackboneFromClipVision, PatchBackboneLoader, register_model_folders
from .examples import ExampleSubjectPhoto
from .patch_quality import PatchQualityScore

NODE_LIST = [
    PatchBackboneLoader,
    PatchBackboneFromClipVision,
    PatchQualityScore,
    ExampleSubjectPhoto,
]

__all__ = ["NODE_LIST", "register_model_folders"]
