"""Every sample workflow ships what ComfyUI's template browser shows: a same-name thumbnail."""

import os

import pytest
from PIL import Image

from harness.workflows import workflow_paths


def test_there_are_workflows():
    assert len(workflow_paths()) >= 4


@pytest.mark.parametrize("path", workflow_paths(), ids=os.path.basename)
def test_workflow_has_a_template_thumbnail(path):
    thumbnail = path[: -len(".json")] + ".jpg"
    assert os.path.isfile(thumbnail), f"{os.path.basename(path)} has no thumbnail {os.path.basename(thumbnail)}"
    with Image.open(thumbnail) as image:
        image.verify()
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and 200 <= image.height <= 400 and image.width >= image.height
    assert os.path.getsize(thumbnail) < 512 * 1024
