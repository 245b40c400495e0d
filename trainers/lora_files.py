"""LoRA files other tools read, with the training run in their header, and LoRA files of other
tools read back (``resume_lora``).

Layouts written (``LORA_LAYOUTS``):

- ``kohya``: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, named as
  kohya's sd-scripts names them, which A1111, Forge, SD.Next, diffusers and ComfyUI read: the
  diffusers UNet's module names for SD1.x/SD2.x, the sgm UNet's for SDXL (sd-scripts trains
  SDXL on that one). Convolution LoRAs are 4-D (down ``[r, in, kh, kw]``, up ``[out, r, 1, 1]``).
- ``comfyui``: the trainer's own keys (``diffusion_model.<module>.lora_up.weight``, ...), as core
  Save LoRA Weights writes them; ComfyUI reads it for any model family.

Reading goes through ComfyUI's own LoRA loader (``comfy.lora.load_lora`` with the model's key
map), so every layout ComfyUI's LoraLoader reads (kohya, diffusers, ComfyUI) resumes as what
LoraLoader applies; the map also takes the attention names of PEFT-era diffusers files, which
LoraLoader leaves out (see ``lora_key_map``).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
import safetensors.torch
import torch
from comfy.weight_adapter.lora import LoRAAdapter

from ..comfy_glue.families import model_family
from ..comfy_glue.versions import pack_version, running_comfyui_version
from ..pure.errors import InputError
from ..pure.files import unused_stem, write_atomically

LORA_LAYOUTS = ("kohya", "comfyui")
LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")


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


def kohya_module_names(model_patcher, modules: list[str]) -> dict[str, str]:
    """The kohya name (``lora_unet_...``) of each ``diffusion_model.*`` module of the model, as
    its family names them (``ModelFamily.kohya_names``): diffusers UNet names for SD1.x/SD2.x, the
    model's own names for SDXL and the DiTs (sd-scripts' Flux and SD3 LoRAs name BFL's and SAI's
    modules).

    Raises:
        InputError: a family without a kohya naming.
    """
    family = model_family(model_patcher.model)
    sgm = family.kohya_names == "model"
    diffusers_of = None if sgm else diffusers_unet_keys(model_patcher)
    if family.kohya_version is None or (not sgm and diffusers_of is None):
        raise InputError(
            f"the kohya layout has no naming for {family.name} models: save in the comfyui layout, "
            "which ComfyUI's LoRA loaders read for every model"
        )
    names = {}
    for module in modules:
        inner = module.removeprefix("diffusion_model.")
        name = inner if sgm else diffusers_of.get(f"{inner}.weight", "").removesuffix(".weight")
        if not name:
            raise InputError(f"layer {module} has no kohya name; save in the comfyui layout")
        names[module] = "lora_unet_" + name.replace(".", "_")
    return names


def to_kohya(tensors: dict[str, torch.Tensor], model_patcher) -> dict[str, torch.Tensor]:
    """The trainer's LoRA (``<module>.lora_up.weight``, ...) in kohya layout for ``model_patcher``."""
    modules = sorted({split[0] for split in map(split_lora_key, tensors) if split is not None})
    names = kohya_module_names(model_patcher, modules)
    weights = model_patcher.model.state_dict()
    out = {}
    for key, value in tensors.items():
        split = split_lora_key(key)
        if split is None:
            raise InputError(f"the LoRA holds {key}, which is no LoRA tensor; save in the comfyui layout")
        module, suffix = split
        shape = weights[f"{module}.weight"].shape
        if suffix == ".lora_down.weight":
            value = value.reshape(value.shape[0], *shape[1:])
        elif suffix == ".lora_up.weight":
            value = value.reshape(shape[0], -1, *([1] * (len(shape) - 2)))
        out[names[module] + suffix] = value
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
    kohya_version = model_family(model_patcher.model).kohya_version
    if kohya_version is not None:
        metadata["ss_base_model_version"] = kohya_version
    metadata.update(training)
    return metadata


def in_trainer_layout(tensors: dict[str, torch.Tensor], model_patcher) -> dict[str, torch.Tensor]:
    """``tensors`` with the trainer's keys: as they are if they have them, else read as
    resume_lora reads a file (so a kohya or diffusers LoRA from Load LoRA Model saves too)."""
    if all(key.startswith("diffusion_model.") for key in tensors):
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
    out = to_kohya(tensors, model_patcher) if layout == "kohya" else tensors
    out = {key: value.detach().to("cpu").contiguous() for key, value in out.items()}
    return write_atomically(path, lambda temporary: safetensors.torch.save_file(out, temporary, metadata=metadata))


def lora_key_map(model_patcher) -> dict[str, str]:
    """LoRA key name -> the weight it patches: ComfyUI's LoraLoader map, plus the diffusers UNet's
    plain module names under ``unet.``. PEFT-era diffusers files name attention layers that way
    (``attn1.to_out.0``); ComfyUI's map has only the older ``attn1.processor.to_out`` spelling."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    for ldm_key, diffusers_key in (diffusers_unet_keys(model_patcher) or {}).items():
        if diffusers_key.endswith(".weight"):
            key_map.setdefault(f"unet.{diffusers_key.removesuffix('.weight')}", f"diffusion_model.{ldm_key}")
    return key_map


def read_lora_layers(tensors: dict[str, torch.Tensor], model_patcher) -> dict[str, tuple[torch.Tensor, ...]]:
    """A LoRA file's layers for this model, in any layout ComfyUI's LoraLoader reads: module name
    -> ``(up [out, r], down [r, in], alpha)`` (alpha = r where the file has none, as ComfyUI
    applies it). Keys it leaves out (e.g. text-encoder layers) are logged.

    Raises:
        InputError: no key names a layer of this model (unknown layout or another family), or
            a layer holds another adapter than a plain LoRA (LoHa, LoKr, DoRA, a Tucker mid).
    """
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(tensors), lora_key_map(model_patcher), False)
    layers, used = {}, set()
    for weight_key, patch in patches.items():
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
        layers[weight_key.removesuffix(".weight")] = (
            up.reshape(up.shape[0], rank),
            down.reshape(rank, -1),
            float(alpha) if alpha is not None else float(rank),
        )
        used.update(patch.loaded_keys)
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
