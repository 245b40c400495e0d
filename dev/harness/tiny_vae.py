"""A random-weight 16-channel KL VAE that ComfyUI's stock ``VAELoader`` (``comfy.sd.VAE(sd=...)``)
detects as the Flux / SD3.5 VAE: the LDM ``AutoencoderKL`` layout Flux's ``ae.safetensors`` has
(``encoder.*`` and ``decoder.*``, no ``quant_conv``), with 16 latent channels.

No model hub is reachable, so tests make the file themselves at a fixed seed, as
``tiny_checkpoint`` does, and with its init (fan-in normal, norms at 1, biases 0).

ComfyUI fixes this VAE's config (``ch`` 128, ``ch_mult`` [1, 2, 4, 4], two res blocks a level, a
mid attention block), so it is full size: 83.8 M parameters, fp16 on disk (168 MB). What the
loader reads off the weights:

- ``decoder.conv_in.weight`` (``[512, z_channels, 3, 3]``, 512 = ``ch`` x ``ch_mult[-1]``): its
  presence picks the KL VAE branch, its input channels (16) ``z_channels`` and ``latent_channels``
  (newer ComfyUI also reads the decoder's ``ch`` as its output channels / 4);
- ``encoder.down.2.downsample.conv.weight``: present, so four levels (8x down), not the x4
  upscaler's three;
- no ``post_quant_conv.weight``, so an ``AutoencodingEngine`` (Encoder, Decoder and a Gaussian
  regularizer) as for Flux and SD3, not the SD1.x ``AutoencoderKL`` with its quant convs.

The key set is what ``comfy.sd.VAE`` builds from a skeleton of just those keys, on the meta
device, so it is exactly what the loader of the ComfyUI at hand expects. Tensors are drawn in
sorted key order, so a seed gives the same file whichever ComfyUI builds it.

Use it with ``VAELoader``: link the file into ``models/vae/`` (or add its folder to
``folder_paths``' ``vae``) under the name the workflow asks for, e.g. ``ae.safetensors`` (Flux).

``VAES["flux2_vae"]`` is Flux.2's VAE the same way (32 channels, quant convs, and a batch norm over
the 2 x 2-folded latent: ``VAELoader`` gives 128-channel latents at /16).

Run as a module (``python -m harness.tiny_vae COMFYUI_PATH OUT KIND SEED``, ``dev/`` on
``PYTHONPATH``) so ComfyUI's modules load in a process of their own; ``ensure_kl_vae16`` does that.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from .tiny_checkpoint import _init_like, _state_dict_shapes

# Bump when the recipe changes so cached files are rebuilt.
VAE_RECIPE_VERSION = 1

DOWNSCALE = 8
DISK_DTYPE = torch.float16
FLUX_VAE_NAME = "ae.safetensors"  # the name ComfyUI's Flux examples give VAELoader
FLUX2_VAE_NAME = "flux2-vae.safetensors"  # ... and its Flux.2 examples


@dataclass(frozen=True)
class VaeRecipe:
    """The keys (and shapes) ``comfy.sd.VAE`` looks at to pick a VAE, and what it must build."""

    skeleton: dict[str, tuple[int, ...]]
    model_class: str
    latent_channels: int
    # The file's names for keys ComfyUI renames on load (its names -> the real file's).
    file_names: tuple[tuple[str, str], ...] = ()


VAES = {
    # Flux.1 / SD3.5 (``ae.safetensors``); see the module docstring.
    "kl_vae16": VaeRecipe(
        {"decoder.conv_in.weight": (512, 16, 3, 3), "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3)},
        "AutoencodingEngine",
        16,
    ),
    # Flux.2 (``flux2-vae.safetensors``): 32 channels, quant convs, and a batch norm over the
    # 2 x 2-folded latent (``bn.*``), so 128 channels at /16.
    "flux2_vae": VaeRecipe(
        {
            "decoder.conv_in.weight": (512, 32, 3, 3),
            "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
            "encoder.quant_conv.weight": (64, 64, 1, 1),
            "decoder.post_quant_conv.weight": (32, 32, 1, 1),
            "bn.running_mean": (128,),
        },
        "AutoencoderKL",
        128,
        (("quant_conv.", "encoder.quant_conv."), ("post_quant_conv.", "decoder.post_quant_conv.")),
    ),
}


def _comfy_cpu() -> None:
    """Keep ComfyUI off any GPU probing: this process only builds tensors."""
    from comfy.cli_args import args

    args.cpu = True


def _vae_shapes(kind: str) -> dict[str, torch.Size]:
    """The weight shapes of the VAE ``comfy.sd.VAE`` builds from ``VAES[kind]``'s skeleton, keyed
    as its file is (built on the meta device: no memory, no init)."""
    _comfy_cpu()
    import comfy.sd

    recipe = VAES[kind]
    skeleton = {name: torch.empty(shape, device="meta") for name, shape in recipe.skeleton.items()}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "Missing VAE keys": the skeleton lacks all but a few
    try:
        with torch.device("meta"):
            vae = comfy.sd.VAE(sd=skeleton)
    finally:
        logging.disable(previous)
    model = vae.first_stage_model
    if model is None or type(model).__name__ != recipe.model_class or vae.latent_channels != recipe.latent_channels:
        found = None if model is None else type(model).__name__
        raise RuntimeError(f"ComfyUI builds {found} ({vae.latent_channels} channels) from {sorted(recipe.skeleton)}")
    shapes = {}
    for name, shape in _state_dict_shapes(model).items():
        for comfy_name, file_name in recipe.file_names:
            if name.startswith(comfy_name):
                name = file_name + name[len(comfy_name) :]
        shapes[name] = shape
    return shapes


def _vae_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("running_mean"):
        return torch.zeros(shape, dtype=DISK_DTYPE)  # the latent batch norm's statistics: identity
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    return _init_like(name, shape, generator).to(DISK_DTYPE)


def build_vae_state_dict(kind: str = "kl_vae16", seed: int = 0) -> dict[str, torch.Tensor]:
    """The VAE file's state dict (``encoder.*``, ``decoder.*``), ``DISK_DTYPE``, sorted key order."""
    generator = torch.Generator().manual_seed(seed)
    return {name: _vae_tensor(name, shape, generator) for name, shape in sorted(_vae_shapes(kind).items())}


