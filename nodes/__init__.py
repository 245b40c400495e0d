"""The pack's ComfyUI nodes: schemas and thin ``execute`` methods over ``comfy_glue/`` and ``pure/``."""

from .backbone import PatchBackboneFromClipVision, PatchBackboneLoader
from .estimator import TrainPatchQualityEstimator
from .examples import ExampleSubjectPhoto
from .focus import FocusRegions
from .joint import JointAttention, JointSampler
from .metrics import PersonalizationMetrics
from .pairs import (
    LoadPreferencePairs,
    MergePreferencePairs,
    PairsFromArtistChoice,
    PairsFromRankedCandidates,
    PairsFromRealPhotos,
    PreviewPreferencePairs,
    SavePreferencePairs,
)
from .patch_quality import PatchQualityScore
from .trainer import DPOLoraTrainer, ExportTrainingJob, SaveDPOLora

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
    SaveDPOLora,
    ExportTrainingJob,
    JointAttention,
    JointSampler,
]

__all__ = ["NODE_LIST"]
