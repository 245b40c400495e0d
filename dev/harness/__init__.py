"""Dev tooling shared by the tests, the demo, the benchmarks and ``make serve``: a real ComfyUI
server with the pack, the headless frontend, random-weight checkpoints, the workflows' facts.

Callers put ``dev/`` on ``sys.path`` (never the repository root, where the pack's ``nodes``
package would shadow ComfyUI's ``nodes`` module) and import ``harness.<module>``.
"""

from __future__ import annotations

import importlib.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def register_pack() -> None:
    """Make the pack importable as ``prefpersonalize`` without running its ComfyUI entry point,
    as the headless training command does (one definition: ``tools/train_dpo.py``)."""
    spec = importlib.util.spec_from_file_location("train_dpo_command", os.path.join(REPO_ROOT, "tools", "train_dpo.py"))
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
    command.register_pack()
