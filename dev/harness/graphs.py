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


def generation(size=64, batch=2, seed=7, steps=2, cfg=4.0, checkpoint="tiny_sd15.safetensors") -> dict:
    """Nodes 1-6: a checkpoint, prompts "a photo of a cat" / "", KSampler (euler, normal) and the
    decoded IMAGE at ``["6", 0]``."""
    sampler = {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                **sampler,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }
