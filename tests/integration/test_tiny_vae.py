"""The random 16-channel KL VAE (``harness.tiny_vae``) on ComfyUI's stock loaders, in-process on
CPU: ``comfy.sd.VAE`` (what VAELoader calls) detects it as the Flux / SD3.5 VAE with every key
used, it encodes to 16-channel latents at 1/8 size and decodes them to finite, varied images,
and the stock ``VAELoader`` node loads it under Flux's name ``ae.safetensors``.

The VAE is full size (ComfyUI fixes its config), so each encode or decode takes seconds here.
"""

import os

import pytest
import torch

from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.tiny_vae import DOWNSCALE, FLUX_VAE_NAME, LATENT_CHANNELS, ensure_kl_vae16

pytestmark = pytest.mark.comfy

CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")


def image(size: int, seed: int = 0) -> torch.Tensor:
    """A ``[1, size, size, 3]`` image in [0, 1], as IMAGE tensors are."""
    return torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))


def assert_sane_image(decoded: torch.Tensor, size: int) -> None:
    assert decoded.shape == (1, size, size, 3)
    assert decoded.isfinite().all()
    assert decoded.min() >= 0 and decoded.max() <= 1
    assert decoded.std() > 0.05  # not one value: the random decoder's output varies


@pytest.fixture(scope="module")
def vae_file(comfy_modules):
    return ensure_kl_vae16(comfyui_path(), CACHE)


@pytest.fixture(scope="module")
def state(vae_file):
    import comfy.utils

    return comfy.utils.load_torch_file(vae_file)


@pytest.fixture(scope="module")
def vae(state):
    import comfy.sd

    return comfy.sd.VAE(sd=dict(state))


def test_detected_as_a_16_channel_kl_vae(state, vae):
    model = vae.first_stage_model
    assert type(model).__name__ == "AutoencodingEngine"  # Flux / SD3 layout: no quant convs
    assert type(model.decoder).__module__ == "comfy.ldm.modules.diffusionmodules.model"
    assert vae.latent_channels == LATENT_CHANNELS and vae.downscale_ratio == DOWNSCALE
    assert set(state) == set(model.state_dict())  # every key the loader expects, no others
    assert {value.dtype for value in state.values()} == {torch.float16}
    assert 80e6 < sum(value.numel() for value in state.values()) < 90e6  # ae.safetensors: 83.8 M


def test_round_trip_is_finite_and_varied(vae):
    with torch.inference_mode():
        latent = vae.encode(image(64))
        assert latent.shape == (1, LATENT_CHANNELS, 8, 8) and latent.isfinite().all() and latent.std() > 0
        assert_sane_image(vae.decode(latent), 64)


def test_stock_vae_loader_loads_it_as_ae_safetensors(vae_file, tmp_path_factory):
    import folder_paths
    import nodes

    folder = tmp_path_factory.mktemp("vae")
    os.symlink(vae_file, folder / FLUX_VAE_NAME)
    folder_paths.add_model_folder_path("vae", str(folder))
    assert FLUX_VAE_NAME in nodes.VAELoader.vae_list(nodes.VAELoader)
    with torch.inference_mode():
        (vae,) = nodes.VAELoader().load_vae(FLUX_VAE_NAME)
        latent = vae.encode(image(128, seed=1))
    assert vae.latent_channels == LATENT_CHANNELS
    assert latent.shape == (1, LATENT_CHANNELS, 16, 16) and latent.isfinite().all()
