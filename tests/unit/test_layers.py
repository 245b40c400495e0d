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
PACK_LAYERS = ("pure", "comfy_glue", "nodes")

# layer -> (top-level modules it must not import, pack layers it must not import)
RULES = {
    "pure": (COMFYUI_MODULES, {"comfy_glue", "nodes"}),
    "comfy_glue": ({"comfy_api"}, {"nodes"}),
    "nodes": (set(), set()),
}


def imports(path: str) -> tuple[set[str], set[str]]:
    """``(absolute top-level modules, pack layers reached by relative imports)`` of a file,
    including imports inside functions."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute.add(node.module.split(".")[0])
            elif node.level == 2 and node.module:  # from ..layer.module import x
                relative.add(node.module.split(".")[0])
    return absolute, relative


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


def test_the_pack_never_imports_the_dev_tooling():
    for layer in PACK_LAYERS:
        for path in layer_files(layer):
            assert "harness" not in imports(path)[0], path
    assert "harness" not in imports(os.path.join(REPO_ROOT, "__init__.py"))[0]


def test_node_files_hold_node_classes_and_small_helpers_only():
    """A node file's top-level functions stay small: the work is a layer below."""
    for path in layer_files("nodes"):
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            if isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 30, f"{os.path.relpath(path, REPO_ROOT)}: {node.name} has {length} lines"
