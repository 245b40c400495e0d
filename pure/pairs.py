"""Preference pairs: what the DPO trainer learns from, and how they are built, merged and stored.

A ``PreferencePairs`` set holds N pairs of same-size latents (unscaled, as the VAE returns
them), each pair's conditioning, per-pair maps on the latent grid (``PairMaps``), optional
reference latents and metadata. The nodes build them from images (they own the VAE).

Weight rules and the file format: docs/algorithms.md, section 'Preference pairs and their maps'.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from .drawing import labelled_strip, overlay_heat
from .errors import InputError
from .files import write_all_atomically

# Height of the thumbnails a pair set keeps for its preview.
THUMBNAIL_HEIGHT = 128
DIFFICULTIES = ("easy", "normal", "hard")
# A pair file's JSON names its format as "<FORMAT_NAME>/<version>". Version 1 also stored
# winner_quality and winner_complexity maps, which nothing read: they are ignored on loading.
# Raise the version whenever the stored layout changes, so an older pack refuses the file
# rather than misreading it.
FORMAT_NAME = "prefp-preference-pairs"
FORMAT_VERSION = 2
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"


@dataclass
class PairMaps:
    """Per-pair maps on the latent grid, each ``[N, h, w]`` in [0, 1].

    Attributes:
        winner_weights, loser_weights: loss weights (1 where unknown).
        loser_quality: the loser's patch quality (1 where unknown), read by ``patchdpo_paper``
            and ``focus_dpo``.
        loser_complexity: the loser's local entropy, ``focus_dpo``'s other input.
    """

    winner_weights: torch.Tensor
    loser_weights: torch.Tensor
    loser_quality: torch.Tensor
    loser_complexity: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The maps by field name (``dataclasses.asdict`` would deep-copy the tensors)."""
        return {item.name: getattr(self, item.name) for item in fields(self)}

    def apply(self, function: Callable[[torch.Tensor], torch.Tensor]) -> PairMaps:
        """``function`` of every map, e.g. ``lambda m: m[indices]`` or a move to a device."""
        return PairMaps(**{name: function(value) for name, value in self.as_dict().items()})

    def joined(self, other: PairMaps) -> PairMaps:
        """These pairs' maps, then ``other``'s."""
        return PairMaps(**{name: torch.cat([value, getattr(other, name)]) for name, value in self.as_dict().items()})


@dataclass
class PreferencePairs:
    """N preference pairs.

    Attributes:
        winners, losers: ``[N, C, h, w]`` latents as the VAE returns them (unscaled; one
            frame, a video-style VAE's frame axis dropped: ``single_frame``).
        conditionings: the distinct ComfyUI CONDITIONING lists used by the pairs.
        condition_index: ``[N]`` index into ``conditionings`` for each pair.
        maps: the per-pair weight, quality and complexity maps ``[N, h, w]``.
        thumbnails_winner, thumbnails_loser: ``[N, 3, th, tw]`` small RGB previews in 0..1.
        metadata: per pair: ``source``, ``difficulty`` (easy/normal/hard), scores, sizes.
        latent_channels: channel count of the VAE that made the latents (family check).
        references: optional ``[R, C, h, w]`` reference latents (joint-set training).
    """

    winners: torch.Tensor
    losers: torch.Tensor
    conditionings: list
    condition_index: torch.Tensor
    maps: PairMaps
    thumbnails_winner: torch.Tensor
    thumbnails_loser: torch.Tensor
    metadata: list[dict]
    latent_channels: int
    references: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.winners.shape[0]

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.winners.shape[-2:])

    def validate(self) -> None:
        """Raise ``InputError`` naming what is inconsistent."""
        n = len(self)
        if n == 0:
            raise InputError("the pair set is empty")
        if self.winners.ndim != 4:
            raise InputError(
                f"winner latents {tuple(self.winners.shape)} are not image latents [N, C, h, w]; "
                "build the pairs with the pair nodes (they store one frame per image)"
            )
        if self.losers.shape != self.winners.shape:
            raise InputError(
                f"winner latents {tuple(self.winners.shape)} and loser latents "
                f"{tuple(self.losers.shape)} differ in size"
            )
        for name, value in self.maps.as_dict().items():
            if tuple(value.shape) != (n, *self.latent_size):
                raise InputError(f"{name} has shape {tuple(value.shape)}, expected {(n, *self.latent_size)}")
        if not (torch.isfinite(self.winners).all() and torch.isfinite(self.losers).all()):
            raise InputError("the latents contain NaN or infinite values")
        if self.references is not None:
            if self.references.ndim != 4 or tuple(self.references.shape[1:]) != tuple(self.winners.shape[1:]):
                raise InputError(
                    f"reference latents {tuple(self.references.shape)} do not match the pairs' "
                    f"{tuple(self.winners.shape[1:])}; encode the references at the pairs' image size"
                )
            if not torch.isfinite(self.references).all():
                raise InputError("the reference latents contain NaN or infinite values")
        if len(self.metadata) != n or any(getattr(self, name).shape[0] != n for name in _TENSOR_FIELDS):
            raise InputError("metadata, conditioning or thumbnail count does not match the number of pairs")

    def difficulty_indices(self) -> dict[str, list[int]]:
        groups = {name: [] for name in DIFFICULTIES}
        for index, meta in enumerate(self.metadata):
            groups.setdefault(meta.get("difficulty", "normal"), []).append(index)
        return groups


