"""LoRA files other tools read, with the training run in their header, and LoRA files of other
tools read back (``resume_lora``).

Layouts written (``LORA_LAYOUTS``; which one names which family's layers, and how, is data in
``comfy_glue.families``: ``ModelFamily.lora_layouts``):

- ``kohya``: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, named as
  kohya's sd-scripts and musubi-tuner name them, which A1111, Forge, SD.Next, diffusers and
  ComfyUI read: the diffusers UNet's module names for SD1.x/SD2.x, the model's own for SDXL and
  the DiTs. Convolution LoRAs are 4-D (down ``[r, in, kh, kw]``, up ``[out, r, 1, 1]``).
- ``diffusers``: ``<prefix><diffusers module>.lora_A.weight`` / ``.lora_B.weight`` as diffusers'
  trainers, SimpleTuner and ai-toolkit write them (``transformer.``; ``diffusion_model.`` for
  Z-Image), a fused ``qkv`` split into ``to_q`` / ``to_k`` / ``to_v``. Such files carry no alpha,
  so each layer's scale alpha/rank is folded into ``lora_B`` (the header's alpha is the rank).
- ``comfyui``: the trainer's own keys (``diffusion_model.<module>.lora_up.weight``, ...), as core
  Save LoRA Weights writes them; ComfyUI reads it for any model family.

The kohya and diffusers names are read off ComfyUI's own LoRA key map
(``comfy.lora.model_lora_keys_unet``), which holds ComfyUI's diffusers <-> model tables
(``flux_to_diffusers``, ``mmdit_to_diffusers``, ``z_image_to_diffusers``), so every name written
is one ComfyUI's LoraLoader reads; diffusers is not needed at run time.

Reading goes through ComfyUI's own LoRA loader (``comfy.lora.load_lora`` with the model's key
map), so every layout ComfyUI's LoraLoader reads (kohya, diffusers, ComfyUI) resumes as what
LoraLoader applies; LoRAs on slices of one weight (``to_q`` / ``to_k`` / ``to_v`` of a fused
``qkv``) resume as one LoRA on it; the map also takes the attention names of PEFT-era diffusers
files, which LoraLoader leaves out (see ``lora_key_map``).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
import safetensors.torch
import torch
from comfy.weight_adapter.lora import LoRAAdapter

from ..comfy_glue.families import LoraNaming, model_family
from ..comfy_glue.versions import pack_version, running_comfyui_version
from ..pure.errors import InputError
from ..pure.files import unused_stem, write_atomically

LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")


@dataclass(frozen=True)
class LayoutStyle:
    """How a layout spells a layer's tensors; ``alpha=False``: it writes no ``.alpha`` and folds
    the scale alpha/rank into ``up`` (diffusers and PEFT files carry none)."""

    separator: str  # joins a module name's parts after the prefix
    up: str
    down: str
    alpha: bool = True


LAYOUT_STYLES = {
    "kohya": LayoutStyle("_", ".lora_up.weight", ".lora_down.weight"),
    "diffusers": LayoutStyle(".", ".lora_B.weight", ".lora_A.weight", alpha=False),
    "comfyui": LayoutStyle(".", ".lora_up.weight", ".lora_down.weight"),
}
LORA_LAYOUTS = tuple(LAYOUT_STYLES)


class LoraWithMetadata(dict):
    """A LORA_MODEL (tensors by key, as core nodes pass it) that also carries the training run's
    header entries, for Save DPO LoRA; core nodes see a plain dict."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        super().__init__(tensors)
        self.metadata = dict(metadata)


