"""Thin ComfyUI nodes over the pure-torch algorithms in ``personalize/``."""
from .backbone import PatchBackboneFromClipVision, PatchBackboneLoader, register_model_folders
from .estimator import TrainPatchQualityEstimator
from .examples import ExampleSubjectPhoto
from .focus import FocusRegions
from .metrics import PersonalizationMetrics
from .patch_quality import PatchQualityScore

NODE_LIST = [
    PatchBackboneLoader,
    PatchBackboneFromClipVision,
    PatchQualityScore,
    ExampleSubjectPhoto,
    FocusRegions,
    TrainPatchQualityEstimator,
    PersonalizationMetrics,
]

__all__ = ["NODE_LIST", "register_model_folders"]
