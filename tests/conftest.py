"""Shared test setup: import paths, the real ComfyUI server fixture and artifact folders.

- the pack is imported as the package ``prefpersonalize`` (``prefpersonalize.pure``,
  ``prefpersonalize.trainers``, ...; see ``harness.register_pack``), and the dev tooling as
  ``harness`` from ``dev/`` (``pythonpath`` in pytest.ini). The repository root is never put on
  ``sys.path``: its ``nodes`` package would shadow ComfyUI's ``nodes`` module.
- The ``comfy_server`` fixture starts one real ComfyUI per test session with this pack linked
  into its ``custom_nodes/``; its log is copied to ``test_artifacts/`` at the end.
- Tests that need ComfyUI skip cleanly where there is none (``make test`` always has one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest

import harness  # tests/pytest.ini puts dev/ on the path

harness.register_pack()

from harness.comfy_server import ComfyServer, comfyui_path  # noqa: E402
from harness.workflows import provide_workflow_models, unsupported_reason, workflow_paths  # noqa: E402
from prefpersonalize.comfy_glue.versions import parse_version  # noqa: E402

REPO_ROOT = harness.REPO_ROOT

ARTIFACTS = os.path.join(REPO_ROOT, "test_artifacts")
TINY_CHECKPOINT = "tiny_sd15.safetensors"
# What a marked test needs, checked once per session: marker -> fixture that provides it.
TIER_FIXTURES = {"comfy": "comfy_modules", "server": "comfy_server"}
# The suite runs on both supported versions and must fit CI's hour, so each heavy check runs on
# one of them: ``current_comfyui`` on this ComfyUI or newer (the 2026 families, full-size
# models), ``oldest_comfyui`` on older ones (learning on SD1.5, where the version changes nothing
# the check is about). The light checks run on both. ``PREFP_EVERY_VERSION=1`` runs them all on
# whichever version is here (by hand: CI keeps the split).
CURRENT_COMFYUI = (0, 33)
EVERY_VERSION = os.environ.get("PREFP_EVERY_VERSION") == "1"


def comfyui_version(path: str) -> str | None:
    """``__version__`` of the ComfyUI tree at ``path`` (None: too old to have the file)."""
    try:
        with open(os.path.join(path, "comfyui_version.py"), encoding="utf-8") as file:
            match = re.search(r'__version__\s*=\s*"([^"]+)"', file.read())
    except OSError:
        return None
    return match.group(1) if match else None


def pytest_collection_modifyitems(config, items):
    """Markers say what a test needs: a test using a tier's fixture must carry its marker (so
    ``-m`` selects correctly), and tiers whose requirement is missing here are skipped."""
    missing = {}
    try:
        found = comfyui_version(comfyui_path())
        version = parse_version(found) if found else None
        current = ".".join(map(str, CURRENT_COMFYUI))
        here, why = f"ComfyUI {found or 'of unknown version'} here: this heavy check runs", "to keep CI within the hour"
        if EVERY_VERSION:
            pass
        elif version is None or version < CURRENT_COMFYUI:
            missing["current_comfyui"] = f"{here} on ComfyUI {current} or newer only, {why}"
        else:
            missing["oldest_comfyui"] = f"{here} on ComfyUI before {current} only, {why}"
    except RuntimeError as error:
        missing["comfy"] = missing["server"] = str(error)
    if shutil.which("chromium") is None:
        missing["browser"] = "no chromium on PATH (make env installs it)"
    for item in items:
        for marker, fixture in TIER_FIXTURES.items():
            if fixture in item.fixturenames and item.get_closest_marker(marker) is None:
                raise pytest.UsageError(f"{item.nodeid} uses the {fixture} fixture; mark it @pytest.mark.{marker}")
        for marker, reason in missing.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def artifacts_dir() -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def comfy_server(artifacts_dir):
    """A real ComfyUI server with the pack, serving the tiny checkpoint as ``tiny_sd15.safetensors``
    and every model file the workflows it can run load (``provide_workflow_models``)."""
    server = ComfyServer()
    server.prepare()
    server.provide_checkpoint(TINY_CHECKPOINT)
    provide_workflow_models(server, [path for path in workflow_paths() if not unsupported_reason(path)])
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
