"""Every node of the pack is registered in a real ComfyUI, as the node files declare it: its
title, the pack's category, a description and a tooltip on every input and output."""

import ast
import glob
import os

import pytest

from harness import REPO_ROOT
from harness.graphs import BUILTIN_BACKBONE

pytestmark = pytest.mark.server


def declared_nodes() -> dict[str, str]:
    """``node_id -> TITLE`` of every node class in ``nodes/``, read from the source."""
    declared = {}
    for path in glob.glob(os.path.join(REPO_ROOT, "nodes", "*.py")):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if not isinstance(node, ast.ClassDef):
                continue
            title = next(
                (
                    statement.value.value
                    for statement in node.body
                    if isinstance(statement, ast.Assign)
                    and [target.id for target in statement.targets if isinstance(target, ast.Name)] == ["TITLE"]
                ),
                None,
            )
            node_ids = [
                keyword.value.value
                for call in ast.walk(node)
                if isinstance(call, ast.Call)
                for keyword in call.keywords
                if keyword.arg == "node_id"
            ]
            if node_ids:
                assert title, f"{node.name} in {path} has no TITLE constant"
                declared[node_ids[0]] = title
    return declared


def test_every_node_is_registered_with_title_category_description_and_tooltips(comfy_server):
    declared = declared_nodes()
    assert len(declared) == 19, sorted(declared)
    info = comfy_server.object_info()
    registered = {name for name in info if name.startswith("PrefP_")}
    assert registered == set(declared)
    for node_id, title in declared.items():
        schema = info[node_id]
        assert schema["display_name"] == title
        assert schema["category"] == "personalization"
        assert schema["description"], f"{node_id} has no description"
        for group in ("required", "optional"):
            for name, spec in schema["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        tooltips = schema.get("output_tooltips") or []
        assert len(tooltips) == len(schema["output"]) and all(tooltips), f"{node_id} has an output without tooltip"
    assert BUILTIN_BACKBONE in info["PrefP_PatchBackboneLoader"]["input"]["required"]["backbone"][1]["options"]
    assert info["PrefP_JointSampler"]["output_name"] == ["images", "latent", "joint_latent"]
    assert {"references", "subject_mask"} <= set(info["PrefP_JointSampler"]["input"]["optional"])

    def inputs(node_id):
        return set(info[node_id]["input"]["required"]) | set(info[node_id]["input"].get("optional", {}))

    # Export Training Job takes the trainer's options (test_headless_training: the ones the job reads).
    export_only = {"pairs", "model", "model_file", "name", "layout"}
    trainer_only = {"pairs", "model", "save_prefix", "resume_lora", "resume_state"}
    trainer_only |= {"vae", "preview_every", "preview_images", "preview_steps"}  # previews: the node's alone
    assert inputs("PrefP_ExportTrainingJob") - export_only == inputs("PrefP_DPOLoraTrainer") - trainer_only
