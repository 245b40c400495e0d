"""Models whose latents have a frame axis (``latent_format.latent_dimensions == 3``): Qwen-Image on
Wan 2.1's latents, and the video models. The pack's pairs stay image latents ``[N, C, h, w]``: the
pair builders drop the length-1 frame axis a video-style VAE returns, and the trainer gives the
model ``[B, C, 1, h, w]`` and reads its predictions back on the image grid
(``comfy_glue.families.LatentLayout``), so every loss mode and the held-out evaluation run.

The model is the tiny random Qwen-Image (``harness.tiny_dit``, one block at the fixed 3072 width,
0.38 B parameters), trained two steps per run with 8 text tokens on a 64 px latent, on the CPU.
"""

import gc
import os

import pytest
import torch
import torch.nn.functional as F

from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.dit_families import FAMILIES, family_conditioning
from harness.pairs import uniform_pairs
from harness.tiny_dit import ensure_dit

pytestmark = pytest.mark.comfy

CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")
KIND = "qwen_image"
LATENT = FAMILIES[KIND].latent_shape  # [16, 8, 8]: a 64 px image
TOKENS = 8
# Each loss mode once, alternating LoRA modes and checkpoint depths, so both LoRA modes and both
# depths of gradient checkpointing run on the frame-axis model.
RUNS = [
    ("dpo", "bypass", 2),
    ("patch_dpo", "weight", 1),
    ("patchdpo_paper", "bypass", 1),
    ("focus_dpo", "weight", 2),
    ("hg_dpo", "bypass", 2),
]


@pytest.fixture(scope="module")
def qwen(comfy_modules):
    """The tiny Qwen-Image through ``load_diffusion_model`` (what UNETLoader calls) and its
    CONDITIONING; unloaded after the module's tests."""
    import comfy.model_management
    import comfy.sd

    model = comfy.sd.load_diffusion_model(ensure_dit(comfyui_path(), CACHE, KIND))
    yield model, family_conditioning(KIND, tokens=TOKENS)
    del model
    comfy.model_management.unload_all_models()
    gc.collect()