def single_frame(latents: torch.Tensor) -> torch.Tensor:
    """A VAE's latents of images as ``[B, C, h, w]``: a frame axis of length 1 (``[B, C, 1, h, w]``,
    what a video-style VAE such as Qwen-Image's Wan 2.1 returns for one image) is dropped.

    Raises:
        InputError: latents of several frames (a video VAE that made a clip of an image).
    """
    if latents.ndim == 4:
        return latents
    if latents.ndim == 5 and latents.shape[2] == 1:
        return latents.squeeze(2)
    if latents.ndim == 5:
        raise InputError(
            f"the VAE made latents of {latents.shape[2]} frames {tuple(latents.shape)} from one image; "
            "preference pairs are single images: connect the VAE of the image model you train"
        )
    raise InputError(f"the VAE made latents of shape {tuple(latents.shape)}; the pack needs image latents")


def merge_pairs(first: PreferencePairs, second: PreferencePairs) -> PreferencePairs:
    """Concatenate two pair sets of the same latent size and VAE family."""
    if first.latent_size != second.latent_size or first.winners.shape[1] != second.winners.shape[1]:
        raise InputError(
            f"pair sets have different latent sizes ({tuple(first.winners.shape[1:])} vs "
            f"{tuple(second.winners.shape[1:])}); build them at one image size, or train separately"
        )
    if first.latent_channels != second.latent_channels:
        raise InputError("pair sets were built with VAEs of different families")
    thumb_size = first.thumbnails_winner.shape[-2:]

    def thumbs(tensor):
        return tensor if tensor.shape[-2:] == thumb_size else F.interpolate(tensor, size=thumb_size, mode="area")

    references = first.references
    if second.references is not None:
        references = second.references if references is None else torch.cat([references, second.references])
    cat = torch.cat
    return PreferencePairs(
        winners=cat([first.winners, second.winners]),
        losers=cat([first.losers, second.losers]),
        conditionings=first.conditionings + second.conditionings,
        condition_index=cat([first.condition_index, second.condition_index + len(first.conditionings)]),
        maps=first.maps.joined(second.maps),
        thumbnails_winner=cat([first.thumbnails_winner, thumbs(second.thumbnails_winner)]),
        thumbnails_loser=cat([first.thumbnails_loser, thumbs(second.thumbnails_loser)]),
        metadata=first.metadata + second.metadata,
        latent_channels=first.latent_channels,
        references=references,
    )


