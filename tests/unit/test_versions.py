"""The ComfyUI version gate: parsing, and the refusal an artist sees on a too-old ComfyUI."""

import pytest

from prefpersonalize.comfy_glue.versions import check_comfyui_version, parse_version


def test_parse_version():
    assert parse_version("0.33.0") == (0, 33, 0)
    assert parse_version("v0.3.75-rc1") == (0, 3, 75)
    assert parse_version("nightly") is None


@pytest.mark.parametrize("found", ["0.3.75", "0.3.76", "0.33.0", "1.0"])
def test_supported_versions_pass(found):
    check_comfyui_version(found)


@pytest.mark.parametrize("found", ["0.3.74", "0.2.9", None, "unknown"])
def test_older_versions_are_refused_with_the_fix(found):
    with pytest.raises(ImportError, match=r"ComfyUI-PrefPersonalize needs ComfyUI 0\.3\.75 or later.*Update ComfyUI"):
        check_comfyui_version(found)
