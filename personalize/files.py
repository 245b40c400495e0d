"""Writing files so that a failure or an interrupt never leaves a half-written one behind."""
from __future__ import annotations

import os
from typing import Callable


def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(temporary_path)``, then rename the result to ``path`` (atomic on one file
    system). The temporary file is removed if anything fails. Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.partial"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
