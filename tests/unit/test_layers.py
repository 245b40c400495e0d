"""The layout's rules (CONTRIBUTING.md), checked on the source: what each layer may import."""

import ast
import glob
import os

import pytest

from harness import REPO_ROOT

COMFYUI_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "latent_preview",
    "nodes",
    "server",
    "execution",
    "node_helpers",
}
PACK_LAYERS = ("pure", "comfy_glue", "trainers", "nodes")

# layer -> (top-level modules it must not import, pack layers it must not import)
RULES = {
    "pure": (COMFYUI_MODULES, {"comfy_glue", "trainers", "nodes"}),
    "comfy_glue": ({"comfy_api"}, {"trainers", "nodes"}),
    "trainers": ({"comfy_api"}, {"nodes"}),
    "nodes": (set(), set()),
}
# The training algorithms in trainers/ (plain torch, as pure/ is); the rest of trainers/ is glue.
TRAINER_ALGORITHMS = {"losses", "timesteps", "lora_branch", "checkpointing", "estimator"}


def imports(path: str) -> tuple[set[str], set[str]]:
    """``(absolute top-level modules, pack layers reached by relative imports)`` of a file,
    including imports inside functions."""
    absolute, relative, _ = all_imports(path)
    return absolute, relative


def all_imports(path: str) -> tuple[set[str], set[str], set[str]]:
    """``imports(path)`` plus the modules of the file's own folder it imports (``from .x import``)."""
    absolute, relative, siblings = set(), set(), set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute.add(node.module.split(".")[0])
            elif node.level == 2 and node.module:  # from ..layer.module import x
                relative.add(node.module.split(".")[0])
            elif node.level == 1:  # from .module import x, or from . import module
                siblings |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return absolute, relative, siblings


def layer_files(layer: str) -> list[str]:
    return sorted(glob.glob(os.path.join(REPO_ROOT, layer, "*.py")))


@pytest.mark.parametrize("layer", list(RULES))
def test_layer_imports_follow_the_rules(layer):
    banned_modules, banned_layers = RULES[layer]
    files = layer_files(layer)
    assert files, f"no files in {layer}/"
    for path in files:
        absolute, relative = imports(path)
        name = os.path.relpath(path, REPO_ROOT)
        assert not absolute & banned_modules, f"{name} imports {sorted(absolute & banned_modules)}"
        assert not relative & banned_layers, f"{name} imports the layer(s) {sorted(relative & banned_layers)}"
        assert not absolute & set(PACK_LAYERS), f"{name} imports the pack absolutely; use relative imports"


def test_training_algorithms_import_no_comfyui_and_no_training_glue():
    """trainers/' algorithm modules hold to pure/'s rule: tested on tensors, no ComfyUI anywhere."""
    for module in sorted(TRAINER_ALGORITHMS):
        path = os.path.join(REPO_ROOT, "trainers", f"{module}.py")
        absolute, relative, siblings = all_imports(path)
        assert not absolute & COMFYUI_MODULES, f"trainers/{module}.py imports {sorted(absolute & COMFYUI_MODULES)}"
        assert relative <= {"pure"}, f"trainers/{module}.py imports the layer(s) {sorted(relative - {'pure'})}"
        glue = siblings - TRAINER_ALGORITHMS
        assert not glue, f"trainers/{module}.py imports the training glue {sorted(glue)}"


def test_nodes_import_the_pinned_node_api_not_latest():
    """``comfy_api.latest`` moves with every ComfyUI; ``v0_0_2`` is in both supported versions."""
    files = [os.path.join(REPO_ROOT, "__init__.py")] + layer_files("nodes")
    for path in files:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("comfy_api"):
                assert node.module == "comfy_api.v0_0_2", f"{os.path.relpath(path, REPO_ROOT)} imports {node.module}"


def test_the_pack_never_imports_the_dev_tooling():
    for layer in PACK_LAYERS:
        for path in layer_files(layer):
            assert "harness" not in imports(path)[0], path
    assert "harness" not in imports(os.path.join(REPO_ROOT, "__init__.py"))[0]


MAX_PARAMETERS = 8  # more travel as one settings object (a frozen dataclass)


def test_no_function_of_the_pack_takes_more_than_eight_parameters():
    """Settings travel as one object; a node's ``execute`` takes its inputs, so it is exempt."""
    too_long = []
    for layer in PACK_LAYERS:
        for path in layer_files(layer):
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "execute":
                    arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                    count = len([a for a in arguments if a.arg not in ("self", "cls")])
                    if count > MAX_PARAMETERS:
                        too_long.append(f"{os.path.relpath(path, REPO_ROOT)}: {node.name} ({count})")
    assert not too_long, too_long


def test_node_files_hold_node_classes_and_small_helpers_only():
    """A node file's top-level functions stay small: the work is a layer below."""
    for path in layer_files("nodes"):
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            if isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 30, f"{os.path.relpath(path, REPO_ROOT)}: {node.name} has {length} lines"
