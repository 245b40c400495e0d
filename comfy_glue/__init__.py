"""Glue between the pure algorithms and ComfyUI's core: model patches and weight adapters on a
ModelPatcher, the DPO training loop, attention kernels, devices and model folders.

The rule of this layer: it may import ComfyUI's core (``comfy``, ``folder_paths``) and
``pure``, never ComfyUI's node API (``comfy_api``) or ``nodes``; node schemas live in
``nodes/`` (``tests/unit/test_layers.py`` checks it).
"""