def base_family(model_patcher) -> str:
    """ComfyUI's name of the model's family (its ``supported_models`` class: SD15, SDXL, Flux...)."""
    return type(model_patcher.model.model_config).__name__


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``"m.lora_up.weight"`` -> ``("m", ".lora_up.weight")``; None for other keys."""
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def diffusers_unet_keys(model_patcher) -> dict[str, str] | None:
    """The diffusers UNet's weight key of each of the model's UNet weights (``input_blocks.1.1.
    proj_in.weight`` -> ``down_blocks.0.attentions.0.proj_in.weight``); None for a model that
    is no SD1.x/SD2.x/SDXL-style UNet (DiTs, video UNets)."""
    unet_config = model_patcher.model.model_config.unet_config
    if "num_res_blocks" not in unet_config or unet_config.get("use_temporal_resblock"):
        return None
    return {ldm: diffusers for diffusers, ldm in comfy.utils.unet_to_diffusers(unet_config).items()}


def layout_names(model_patcher, naming: LoraNaming, separator: str, modules: list[str]) -> dict[str, list]:
    """The file name(s) of each ``diffusion_model.*`` module in ``naming``, read off ComfyUI's LoRA
    key map: module -> ``[(name, None)]``, or ``[(name, (0, start, rows)), ...]`` where the layout
    names row slices of the module's weight (``to_q`` / ``to_k`` / ``to_v`` of a fused ``qkv``).

    Raises:
        InputError: a module the layout has no name for that ComfyUI reads.
    """
    named: dict[str, list] = {}
    for key, target in comfy.lora.model_lora_keys_unet(model_patcher.model, {}).items():
        if not key.startswith(naming.prefix):
            continue
        weight, offset = (target, None) if isinstance(target, str) else target[:2]
        if isinstance(target, str) or len(target) == 2:  # a third entry transforms the weight
            named.setdefault(weight, []).append((key, offset))
    weights = model_patcher.model.state_dict()
    out = {}
    for module in modules:
        own = naming.prefix + module.removeprefix("diffusion_model.").replace(".", separator)
        candidates = named.get(f"{module}.weight", [])
        if naming.diffusers:
            candidates = [entry for entry in candidates if entry[0] != own] or candidates
        else:
            candidates = [entry for entry in candidates if entry[0] == own]
        slices = dict((offset, key) for key, offset in reversed(candidates) if offset is not None)
        rows, covered = weights[f"{module}.weight"].shape[0], 0
        for dim, begin, length in sorted(slices):
            covered = covered + length if dim == 0 and begin == covered else -1
        whole = [key for key, offset in candidates if offset is None]
        if covered == rows:
            out[module] = [(key, offset) for offset, key in sorted(slices.items())]
        elif whole:
            out[module] = [(whole[0], None)]
        else:
            raise InputError(
                f"layer {module} has no name in this layout that ComfyUI reads; save in the comfyui layout"
            )
    return out


def trainer_layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The trainer's LoRA (``<module>.lora_up.weight``, ...) by module: suffix -> tensor."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        split = split_lora_key(key)
        if split is None:
            raise InputError(f"the LoRA holds {key}, which is no LoRA tensor; save in the comfyui layout")
        layers.setdefault(split[0], {})[split[1]] = value
    return layers


def to_layout(tensors: dict[str, torch.Tensor], model_patcher, layout: str) -> dict[str, torch.Tensor]:
    """The trainer's LoRA (``<module>.lora_up.weight``, ...) in ``layout`` for ``model_patcher``.

    Raises:
        InputError: a layout the model's family has no naming for, or a key that is no LoRA tensor.
    """
    naming = model_family(model_patcher.model).lora_naming(layout)
    style = LAYOUT_STYLES[layout]
    layers = trainer_layers(tensors)
    names = layout_names(model_patcher, naming, style.separator, sorted(layers))
    weights = model_patcher.model.state_dict()
    out = {}
    for module, parts in layers.items():
        up, down = parts[".lora_up.weight"], parts[".lora_down.weight"]
        rank, shape = down.shape[0], weights[f"{module}.weight"].shape
        alpha = parts.get(".alpha", torch.tensor(float(rank)))
        scale = 1.0 if style.alpha else float(alpha) / rank
        for name, offset in names[module]:
            rows = up if offset is None else up.reshape(up.shape[0], -1).narrow(0, offset[1], offset[2])
            out[name + style.down] = down.reshape(rank, *shape[1:]).clone()  # one file tensor per slice
            out[name + style.up] = rows.reshape(rows.shape[0], rank, *([1] * (len(shape) - 2))) * scale
            if style.alpha:
                out[name + ".alpha"] = alpha
    return out


def lora_rank_and_alpha(tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
    """The most common rank of the file's layers (a few small ones may have less) and its alpha."""
    ranks = {key: value.shape[0] for key, value in tensors.items() if key.endswith(".lora_down.weight")}
    if not ranks:
        raise InputError("the LoRA holds no lora_down weights")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    key = next(key for key, value in ranks.items() if value == rank)
    alpha = tensors.get(key.removesuffix(".lora_down.weight") + ".alpha")
    return rank, float(alpha) if alpha is not None else float(rank)


