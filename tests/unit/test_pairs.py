"""Preference-pair sets: ranking rules, merging, validation and atomic storage."""

import json
import os
import shutil

import pytest
import torch

from prefpersonalize.pure.errors import InputError
from prefpersonalize.pure.images import maps_to_grid
from prefpersonalize.pure.pairs import (
    FORMAT_VERSION,
    PairMaps,
    PreferencePairs,
    load_pairs,
    merge_pairs,
    rank_pairs,
    save_pairs,
)

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


def make_pairs(count=2, size=(4, 6), channels=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    maps = lambda: torch.rand(count, *size, generator=generator)  # noqa: E731
    cond = torch.randn(1, 5, 8, generator=generator)
    return PreferencePairs(
        winners=torch.randn(count, channels, *size, generator=generator),
        losers=torch.randn(count, channels, *size, generator=generator),
        conditionings=[[[cond, {"pooled_output": torch.randn(1, 8, generator=generator), "area": (1, 1)}]]],
        condition_index=torch.zeros(count, dtype=torch.long),
        maps=PairMaps(winner_weights=maps(), loser_weights=maps(), loser_quality=maps(), loser_complexity=maps()),
        thumbnails_winner=torch.rand(count, 3, 16, 24),
        thumbnails_loser=torch.rand(count, 3, 16, 24),
        metadata=[{"source": "ranked", "difficulty": "easy", "winner_score": 0.9, "loser_score": 0.2}] * count,
        latent_channels=channels,
    )


def test_rank_pairs_best_vs_worst_and_margin():
    assert rank_pairs([0.2, 0.9, 0.5]) == [(1, 0, "easy")]
    all_pairs = rank_pairs([0.2, 0.9, 0.5], "all_above_margin", margin=0.25)
    assert sorted(all_pairs) == [(1, 0, "easy"), (1, 2, "normal"), (2, 0, "normal")]
    # gaps: 0.7 (1 vs 0), 0.4 (1 vs 2), 0.3 (2 vs 0)
    assert sorted(rank_pairs([0.2, 0.9, 0.5], "all_above_margin", margin=0.35)) == [(1, 0, "easy"), (1, 2, "normal")]
    with pytest.raises(ValueError, match="at least 2"):
        rank_pairs([0.5])
    with pytest.raises(ValueError, match="margin"):
        rank_pairs([0.5, 0.51], margin=0.1)


def test_maps_to_grid_area_pools_down_and_interpolates_up():
    maps = torch.zeros(1, 8, 8)
    maps[:, :4, :4] = 1
    torch.testing.assert_close(maps_to_grid(maps, (2, 2)), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    assert maps_to_grid(torch.ones(1, 2, 2), (4, 4)).shape == (1, 4, 4)


def test_merge_offsets_conditioning_and_checks_sizes():
    second = make_pairs(3, seed=1)
    second.references = torch.randn(1, 4, 4, 6)
    merged = merge_pairs(make_pairs(2, seed=0), second)
    assert len(merged) == 5 and len(merged.conditionings) == 2
    assert merged.references.shape == (1, 4, 4, 6)
    assert merged.condition_index.tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(merged.maps.loser_complexity[2:], second.maps.loser_complexity)
    merged.validate()
    with pytest.raises(ValueError, match="different latent sizes"):
        merge_pairs(make_pairs(2), make_pairs(2, size=(4, 4)))


def test_validate_names_problems():
    pairs = make_pairs()
    pairs.losers = pairs.losers[..., :3]
    with pytest.raises(ValueError, match="differ in size"):
        pairs.validate()
    pairs = make_pairs()
    pairs.winners[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pairs.validate()
    empty = make_pairs(0)
    with pytest.raises(ValueError, match="empty"):
        empty.validate()
    pairs = make_pairs()
    pairs.references = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match="reference latents .* do not match"):
        pairs.validate()
    pairs.references = torch.full((2, 4, 4, 6), float("nan"))
    with pytest.raises(ValueError, match="reference latents contain NaN"):
        pairs.validate()
    pairs = make_pairs()
    pairs.maps.loser_quality = pairs.maps.loser_quality[:1]
    with pytest.raises(ValueError, match="loser_quality has shape"):
        pairs.validate()
    pairs = make_pairs()
    pairs.thumbnails_loser = pairs.thumbnails_loser[:1]
    with pytest.raises(ValueError, match="thumbnail count"):
        pairs.validate()


def test_save_load_roundtrip_is_atomic(tmp_path):
    pairs = make_pairs(3)
    pairs.references = torch.randn(2, 4, 4, 6)
    tensor_path, json_path = save_pairs(pairs, str(tmp_path / "sub" / "set"))
    assert os.path.isfile(tensor_path) and os.path.isfile(json_path)
    assert not [name for name in os.listdir(tmp_path / "sub") if name.endswith(".partial")]
    with open(json_path, encoding="utf-8") as handle:
        assert json.load(handle)["format"] == f"prefp-preference-pairs/{FORMAT_VERSION}"
    loaded = load_pairs(tensor_path)
    for name in ("winners", "losers", "condition_index", "thumbnails_winner", "thumbnails_loser", "references"):
        torch.testing.assert_close(getattr(loaded, name), getattr(pairs, name))
    for name, value in pairs.maps.as_dict().items():
        torch.testing.assert_close(getattr(loaded.maps, name), value)
    torch.testing.assert_close(loaded.conditionings[0][0][0], pairs.conditionings[0][0][0])
    torch.testing.assert_close(
        loaded.conditionings[0][0][1]["pooled_output"], pairs.conditionings[0][0][1]["pooled_output"]
    )
    assert loaded.metadata == pairs.metadata and loaded.latent_channels == 4


def test_failed_save_leaves_nothing(tmp_path):
    """The tensor file is written whole before the JSON fails half-way (metadata it cannot
    encode): neither file, nor a temporary, is left."""
    pairs = make_pairs(2)
    pairs.metadata[0] = {**pairs.metadata[0], "not_json": object()}
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_pairs(pairs, str(tmp_path / "bad"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match="json"):
        load_pairs(str(tmp_path / "missing.safetensors"))


def test_a_format_1_file_still_loads():
    """``pairs_format1`` was written by the pack's ``save_pairs`` before format 2 (which dropped
    the winners' quality and complexity maps), with these values."""
    pairs = load_pairs(os.path.join(DATA, "pairs_format1.safetensors"))
    latents = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8) / 100
    grid = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8) / 128
    assert len(pairs) == 2 and pairs.latent_size == (8, 8) and pairs.latent_channels == 4
    torch.testing.assert_close(pairs.winners, latents)
    torch.testing.assert_close(pairs.losers, -latents)
    torch.testing.assert_close(pairs.maps.winner_weights, grid)
    torch.testing.assert_close(pairs.maps.loser_weights, 1 - grid)
    torch.testing.assert_close(pairs.maps.loser_quality, torch.full((2, 8, 8), 0.25))
    torch.testing.assert_close(pairs.maps.loser_complexity, grid * 0.5)
    torch.testing.assert_close(pairs.thumbnails_winner, torch.full((2, 3, 4, 4), 0.8))
    torch.testing.assert_close(pairs.thumbnails_loser, torch.full((2, 3, 4, 4), 0.2))
    torch.testing.assert_close(pairs.references, torch.ones(1, 4, 8, 8))
    assert pairs.condition_index.tolist() == [0, 0]
    ((cond, options),) = pairs.conditionings[0]
    torch.testing.assert_close(cond, torch.linspace(-1, 1, 24).reshape(1, 3, 8))
    torch.testing.assert_close(options["pooled_output"], torch.full((1, 8), 0.5))
    assert pairs.metadata == [
        {"source": "ranked", "difficulty": "easy", "winner_score": 0.9, "loser_score": 0.2},
        {"source": "real", "difficulty": "hard"},
    ]
    assert pairs.difficulty_indices() == {"easy": [0], "normal": [], "hard": [1]}


def copy_with_format(tmp_path, format_name):
    """The format-1 fixture under ``tmp_path`` with its JSON's format set to ``format_name``."""
    shutil.copy(os.path.join(DATA, "pairs_format1.safetensors"), tmp_path / "pairs.safetensors")
    with open(os.path.join(DATA, "pairs_format1.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    (tmp_path / "pairs.json").write_text(json.dumps({**info, "format": format_name}), encoding="utf-8")
    return str(tmp_path / "pairs.safetensors")


def test_newer_and_foreign_formats_are_refused(tmp_path):
    newer = copy_with_format(tmp_path, f"prefp-preference-pairs/{FORMAT_VERSION + 1}")
    with pytest.raises(InputError, match=f"newer version of the pack \\(pair format {FORMAT_VERSION + 1}.*update"):
        load_pairs(newer)
    for foreign in ("prefp-preference-pairs/0", "prefp-preference-pairs", "something-else/1", None):
        with pytest.raises(InputError, match="not a preference-pair file"):
            load_pairs(copy_with_format(tmp_path, foreign))
