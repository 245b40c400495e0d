"""Dev tooling shared by the tests, the demo, the benchmarks and ``make serve``: a real ComfyUI
server with the pack, the headless frontend, random-weight checkpoints, the workflows' facts.

Callers put ``dev/`` on ``sys.path`` (never the repository root, where the pack's ``nodes``
package would shadow ComfyUI's ``nodes`` module) and import ``harness.<module>``.
"""

from __future__ import annotations

import ctypes
import gc
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


def release_memory() -> None:
    """Give memory freed by this process back to the system: collect cycles, then glibc's
    ``malloc_trim`` (freed heap pages otherwise stay with the process, so after a full-size model
    the subprocesses of later tests run short on a 24 GB machine)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
