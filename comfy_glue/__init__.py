"""Glue between the pure algorithms and ComfyUI's core: joint attention patches on a
ModelPatcher, sampling, the model families' descriptions, devices and model folders.

The rule of this layer: it may import ComfyUI's core (``comfy``, ``folder_paths``) and
``pure``, never ComfyUI's node API (``comfy_api``), ``trainers`` or ``nodes``; node schemas live
in ``nodes/`` (``tests/unit/test_layers.py`` checks it).
"""
