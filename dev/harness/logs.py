"""Log capture for in-process tests of ComfyUI's loaders."""

from __future__ import annotations

import logging


class LoggedWarnings(logging.Handler):
    """ComfyUI's root-logger warnings while it is attached (``lora key not loaded: ...``,
    ``unet missing: ...``), as ``messages``; a context manager."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)