def qwen_pairs(conditioning, count=2, seed=0):
    """Random winners and losers ``[N, 16, 8, 8]``, a left-half weight map (patch modes see a
    map that is not uniform) and difficulties for hg_dpo's curriculum."""
    generator = torch.Generator().manual_seed(seed)
    losers = torch.randn(count, *LATENT, generator=generator)
    winners = losers + 0.5 * torch.randn(count, *LATENT, generator=generator)
    left = torch.zeros(LATENT[1:])
    left[:, : LATENT[2] // 2] = 1
    pairs = uniform_pairs(conditioning, winners, losers, 0.1 + 0.9 * left, loser_quality=0.5)
    pairs.metadata = [{"source": "synthetic", "difficulty": d} for d in ("easy", "hard")[:count]]
    return pairs


def test_the_model_takes_latents_with_a_frame_axis(qwen):
    from prefpersonalize.comfy_glue.families import latent_layout
    from prefpersonalize.trainers.pair_batches import PairBatcher

    model, conditioning = qwen
    assert model.model.latent_format.latent_dimensions == 3
    layout = latent_layout(model.model)
    images = torch.randn(2, *LATENT)
    assert layout.to_model(images).shape == (2, LATENT[0], 1, *LATENT[1:])
    torch.testing.assert_close(layout.to_image(layout.to_model(images)), images, rtol=0, atol=0)
    # Scaling as ComfyUI does on [B, C, 1, h, w]; pair latents stay [B, C, h, w].
    batcher = PairBatcher(model, qwen_pairs(conditioning))
    expected = model.model.process_latent_in(batcher.pairs.winners.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(batcher.winners, expected)


@pytest.mark.parametrize(("mode", "lora_mode", "depth"), RUNS)
def test_every_mode_trains_on_qwen_image(qwen, mode, lora_mode, depth):
    from prefpersonalize.trainers.loop import METRICS, DPOTrainingConfig, train_dpo_lora

    model, conditioning = qwen
    config = DPOTrainingConfig(
        loss_mode=mode,
        beta=500.0,
        steps=2,
        learning_rate=1e-4,
        rank=4,
        alpha=4.0,
        batch_size=2,
        lora_mode=lora_mode,
        gradient_checkpointing=True,
        checkpoint_depth=depth,
        preserve_outside=0.5 if mode == "patch_dpo" else 0.0,
    )
    result = train_dpo_lora(model, qwen_pairs(conditioning), config)
    assert result.steps_done == 2
    assert set(result.history) == set(METRICS) and all(len(values) == 2 for values in result.history.values())
    assert all(torch.isfinite(torch.tensor(values)).all() for values in result.history.values())
    if mode != "patchdpo_paper":  # the reference pass runs, and sees the same model at step 1
        assert result.history["model_winner"][0] == pytest.approx(result.history["reference_winner"][0], rel=1e-4)
    assert any(float(value.abs().max()) > 0 for name, value in result.lora.state_dict().items() if "lora_up" in name)


def test_held_out_accuracy_on_qwen_image(qwen):
    from harness.evaluation import implicit_accuracy
    from prefpersonalize.trainers.lora_adapters import attach_lora

    model, conditioning = qwen
    untrained = attach_lora(model, rank=4, alpha=4.0)
    assert implicit_accuracy(untrained, qwen_pairs(conditioning, seed=1), repeats=1) == pytest.approx(0.5)


# --- pair builders with a video-style VAE ---


class VideoStyleVae:
    """Encodes as ComfyUI's VAE does for Wan 2.1's (``latent_dim`` 3, not ``not_video``): a batch
    of images ``[B, H, W, 3]`` is the frames of one clip, ``[1, 16, 1 + (B - 1) // 4, H/8, W/8]``
    (here 8 x 8 average pools of the clip's first frame, repeated to 16 channels).
    ``frames_per_image`` > 1 makes a VAE that turns one image into a clip."""

    latent_dim = 3

    def __init__(self, frames_per_image: int = 1):
        self.frames_per_image = frames_per_image

    def encode(self, pixels):
        clip = pixels.movedim(-1, 1).movedim(1, 0).unsqueeze(0)  # [1, 3, B, H, W]
        frames = (1 + (clip.shape[2] - 1) // 4) * self.frames_per_image
        pooled = F.avg_pool2d(clip[:, :, 0], 8)  # [1, 3, h, w]
        return pooled.repeat(1, 6, 1, 1)[:, :16].unsqueeze(2).expand(-1, -1, frames, -1, -1).clone()


def build(vae, images, references=None):
    from prefpersonalize.comfy_glue.pairs import ImageMaps, PairSide, build_pairs

    count = images.shape[0] - 1
    return build_pairs(
        vae=vae,
        positive=family_conditioning(KIND, tokens=TOKENS),
        winners=PairSide(images, [0] * count),
        losers=PairSide(images, list(range(1, count + 1))),
        maps=ImageMaps(),
        metadata=[{"source": "test"}] * count,
        references=references,
    )


def test_pairs_from_a_video_style_vae_are_stored_as_images(comfy_modules, tmp_path):
    from prefpersonalize.pure.pairs import load_pairs, save_pairs

    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    references = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pairs = build(VideoStyleVae(), images, references)
    assert pairs.winners.shape == pairs.losers.shape == (2, 16, 8, 8)
    assert pairs.references.shape == (2, 16, 8, 8)
    assert pairs.maps.winner_weights.shape == (2, 8, 8) and pairs.latent_channels == 16
    # Each image is its own latent, not a frame of a clip of the batch.
    for latents, source in ((pairs.losers, images[1:]), (pairs.references, references)):
        torch.testing.assert_close(latents[:, 0], F.avg_pool2d(source[:, 0:1], 8)[:, 0])
    tensor_path, _ = save_pairs(pairs, str(tmp_path / "qwen_pairs"))
    loaded = load_pairs(tensor_path)
    assert loaded.winners.shape == (2, 16, 8, 8) and loaded.references.shape == (2, 16, 8, 8)


def test_latents_of_several_frames_are_refused(comfy_modules):
    from prefpersonalize.pure.errors import InputError
    from prefpersonalize.pure.pairs import single_frame

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="latents of 2 frames .* connect the VAE of the image model"):
        build(VideoStyleVae(frames_per_image=2), images)
    assert single_frame(torch.zeros(2, 16, 8, 8)).shape == (2, 16, 8, 8)
    with pytest.raises(InputError, match="shape \\(2, 16, 8\\)"):
        single_frame(torch.zeros(2, 16, 8))


def test_a_pair_set_of_video_latents_is_refused(comfy_modules):
    from prefpersonalize.pure.errors import InputError

    pairs = qwen_pairs(family_conditioning(KIND, tokens=TOKENS))
    pairs.winners, pairs.losers = pairs.winners.unsqueeze(2), pairs.losers.unsqueeze(2)
    with pytest.raises(InputError, match="not image latents \\[N, C, h, w\\]"):
        pairs.validate()