def file_metadata(tensors: dict[str, torch.Tensor], model_patcher, layout: str, training: dict[str, str]) -> dict:
    """The header of a saved LoRA: what the tensors and the model say, then ``training``'s entries.
    Keys that sd-scripts also writes use its ``ss_`` names, so A1111/Forge show them."""
    rank, alpha = lora_rank_and_alpha(tensors)
    if not LAYOUT_STYLES[layout].alpha:
        alpha = rank  # folded into lora_B
    family = base_family(model_patcher)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "prefp_base_family": family,
        "prefp_layout": layout,
        "prefp_pack_version": pack_version(),
        "prefp_comfyui_version": running_comfyui_version() or "unknown",
    }
    kohya_version = model_family(model_patcher.model).base_model_version(model_patcher.model.model_config.unet_config)
    if kohya_version is not None:
        metadata["ss_base_model_version"] = kohya_version
    metadata.update(training)
    return metadata


def in_trainer_layout(tensors: dict[str, torch.Tensor], model_patcher) -> dict[str, torch.Tensor]:
    """``tensors`` with the trainer's keys: as they are if they have them, else read as
    resume_lora reads a file (so a kohya or diffusers LoRA from Load LoRA Model saves too).
    Z-Image's diffusers files also start with ``diffusion_model.``; their ``lora_A`` tells them apart."""
    if all(key.startswith("diffusion_model.") for key in tensors) and any(
        key.endswith(".lora_up.weight") for key in tensors
    ):
        return tensors
    out = {}
    for module, (up, down, alpha) in read_lora_layers(tensors, model_patcher).items():
        out[f"{module}.lora_up.weight"], out[f"{module}.lora_down.weight"] = up, down
        out[f"{module}.alpha"] = torch.tensor(alpha)
    return out


def save_lora(tensors: dict[str, torch.Tensor], path: str, model_patcher, layout: str = "kohya") -> str:
    """Write ``tensors`` (any layout ``read_lora_layers`` reads; a ``LoraWithMetadata`` adds its
    run to the header) to ``path`` in ``layout``, atomically; returns ``path``."""
    if layout not in LORA_LAYOUTS:
        raise InputError(f"unknown LoRA layout {layout!r}; one of {', '.join(LORA_LAYOUTS)}")
    training = getattr(tensors, "metadata", {})
    tensors = in_trainer_layout(tensors, model_patcher)
    metadata = file_metadata(tensors, model_patcher, layout, training)
    out = tensors if layout == "comfyui" else to_layout(tensors, model_patcher, layout)
    out = {key: value.detach().to("cpu").contiguous() for key, value in out.items()}
    write_atomically(path, lambda temporary: safetensors.torch.save_file(out, temporary, metadata=metadata))
    logging.info("Saved the LoRA in the %s layout (%s model): %s", layout, base_family(model_patcher), path)
    return path


def lora_key_map(model_patcher) -> dict[str, str]:
    """LoRA key name -> the weight it patches: ComfyUI's LoraLoader map, plus the diffusers UNet's
    plain module names under ``unet.``. PEFT-era diffusers files name attention layers that way
    (``attn1.to_out.0``); ComfyUI's map has only the older ``attn1.processor.to_out`` spelling."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    for ldm_key, diffusers_key in (diffusers_unet_keys(model_patcher) or {}).items():
        if diffusers_key.endswith(".weight"):
            key_map.setdefault(f"unet.{diffusers_key.removesuffix('.weight')}", f"diffusion_model.{ldm_key}")
    return key_map


def joined_slices(entries: list, rows: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA ``(up [rows, r], down [r, in], alpha)`` on a weight of ``rows`` rows from LoRAs on
    row slices of it (``[(offset (0, start, length) or None for all rows, (up, down, alpha))]``,
    e.g. ``to_q`` / ``to_k`` / ``to_v`` of a fused ``qkv``), with the same product: the slices'
    up rows stacked where they share one down and alpha (a split LoRA, as the diffusers layout
    writes it), else a block LoRA of their summed rank with each scale folded into its up."""
    spans = [(0, rows) if offset is None else (offset[1], offset[2]) for offset, _ in entries]
    first = entries[0][1]
    if all(torch.equal(down, first[1]) and alpha == first[2] for _, (_, down, alpha) in entries):
        up = torch.zeros(rows, first[1].shape[0], dtype=first[0].dtype)
        for (start, length), (_, (part, _, _)) in zip(spans, entries, strict=True):
            up[start : start + length] += part
        return up, first[1], first[2]
    ranks = [down.shape[0] for _, (_, down, _) in entries]
    up = torch.zeros(rows, sum(ranks), dtype=first[0].dtype)
    column = 0
    for (start, length), rank, (_, (part, _, alpha)) in zip(spans, ranks, entries, strict=True):
        up[start : start + length, column : column + rank] = part * (alpha / rank)
        column += rank
    down = torch.cat([down for _, (_, down, _) in entries])
    return up, down, float(sum(ranks))


