"""The one error type for problems a user can fix (sizes, counts, settings, files)."""

from __future__ import annotations


class InputError(ValueError):
    """Something the user gave cannot be used, and the message says how to fix it.

    The node layer prefixes the node's title (``nodes.errors.node_errors``); every other
    exception is a bug and reaches ComfyUI unchanged, with its real traceback.
    """
