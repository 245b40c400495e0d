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

Run as a module (``python -m harness.tiny_vae COMFYUI_PATH OUT SEED``, ``dev/`` on
``PYTHONPATH``) so ComfyUI's modules load in a process of their own; ``ensure_kl_vae16`` does that.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from .tiny_checkpoint import _init_like, _state_dict_shapes

# Bump when the recipe changes so cached files are rebuilt.
VAE_RECIPE_VERSION = 1

LATENT_CHANNELS = 16
DOWNSCALE = 8
DISK_DTYPE = torch.float16
FLUX_VAE_NAME = "ae.safetensors"  # the name ComfyUI's Flux examples give VAELoader

# The keys (and shapes) comfy.sd.VAE looks at to pick a 16-channel KL VAE; see the module docstring.
VAE_SKELETON = {
    "decoder.conv_in.weight": (512, LATENT_CHANNELS, 3, 3),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
}


def _comfy_cpu() -> None:
    """Keep ComfyUI off any GPU probing: this process only builds tensors."""
    from comfy.cli_args import args

    args.cpu = True


def _vae_shapes() -> dict[str, torch.Size]:
    """The weight shapes of the VAE ``comfy.sd.VAE`` builds from ``VAE_SKELETON``, keyed as its
    file is (built on the meta device: no memory, no init)."""
    _comfy_cpu()
    import comfy.sd

    skeleton = {name: torch.empty(shape, device="meta") for name, shape in VAE_SKELETON.items()}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "Missing VAE keys": the skeleton lacks all but two
    try:
        with torch.device("meta"):
            vae = comfy.sd.VAE(sd=skeleton)
    finally:
        logging.disable(previous)
    model = vae.first_stage_model
    if model is None or type(model).__name__ != "AutoencodingEngine" or vae.latent_channels != LATENT_CHANNELS:
        found = None if model is None else type(model).__name__
        raise RuntimeError(f"ComfyUI builds {found} ({vae.latent_channels} channels) from {sorted(VAE_SKELETON)}")
    return _state_dict_shapes(model)


def build_kl_vae16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The VAE file's state dict (``encoder.*``, ``decoder.*``), ``DISK_DTYPE``, sorted key order."""
    generator = torch.Generator().manual_seed(seed)
    return {name: _init_like(name, shape, generator).to(DISK_DTYPE) for name, shape in sorted(_vae_shapes().items())}


def write_kl_vae16(path: str, seed: int = 0) -> str:
    """Write the VAE file atomically to ``path`` (a ``.safetensors`` file) and return it."""

    from .tiny_dit import save_atomically

    save_atomically(build_kl_vae16_state_dict(seed), path, {"recipe": str(VAE_RECIPE_VERSION), "seed": str(seed)})
    return path


def kl_vae16_path(cache_dir: str, seed: int = 0) -> str:
    """Where ``ensure_kl_vae16`` keeps this recipe's file of ``seed``."""
    return os.path.join(cache_dir, f"random_kl_vae16_r{VAE_RECIPE_VERSION}_s{seed}.safetensors")


def ensure_kl_vae16(comfyui_path: str, cache_dir: str, seed: int = 0) -> str:
    """Return a cached random 16-channel KL VAE file (Flux / SD3.5 layout, fp16, 168 MB) for this
    recipe and seed, building it on first use in a subprocess that imports ComfyUI from
    ``comfyui_path`` (a few seconds)."""
    path = kl_vae16_path(cache_dir, seed)
    if not os.path.exists(path):
        dev = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [dev, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "harness.tiny_vae", os.path.abspath(comfyui_path), path, str(seed)]
        subprocess.run(command, check=True, cwd=comfyui_path, env=env)
    return path


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
    comfyui_path, out, seed = argv
    sys.path.insert(0, os.path.abspath(comfyui_path))
    write_kl_vae16(out, int(seed))


if __name__ == "__main__":
    main(sys.argv[1:])
