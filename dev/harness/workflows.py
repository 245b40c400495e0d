"""Facts about the pack's workflow files that the tests and the demo share."""

from __future__ import annotations

import glob
import json
import os

from . import REPO_ROOT

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")

# Widget values that make a workflow run in seconds on the tiny random checkpoint on a CPU.
# The workflows keep artist-sized defaults (512 px, 20 steps); the browser test and the demo
# shrink only image size, batch and step count, never the pack's own settings.
QUICK_RUN_WIDGETS = {
    "EmptyLatentImage": {"width": 128, "height": 128, "batch_size": 2},
    "KSampler": {"steps": 4},
    "PrefP_TrainPatchQualityEstimator": {"steps": 10},
    "PrefP_DPOLoraTrainer": {"steps": 3},
    "PrefP_JointSampler": {"width": 128, "height": 128, "steps": 4, "new_images": 2},
}


def workflow_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json")))


def checkpoint_names(paths: list[str]) -> set[str]:
    """Every checkpoint file name the workflows ask a checkpoint loader for."""
    names = set()
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            workflow = json.load(handle)
        for node in workflow.get("nodes", []):
            if node.get("type") in ("CheckpointLoaderSimple", "CheckpointLoader") and node.get("widgets_values"):
                names.add(
                    node["widgets_values"][-1] if node["type"] == "CheckpointLoader" else node["widgets_values"][0]
                )
    return names


def quick_run_widget_count(workflow: dict) -> int:
    """How many widgets ``QUICK_RUN_WIDGETS`` changes in ``workflow`` (every listed widget exists
    on its node type): a quick run that sets fewer has lost one to a rename."""
    return sum(
        len(QUICK_RUN_WIDGETS[node["type"]])
        for node in workflow.get("nodes", [])
        if node.get("type") in QUICK_RUN_WIDGETS
    )
