"""The node layer's half of the error convention: an ``InputError`` (a problem the user can fix)
reaches ComfyUI as "<node title>: <message>[. <hint>]"; every other exception propagates
unchanged, so ComfyUI shows the real traceback of a bug."""

from __future__ import annotations

from contextlib import contextmanager

from ..pure.errors import InputError


class NodeInputError(InputError):
    """An ``InputError`` whose message already starts with the node's title."""


@contextmanager
def node_errors(title: str, hint: str = ""):
    """Prefix ``title`` (and append ``hint``) to an ``InputError`` raised in the block.

    Wrap a node's whole ``execute`` in one; an inner one can add a hint for one call. An error
    that already carries a title passes unchanged, so the blocks nest.
    """
    try:
        yield
    except NodeInputError:
        raise
    except InputError as error:
        message = f"{title}: {error}"
        if hint:
            message = f"{message.rstrip('.')}. {hint}"
        raise NodeInputError(message) from error
