"""Shared test setup: import paths, the real ComfyUI server fixture and artifact folders.

- the pack's pure-torch code is imported as the package ``pack`` (``pack.personalize``,
  ``pack.trainers``): the repository root is registered under that name without running its
  ``__init__.py`` (which needs ComfyUI), so the modules' relative imports work as in ComfyUI.
- ``tests/harness`` holds the server, frontend and tiny-checkpoint helpers.
- The ``comfy_server`` fixture starts one real ComfyUI per test session with this pack linked
  into its ``custom_nodes/``; its log is copied to ``test_artifacts/`` at the end.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO_ROOT, "tests", "harness")
for path in (REPO_ROOT, HARNESS):
    if path not in sys.path:
        sys.path.insert(0, path)


def _register_pack_package() -> None:
    spec = importlib.machinery.ModuleSpec("pack", None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [REPO_ROOT]
    sys.modules.setdefault("pack", package)


_register_pack_package()

from comfy_server import ComfyServer, comfyui_path  # noqa: E402
from workflows import checkpoint_names, workflow_paths  # noqa: E402

ARTIFACTS = os.path.join(REPO_ROOT, "test_artifacts")
TINY_CHECKPOINT = "tiny_sd15.safetensors"


@pytest.fixture(scope="session")
def artifacts_dir() -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def comfy_server(artifacts_dir):
    """A real ComfyUI server with the pack, serving the tiny checkpoint under every checkpoint
    name the workflows use (and as ``tiny_sd15.safetensors``)."""
    server = ComfyServer()
    server.prepare()
    for name in {TINY_CHECKPOINT, *checkpoint_names(workflow_paths())}:
        server.provide_checkpoint(name)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.copy(server.log_path, os.path.join(artifacts_dir, "comfyui-server.log"))
        server.cleanup()


@pytest.fixture(scope="session")
def comfy_modules():
    """ComfyUI's own Python modules, importable in the test process (CPU only)."""
    path = comfyui_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)

    return path


def load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
