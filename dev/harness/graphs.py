"""Pieces of API-format prompts that several server tests build."""

from __future__ import annotations

BUILTIN_BACKBONE = "built-in: EfficientNet-Lite0 (ImageNet, offline)"


def attention_node(node_id: str, model=("1", 0), **settings) -> dict:
    """A Joint Attention node on ``model`` with the node's defaults, overridden by ``settings``."""
    inputs = {
        "model": list(model),
        "strength": 1.0,
        "mode": "joint",
        "reference_count": 1,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "input_blocks": True,
        "middle_block": True,
        "output_blocks": True,
        "adain": False,
    }
    return {node_id: {"class_type": "PrefP_JointAttention", "inputs": {**inputs, **settings}}}