def write_vae(path: str, kind: str = "kl_vae16", seed: int = 0) -> str:
    """Write the ``kind`` VAE file atomically to ``path`` (a ``.safetensors`` file) and return it."""

    from .tiny_dit import save_atomically

    save_atomically(build_vae_state_dict(kind, seed), path, {"recipe": str(VAE_RECIPE_VERSION), "seed": str(seed)})
    return path


def vae_path(cache_dir: str, kind: str = "kl_vae16", seed: int = 0) -> str:
    """Where ``ensure_vae`` keeps this recipe's ``kind`` file of ``seed``."""
    return os.path.join(cache_dir, f"random_{kind}_r{VAE_RECIPE_VERSION}_s{seed}.safetensors")


def ensure_vae(comfyui_path: str, cache_dir: str, kind: str = "kl_vae16", seed: int = 0) -> str:
    """Return a cached random ``kind`` VAE file (``VAES``; fp16, 168 MB) for this recipe and seed,
    building it on first use in a subprocess that imports ComfyUI from ``comfyui_path`` (a few
    seconds)."""
    path = vae_path(cache_dir, kind, seed)
    if not os.path.exists(path):
        dev = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [dev, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "harness.tiny_vae", os.path.abspath(comfyui_path), path, kind, str(seed)]
        subprocess.run(command, check=True, cwd=comfyui_path, env=env)
    return path


def ensure_kl_vae16(comfyui_path: str, cache_dir: str, seed: int = 0) -> str:
    """``ensure_vae`` for the 16-channel Flux.1 / SD3.5 VAE."""
    return ensure_vae(comfyui_path, cache_dir, "kl_vae16", seed)


def ensure_dit_checkpoint(comfyui_path: str, cache_dir: str, kind: str, seed: int = 0) -> str:
    """A checkpoint as Stability ships SD3.5 (``sd3.5_large.safetensors``): the tiny ``kind`` DiT
    (``harness.tiny_dit``) under ``model.diffusion_model.`` and this VAE under
    ``first_stage_model.``, no text encoders (they come from their own files). Cached."""
    import safetensors.torch

    from .tiny_dit import ensure_dit, save_atomically

    dit, vae = ensure_dit(comfyui_path, cache_dir, kind, seed), ensure_kl_vae16(comfyui_path, cache_dir, seed)
    path = os.path.join(
        cache_dir, f"{os.path.basename(dit)[: -len('.safetensors')]}_with_vae{VAE_RECIPE_VERSION}.safetensors"
    )
    if not os.path.exists(path):
        state = {f"model.diffusion_model.{k}": v for k, v in safetensors.torch.load_file(dit).items()}
        state.update({f"first_stage_model.{k}": v for k, v in safetensors.torch.load_file(vae).items()})
        save_atomically(state, path, {"recipe": str(VAE_RECIPE_VERSION)})
    return path


def main(argv: list[str]) -> None:
    comfyui_path, out, kind, seed = argv
    sys.path.insert(0, os.path.abspath(comfyui_path))
    write_vae(out, kind, int(seed))


if __name__ == "__main__":
    main(sys.argv[1:])
