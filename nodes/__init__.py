"""Thin ComfyUI nodes over the pure-torch algorithms in ``personalize/``."""
from .backbone import PatchBackboneFromClipVision, PatchBackboneLoader, register_model_folders
from .estimator import TrainPatchQualityEstimator
from .examples import ExampleSubjectPhoto
from .focus import FocusRegions
from .joint import JointAttention, JointSampler
from .metrics import PersonalizationMetrics
from .pairs import (LoadPreferencePairs, MergePreferencePairs, PairsFromArtistChoice, PairsFromRankedCandidates,
                    PairsFromRealPhotos, PreviewPreferencePairs, SavePreferencePairs)
from .patch_quality import PatchQualityScore
from .trainer import DPOLoraTrainer

NODE_LIST = [
    PatchBackboneLoader,
    PatchBackboneFromClipVision,
    PatchQualityScore,
    ExampleSubjectPhoto,
    FocusRegions,
    TrainPatchQualityEstimator,
    PersonalizationMetrics,
    PairsFromRankedCandidates,
    PairsFromRealPhotos,
    PairsFromArtistChoice,
    MergePreferencePairs,
    PreviewPreferencePairs,
    SavePreferencePairs,
    LoadPreferencePairs,
    DPOLoraTrainer,
    JointAttention,
    JointSampler,
]

__all__ = ["NODE_LIST", "register_model_folders"]
