"""The node layer's half of the error convention: an ``InputError`` (a problem the user can fix)
reaches ComfyUI as "<node title>: <message>[. <hint>]"; every other exception propagates
unchanged, so ComfyUI shows the real traceback of a bug. ``check_number_inputs`` is the one
check of a node's numbers (finite FLOATs, ordered pairs) that every ``execute`` runs first."""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

from comfy_api.v0_0_2 import io

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


def check_number_inputs(node: type[io.ComfyNode], values: Mapping[str, Any]) -> None:
    """Raise ``InputError`` for a FLOAT input of ``node``'s schema that is NaN or infinite in
    ``values``, then for a pair ``(first, second)`` of ``node.ORDERED_INPUTS`` with first > second.

    ComfyUI's own min/max checks let a NaN widget value through (NaN < min is False) and never see
    a linked value, so each ``execute`` calls this first, inside its ``node_errors`` block:
    ``check_number_inputs(cls, locals())``. Names missing from ``values`` (optional inputs left
    out) are skipped.
    """
    for item in node.define_schema().inputs:
        value = values.get(item.id)
        if isinstance(item, io.Float.Input) and isinstance(value, (int, float)) and not math.isfinite(value):
            default = "" if item.default is None else f" (default {item.default:g})"
            raise InputError(
                f"{item.id} is {'NaN' if math.isnan(value) else 'infinite'}; set a finite number{default}."
            )
    for first, second in getattr(node, "ORDERED_INPUTS", ()):
        low, high = values.get(first), values.get(second)
        if low is not None and high is not None and low > high:
            raise InputError(f"{first} {low:g} is after {second} {high:g}; swap them.")