def rank_pairs(scores: list[float], pairing: str = "best_vs_worst", margin: float = 0.0) -> list[tuple[int, int, str]]:
    """Choose (winner, loser, difficulty) index pairs from candidate scores.

    Args:
        scores: one score per candidate (higher is better).
        pairing: ``best_vs_worst`` (one pair, "easy") or ``all_above_margin`` (every pair whose
            score gap exceeds ``margin``; the best-vs-worst pair is "easy", the rest "normal").
        margin: minimum score gap for a pair.

    Raises:
        InputError: fewer than two candidates, or no gap above the margin.
    """
    if len(scores) < 2:
        raise InputError(f"need at least 2 candidates to rank, got {len(scores)}")
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    best, worst = order[0], order[-1]
    if pairing == "best_vs_worst":
        candidates = [(best, worst)]
    elif pairing == "all_above_margin":
        candidates = [(w, loser) for a, w in enumerate(order) for loser in order[a + 1 :]]
    else:
        raise InputError(f"unknown pairing '{pairing}'")
    pairs = [
        (w, loser, "easy" if (w, loser) == (best, worst) else "normal")
        for w, loser in candidates
        if scores[w] - scores[loser] > margin
    ]
    if not pairs:
        raise InputError(
            f"no two candidates differ by more than the margin {margin:.3f} "
            f"(scores {min(scores):.3f}..{max(scores):.3f}); lower the margin or add candidates"
        )
    return pairs


# --- storage: safetensors for tensors, JSON for the rest -------------------------------------------

# The pair set's tensor fields (winners, losers, condition_index, thumbnails), read off the
# annotations so the field list is written once. Files store them and the maps under their field
# names; references, which may be None, are stored when present.
_TENSOR_FIELDS = tuple(name for name, hint in typing.get_type_hints(PreferencePairs).items() if hint is torch.Tensor)


