"""Naming and writing output files so that nothing is overwritten by accident and a failure or
an interrupt never leaves a half-written file behind."""

from __future__ import annotations

import os
import re
from collections.abc import Callable


def sanitize_file_stem(name: str) -> str:
    """A safe file stem: letters, digits, dot, dash and underscore; no folders, no extension
    ``.safetensors``. Empty when nothing usable is left."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(name.strip())).strip("._")
    return stem.removesuffix(".safetensors")


def unused_stem(folder: str, stem: str, extension: str = ".safetensors") -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... : the first with no ``<folder>/<stem><extension>``."""
    candidate, counter = stem, 1
    while os.path.exists(os.path.join(folder, f"{candidate}{extension}")):
        counter += 1
        candidate = f"{stem}_{counter}"
    return candidate


def write_all_atomically(writers: dict[str, Callable[[str], None]]) -> list[str]:
    """For every ``path: write`` call ``write(temporary_path)``; only when all succeeded rename
    the results to their paths (each rename atomic on one file system), so a failure leaves none
    of them. Temporary files are removed whatever happens. Returns the paths."""
    temporaries = {path: f"{path}.partial" for path in writers}
    try:
        for path, write in writers.items():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write(temporaries[path])
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            if os.path.exists(temporary):
                os.remove(temporary)
    return list(writers)


def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """``write_all_atomically`` for one file; returns ``path``."""
    return write_all_atomically({path: write})[0]
