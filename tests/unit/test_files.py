"""Output file names that never overwrite, and writes that never leave half a file."""

import os

import pytest

from prefpersonalize.pure.files import sanitize_file_stem, unused_stem, write_all_atomically


@pytest.mark.parametrize(
    "name,stem",
    [
        ("my_subject_pairs", "my_subject_pairs"),
        ("  spaces around  ", "spaces_around"),
        ("../../etc/passwd", "passwd"),
        ("folder/sub/name.safetensors", "name"),
        ("évil name!*?", "vil_name"),
        ("...", ""),
        ("..hidden", "hidden"),
        ("v1.5-lora_2", "v1.5-lora_2"),
    ],
)
def test_sanitize_file_stem(name, stem):
    assert sanitize_file_stem(name) == stem


def test_unused_stem_counts_up_past_taken_names(tmp_path):
    assert unused_stem(str(tmp_path), "lora") == "lora"
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    assert unused_stem(str(tmp_path), "lora") == "lora_2"
    (tmp_path / "lora_2.safetensors").write_bytes(b"x")
    (tmp_path / "lora_3.json").write_bytes(b"x")  # another extension does not count
    assert unused_stem(str(tmp_path), "lora") == "lora_3"
    assert unused_stem(str(tmp_path), "lora", ".json") == "lora"


def test_write_all_atomically_leaves_nothing_when_one_write_fails(tmp_path):
    def good(path):
        with open(path, "w") as handle:
            handle.write("ok")

    def bad(path):
        with open(path, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_all_atomically({str(tmp_path / "a.txt"): good, str(tmp_path / "b.txt"): bad})
    assert os.listdir(tmp_path) == []
    paths = write_all_atomically({str(tmp_path / "sub" / "a.txt"): good})
    assert paths == [str(tmp_path / "sub" / "a.txt")] and os.listdir(tmp_path / "sub") == ["a.txt"]