def save_pairs(pairs: PreferencePairs, path_stem: str) -> tuple[str, str]:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically (temporary files, then
    renames; nothing half-written is left on failure). Conditioning keeps each entry's tensor
    and ``pooled_output``; other conditioning keys are not stored (listed in the JSON)."""
    pairs.validate()
    stored = {**{name: getattr(pairs, name) for name in _TENSOR_FIELDS}, **pairs.maps.as_dict()}
    # clone(): safetensors refuses tensors that share memory, as the maps of a pair set may.
    tensors = {name: value.clone(memory_format=torch.contiguous_format) for name, value in stored.items()}
    if pairs.references is not None:
        tensors["references"] = pairs.references.contiguous()
    dropped = set()
    conditioning_layout = []
    for c_index, conditioning in enumerate(pairs.conditionings):
        entries = []
        for e_index, (cond, options) in enumerate(conditioning):
            tensors[f"cond.{c_index}.{e_index}"] = cond.contiguous()
            has_pooled = options.get("pooled_output") is not None
            if has_pooled:
                tensors[f"pooled.{c_index}.{e_index}"] = options["pooled_output"].contiguous()
            dropped |= {key for key in options if key != "pooled_output"}
            entries.append({"pooled": has_pooled})
        conditioning_layout.append(entries)
    info = {
        "format": FORMAT,
        "pairs": len(pairs),
        "latent_channels": pairs.latent_channels,
        "latent_size": list(pairs.latent_size),
        "conditionings": conditioning_layout,
        "dropped_conditioning_keys": sorted(dropped),
        "metadata": pairs.metadata,
    }
    tensor_path, json_path = f"{path_stem}.safetensors", f"{path_stem}.json"

    def write_json(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=1)

    write_all_atomically(
        {
            tensor_path: lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata={"format": FORMAT}),
            json_path: write_json,
        }
    )
    return tensor_path, json_path


def load_pairs(tensor_path: str) -> PreferencePairs:
    """Read a pair set written by ``save_pairs`` (the ``.json`` beside the ``.safetensors``).

    Raises:
        InputError: "cannot read '<file>': ..." for a missing, damaged or foreign file.
    """
    try:
        return _read_pairs(tensor_path)
    except (InputError, OSError, json.JSONDecodeError, SafetensorError, KeyError) as error:
        raise InputError(f"cannot read '{os.path.basename(tensor_path)}': {error}") from error


def _read_pairs(tensor_path: str) -> PreferencePairs:
    json_path = tensor_path[: -len(".safetensors")] + ".json"
    if not os.path.isfile(json_path):
        raise InputError(f"{json_path} is missing; it is written next to the .safetensors by Save Preference Pairs")
    with open(json_path, encoding="utf-8") as handle:
        info = json.load(handle)
    _check_format(json_path, info.get("format"))
    tensors = safetensors.torch.load_file(tensor_path)
    conditionings = []
    for c_index, entries in enumerate(info["conditionings"]):
        conditioning = []
        for e_index, entry in enumerate(entries):
            options = {"pooled_output": tensors[f"pooled.{c_index}.{e_index}"]} if entry["pooled"] else {}
            conditioning.append([tensors[f"cond.{c_index}.{e_index}"], options])
        conditionings.append(conditioning)
    pairs = PreferencePairs(
        conditionings=conditionings,
        metadata=info["metadata"],
        latent_channels=int(info["latent_channels"]),
        references=tensors.get("references"),
        maps=PairMaps(**{item.name: tensors[item.name] for item in fields(PairMaps)}),
        **{name: tensors[name] for name in _TENSOR_FIELDS},
    )
    pairs.validate()
    return pairs


def _check_format(json_path: str, name) -> None:
    """Accept every format version up to ``FORMAT_VERSION``; refuse newer ones and foreign files."""
    prefix, _, version = str(name).partition("/")
    if prefix != FORMAT_NAME or not version.isdigit() or int(version) < 1:
        raise InputError(f"{json_path} is not a preference-pair file (format {name!r})")
    if int(version) > FORMAT_VERSION:
        raise InputError(
            f"{os.path.basename(json_path)} was saved by a newer version of the pack (pair format "
            f"{version}; this version reads up to {FORMAT_VERSION}); update ComfyUI-PrefPersonalize to load it"
        )


# --- looking at pairs ------------------------------------------------------------------------


def thumbnails(images_rgb: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3, THUMBNAIL_HEIGHT, w]`` (aspect kept), on the CPU."""
    height, width = images_rgb.shape[-2:]
    size = (THUMBNAIL_HEIGHT, max(1, round(width * THUMBNAIL_HEIGHT / height)))
    return F.interpolate(images_rgb, size=size, mode="area").cpu()


def preview_grid(pairs: PreferencePairs, max_pairs: int) -> torch.Tensor:
    """Rows of winner | loser | winner weights | loser weights, labelled; ``[1, H, W, 3]``."""
    rows = []
    for index in range(min(max_pairs, len(pairs))):
        winner, loser = (
            pairs.thumbnails_winner[index : index + 1].float(),
            pairs.thumbnails_loser[index : index + 1].float(),
        )
        size = tuple(winner.shape[-2:])

        def heat(weights, index=index, size=size):
            upsampled = F.interpolate(
                weights[index : index + 1].unsqueeze(1).float(), size=size, mode="nearest"
            ).squeeze(1)
            return overlay_heat(torch.full((1, 3, *size), 0.5), upsampled, 0.85)[0]

        meta = pairs.metadata[index]
        score = f" {meta['winner_score']:.2f} vs {meta['loser_score']:.2f}" if "winner_score" in meta else ""
        labels = [f"#{index + 1} winner ({meta.get('source', '?')}){score}", "loser", "winner weights", "loser weights"]
        frames = torch.stack(
            [
                winner[0],
                F.interpolate(loser, size=size, mode="area")[0],
                heat(pairs.maps.winner_weights),
                heat(pairs.maps.loser_weights),
            ]
        )
        rows.append(labelled_strip(frames, labels))
    width = max(row.shape[-1] for row in rows)
    rows = [F.pad(row, (0, width - row.shape[-1], 0, 4)) for row in rows]
    return torch.cat(rows, dim=1).movedim(0, -1).unsqueeze(0)
