"""The random KL VAEs (``harness.tiny_vae``) on ComfyUI's stock loaders, in-process on CPU:
``comfy.sd.VAE`` (what VAELoader calls) detects each as its family's VAE with every key used (the
16-channel Flux.1 / SD3.5 ``ae.safetensors``; Flux.2's ``flux2-vae.safetensors``, 128 channels at
1/16 after its 2 x 2 fold and batch norm), it encodes to latents of that shape and decodes them
to finite, varied images, and the stock ``VAELoader`` node loads it under the examples' name.

The VAEs are full size (ComfyUI fixes their config), so each encode or decode takes seconds here.
"""

import os

import pytest
import torch

from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.logs import LoggedWarnings
from harness.tiny_vae import FLUX2_VAE_NAME, FLUX_VAE_NAME, VAES, ensure_vae

pytestmark = pytest.mark.comfy

CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")
# kind -> (VAELoader name, latent channels, downscale)
EXPECTED = {"kl_vae16": (FLUX_VAE_NAME, 16, 8), "flux2_vae": (FLUX2_VAE_NAME, 128, 16)}


def image(size: int, seed: int = 0) -> torch.Tensor:
    """A ``[1, size, size, 3]`` image in [0, 1], as IMAGE tensors are."""
    return torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))


def assert_sane_image(decoded: torch.Tensor, size: int) -> None:
    assert decoded.shape == (1, size, size, 3)
    assert decoded.isfinite().all()
    assert decoded.min() >= 0 and decoded.max() <= 1
    assert decoded.std() > 0.05  # not one value: the random decoder's output varies


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def vae_file(kind, comfy_modules):
    return ensure_vae(comfyui_path(), CACHE, kind)


@pytest.fixture(scope="module")
def state(vae_file):
    import comfy.utils

    return comfy.utils.load_torch_file(vae_file)


@pytest.fixture(scope="module")
def vae(state):
    import comfy.sd

    with LoggedWarnings() as logged:
        vae = comfy.sd.VAE(sd=dict(state))
    assert not logged.messages  # no "Missing VAE keys"
    return vae


def test_detected_as_the_family_vae_with_every_key(kind, state, vae):
    _, channels, downscale = EXPECTED[kind]
    model = vae.first_stage_model
    assert type(model).__name__ == VAES[kind].model_class  # Flux.1 / SD3: no quant convs; Flux.2: quant convs
    assert type(model.decoder).__module__ == "comfy.ldm.modules.diffusionmodules.model"
    assert vae.latent_channels == channels and vae.downscale_ratio == downscale
    assert len(state) == len(model.state_dict())  # every key the loader expects, no others
    assert {value.dtype for value in state.values() if value.is_floating_point()} == {torch.float16}
    assert 80e6 < sum(value.numel() for value in state.values()) < 90e6  # both real files: 83.8 M


def test_round_trip_is_finite_and_varied(kind, vae):
    _, channels, downscale = EXPECTED[kind]
    with torch.inference_mode():
        latent = vae.encode(image(64))
        assert latent.shape == (1, channels, 64 // downscale, 64 // downscale)
        assert latent.isfinite().all() and latent.std() > 0
        assert_sane_image(vae.decode(latent), 64)


def test_stock_vae_loader_loads_it_under_the_examples_name(kind, vae_file, tmp_path_factory):
    import folder_paths
    import nodes

    name, channels, downscale = EXPECTED[kind]
    folder = tmp_path_factory.mktemp("vae")
    os.symlink(vae_file, folder / name)
    folder_paths.add_model_folder_path("vae", str(folder))
    assert name in nodes.VAELoader.vae_list(nodes.VAELoader)
    with torch.inference_mode():
        (vae,) = nodes.VAELoader().load_vae(name)
        latent = vae.encode(image(128, seed=1))
    assert vae.latent_channels == channels
    assert latent.shape == (1, channels, 128 // downscale, 128 // downscale) and latent.isfinite().all()
