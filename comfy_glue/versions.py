"""Which ComfyUI the pack runs in, and a clear refusal of one it does not support."""

from __future__ import annotations

import os
import re

OLDEST_SUPPORTED = (0, 3, 75)
PACK = "ComfyUI-PrefPersonalize"
PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")


def parse_version(text: str) -> tuple[int, ...] | None:
    """``"0.33.0"`` -> ``(0, 33, 0)``; None when ``text`` does not start with a version number."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def running_comfyui_version() -> str | None:
    """``__version__`` of the ComfyUI this process imports (None: too old to have the file)."""
    try:
        import comfyui_version
    except ImportError:
        return None
    return getattr(comfyui_version, "__version__", None)


def check_comfyui_version(found: str | None) -> None:
    """Raise ImportError naming the pack and the fix when ``found`` is older than supported."""
    version = parse_version(found) if found else None
    if version is None or version < OLDEST_SUPPORTED:
        oldest = ".".join(map(str, OLDEST_SUPPORTED))
        raise ImportError(
            f"{PACK} needs ComfyUI {oldest} or later, but this ComfyUI is {found or 'too old to report its version'}. "
            "Update ComfyUI (ComfyUI Manager: Update ComfyUI, or git pull), then restart it."
        )


def pack_version() -> str:
    """The pack's version, from its pyproject.toml (the one place it is written)."""
    with open(PYPROJECT, encoding="utf-8") as file:
        match = re.search(r'^version\s*=\s*"([^"]+)"', file.read(), re.MULTILINE)
    return match.group(1) if match else "unknown"
