"""Example Subject Photo node: the pack's bundled CC0 photos, so workflows run out of the box."""

from __future__ import annotations

import os

import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image

from ..pure.errors import InputError
from .errors import node_errors
from .types import CATEGORY

PHOTOS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "photos")


def bundled_photos() -> list[str]:
    return sorted(name for name in os.listdir(PHOTOS_DIR) if name.lower().endswith((".png", ".jpg", ".jpeg")))


def load_photo(name: str) -> torch.Tensor:
    """A bundled photo as a ComfyUI IMAGE ``[1, H, W, 3]`` in 0..1."""
    with Image.open(os.path.join(PHOTOS_DIR, name)) as photo:
        pixels = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)


class ExampleSubjectPhoto(io.ComfyNode):
    TITLE = "Example Subject Photo"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_ExampleSubjectPhoto",
            display_name=cls.TITLE,
            category=CATEGORY,
            description="A photo bundled with the pack (CC0, from scikit-image's samples), for trying the "
            "workflows without your own reference photos. Use Load Image for your own.",
            inputs=[
                io.Combo.Input(
                    "photo",
                    options=bundled_photos(),
                    default="chelsea.png",
                    tooltip="chelsea.png: a cat (the example subject); coffee.png: an unrelated scene.",
                )
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The photo as an IMAGE.")],
        )

    @classmethod
    def execute(cls, photo) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            if photo not in bundled_photos():
                raise InputError(f"'{photo}' is not in {PHOTOS_DIR}; reinstall the pack.")
        return io.NodeOutput(load_photo(photo))