def read_lora_layers(tensors: dict[str, torch.Tensor], model_patcher) -> dict[str, tuple[torch.Tensor, ...]]:
    """A LoRA file's layers for this model, in any layout ComfyUI's LoraLoader reads: module name
    -> ``(up [out, r], down [r, in], alpha)`` (alpha = r where the file has none, as ComfyUI
    applies it). Keys it leaves out (e.g. text-encoder layers) are logged.

    Raises:
        InputError: no key names a layer of this model (unknown layout or another family), or
            a layer holds another adapter than a plain LoRA (LoHa, LoKr, DoRA, a Tucker mid).
    """
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(tensors), lora_key_map(model_patcher), False)
    parts, used = {}, set()
    for target, patch in patches.items():
        weight_key, offset = (target, None) if isinstance(target, str) else target[:2]
        if not isinstance(patch, LoRAAdapter):
            kind = getattr(patch, "name", None) or patch[0]
            raise InputError(
                f"the LoRA holds a {kind} patch at {weight_key}; resume_lora continues plain LoRAs (lora_up/lora_down)"
            )
        up, down, alpha, mid, dora_scale, _ = patch.weights
        if mid is not None or dora_scale is not None:
            raise InputError(
                f"the LoRA's layer {weight_key} is a {'Tucker (lora_mid)' if mid is not None else 'DoRA'} LoRA; "
                "resume_lora continues plain LoRAs (lora_up/lora_down)"
            )
        rank = down.shape[0]
        layer = (
            up.reshape(up.shape[0], rank),
            down.reshape(rank, -1),
            float(alpha) if alpha is not None else float(rank),
        )
        parts.setdefault(weight_key, []).append((offset, layer))
        used.update(patch.loaded_keys)
    weights = model_patcher.model.state_dict()
    layers = {
        key.removesuffix(".weight"): entries[0][1]
        if entries[0][0] is None and len(entries) == 1
        else joined_slices(entries, weights[key].shape[0])
        for key, entries in parts.items()
    }
    if not layers:
        sample = ", ".join(sorted(tensors)[:3])
        raise InputError(
            f"no key of the LoRA names a layer of this {base_family(model_patcher)} model (its keys look like "
            f"{sample}): it is of an unknown layout or made for another model family. resume_lora reads the "
            "kohya, diffusers and ComfyUI layouts"
        )
    left = [key for key in tensors if key not in used and not key.endswith((".alpha", ".dora_scale"))]
    if left:
        text_encoder = sum(1 for key in left if re.match(r"(lora_te\d?_|text_encoder)", key))
        logging.warning(
            "resume_lora: %d keys left out (%d of the text encoder, which this trainer does not train): %s",
            len(left),
            text_encoder,
            ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""),
        )
    return layers


def save_lora_to_output(tensors: dict[str, torch.Tensor], stem: str, model_patcher, layout: str = "kohya") -> str:
    """``save_lora`` to output/loras/<stem>.safetensors (``<stem>_2`` ... if taken); returns the path."""
    folder = os.path.join(folder_paths.get_output_directory(), "loras")
    return save_lora(tensors, os.path.join(folder, f"{unused_stem(folder, stem)}.safetensors"), model_patcher, layout)
