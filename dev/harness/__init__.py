"""Dev tooling shared by the tests, the demo, the benchmarks and ``make serve``: a real ComfyUI
server with the pack, the headless frontend, random-weight checkpoints, the workflows' facts.

Callers put ``dev/`` on ``sys.path`` (never the repository root, where the pack's ``nodes``
package would shadow ComfyUI's ``nodes`` module) and import ``harness.<module>``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_PACKAGE = "pack"


def register_pack() -> None:
    """Make the pack importable in this process as ``pack`` (``pack.pure``, ``pack.comfy_glue``,
    ``pack.nodes``) without running its ``__init__.py``, which needs a running ComfyUI; the
    modules' relative imports then work as they do inside ComfyUI."""
    if PACK_PACKAGE in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec(PACK_PACKAGE, None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [REPO_ROOT]
    sys.modules[PACK_PACKAGE] = package
