"""DPO training on the 2026 image families, in-process on CPU with the tiny random-weight models
of ``harness.dit_families`` loaded by ComfyUI's own ``load_diffusion_model`` (what UNETLoader
calls), one family per parameter so a failure names it:

- the named families (Flux.2 Klein, Z-Image, Chroma, Qwen-Image) train their blocks' attention and
  MLP linears, nothing else, in both LoRA modes, with gradient checkpointing, in every loss mode;
  checkpointed and plain training give the same LoRA; a few steps learn a synthetic preference
  (winners = losers + a channel-0 shift) to a held-out implicit accuracy of 0.9; the saved LoRA
  reloads through the stock loader with every key used and predicts as the trainer's adapters do;
- the generic path: Lumina 2 and AuraFlow, which ``FAMILIES`` does not name, train through
  ``generic_family`` with the blocks found from their structure, and save in the comfyui layout
  only;
- models that do not make images (Stable Audio, ACE-Step) are refused, and so are pairs of
  another latent family, conditioning from another family's text encoder, a resume LoRA made for
  another family and fp8 weights in weight mode, each with an InputError that names the fix.

Widths are what ComfyUI's detection fixes (0.4 to 0.9 B parameters; Klein pads its text to 512
tokens), so runs are one step of one pair with 8 text tokens on 64 px latents, at rank 4. The
light checks run on both ComfyUI versions (Klein on 0.33 only, ``unsupported_reason``); the
heavy ones (the loss-mode sweep, checkpointing equality, learning, reload) are marked
``current_comfyui`` and run on 0.33 only. Qwen-Image's loss-mode sweep is
``test_frame_axis.py``'s, on both versions.
"""

import gc
import logging
import os

import pytest
import torch
from safetensors import safe_open

from harness import release_memory
from harness.comfy_server import DEFAULT_CACHE, comfyui_path
from harness.dit_families import FAMILIES, family_conditioning
from harness.logs import LoggedWarnings
from harness.pairs import uniform_pairs
from harness.tiny_checkpoint import PROPERTY_SHIFT
from harness.tiny_dit import dit_path, ensure_dit, unsupported_reason

pytestmark = pytest.mark.comfy

CACHE = os.path.join(DEFAULT_CACHE, "checkpoints")
TOKENS = 8
NAMED_KINDS = ("flux2_klein", "z_image", "chroma", "qwen_image")
GENERIC_KINDS = ("lumina2", "auraflow")

FLUX_STYLE_LAYERS = {
    *(f"double_blocks.0.{stream}_{part}" for stream in ("img", "txt") for part in ("attn.qkv", "attn.proj")),
    *(f"double_blocks.0.{stream}_mlp.{index}" for stream in ("img", "txt") for index in (0, 2)),
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
}
LUMINA_STYLE_LAYERS = {
    f"layers.0.{part}"
    for part in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
}
# The layers each family's LoRA covers: its blocks' attention and MLP linears. Never the
# modulation (Flux.2's shared double_stream_modulation_*, Z-Image's adaLN_modulation, Qwen's
# img_mod / txt_mod), the embedders, the refiners in front of Z-Image's layers, or the final layer.
LORA_LAYERS = {
    "flux2_klein": FLUX_STYLE_LAYERS,
    "chroma": FLUX_STYLE_LAYERS,
    "z_image": LUMINA_STYLE_LAYERS,
    "lumina2": LUMINA_STYLE_LAYERS,
    "qwen_image": {
        *(f"transformer_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0")),
        *(f"transformer_blocks.0.attn.{name}" for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")),
        *(f"transformer_blocks.0.{stream}_mlp.net.{part}" for stream in ("img", "txt") for part in ("0.proj", "2")),
    },
}
# Layers no gradient reaches in a one-block model: Qwen-Image's last block's text stream goes
# nowhere (the final layer reads the image tokens), so its text queries and text output layers stay
# as they start.
DEAD_ENDS = {
    "qwen_image": {
        f"transformer_blocks.0.{name}"
        for name in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    }
}

# The block lists generic_family finds in the models FAMILIES does not name.
GENERIC_BLOCKS = {
    "lumina2": ("noise_refiner", "context_refiner", "layers"),
    "auraflow": ("double_layers", "single_layers"),
}

# The bad inputs: pairs of the other latent family (Flux.2's 128 channels against 16), text
# states of another family's encoder, a resume LoRA of a family with the same layer names and
# other shapes (Chroma for Klein, Lumina 2 for Z-Image) or with other names.
OTHER_LATENTS = {
    "flux2_klein": "z_image",
    "z_image": "flux2_klein",
    "chroma": "flux2_klein",
    "qwen_image": "flux2_klein",
}
OTHER_ENCODER = {"flux2_klein": "z_image", "z_image": "qwen_image", "chroma": "z_image", "qwen_image": "z_image"}
OTHER_LORA = {"flux2_klein": "chroma", "z_image": "lumina2", "chroma": "z_image", "qwen_image": "chroma"}

# Each loss mode once, one step of one pair; the first two are the light runs (both versions):
# plain bypass, and weight mode with checkpointing. The rest vary LoRA mode and checkpoint depth.
RUNS = {
    "dpo": dict(lora_mode="bypass"),
    "patch_dpo": dict(lora_mode="weight", gradient_checkpointing=True, checkpoint_depth=2),
    "patchdpo_paper": dict(lora_mode="bypass", gradient_checkpointing=True, checkpoint_depth=1),
    "focus_dpo": dict(lora_mode="weight"),
    "hg_dpo": dict(lora_mode="bypass", gradient_checkpointing=True, checkpoint_depth=2),
}
LIGHT_RUNS = ("dpo", "patch_dpo")
# Learning: the step budget (steps x pairs per step) to a held-out implicit accuracy of 0.9.
LEARNING = dict(steps=2, batch_size=2, learning_rate=2e-3)
# 10 held-out draws: 0.9 allows one miss (a draw at a high noise level can tell the pair apart no better).
LEARNING_PAIRS, HELD_OUT_PAIRS, HELD_OUT_REPEATS = 8, 5, 2


def config(**overrides):
    from prefpersonalize.trainers.loop import DPOTrainingConfig

    values = dict(loss_mode="dpo", beta=100.0, steps=1, learning_rate=1e-3, rank=4, alpha=4.0, batch_size=1, seed=0)
    values.update(overrides)
    return DPOTrainingConfig(**values)


def random_latents(count, shape, seed):
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))


class Family:
    """One family's tiny model (a ModelPatcher), its CONDITIONING and the training runs its tests
    share (the plain run is both a light check and the checkpointing test's reference)."""

    def __init__(self, kind, model):
        self.kind, self.model = kind, model
        self.shape = FAMILIES[kind].latent_shape
        self.conditioning = family_conditioning(kind, tokens=TOKENS)
        self.runs = {}

    def pairs(self, count, seed, shape=None, conditioning=None):
        """Winners = losers + the synthetic property (latent channel 0 up)."""
        losers = random_latents(count, shape or self.shape, seed)
        winners = losers.clone()
        winners[:, 0] += PROPERTY_SHIFT / 4
        return uniform_pairs(conditioning or self.conditioning, winners, losers)

    def train(self, name, pairs=None, resume=None, **overrides):
        """``train_dpo_lora`` under inference mode, as ComfyUI runs a node; cached by ``name``."""
        from prefpersonalize.trainers.loop import train_dpo_lora

        if name not in self.runs:
            with torch.inference_mode():
                self.runs[name] = train_dpo_lora(
                    self.model, pairs or self.pairs(1, seed=1), config(**overrides), resume=resume
                )
        return self.runs[name]


def loaded_family(kind):
    import comfy.sd

    reason = unsupported_reason(kind)
    if reason is not None:
        pytest.skip(reason)
    return Family(kind, comfy.sd.load_diffusion_model(ensure_dit(comfyui_path(), CACHE, kind)))


def unload(family):
    import comfy.model_management

    family.runs.clear()
    del family.model
    comfy.model_management.unload_all_models()
    release_memory()


@pytest.fixture(scope="module", params=NAMED_KINDS)
def named(request, comfy_modules):
    """A named family's tiny model; one at a time (0.4 to 0.9 B parameters each)."""
    family = loaded_family(request.param)
    yield family
    unload(family)


@pytest.fixture(scope="module", params=GENERIC_KINDS)
def generic(request, comfy_modules):
    family = loaded_family(request.param)
    yield family
    unload(family)


def short_name(layer):
    return layer.removeprefix("diffusion_model.")


def assert_trained(result, expected_layers, dead_ends=frozenset()):
    """The LoRA covers exactly ``expected_layers``, every one of them but ``dead_ends`` moved
    (their down matrices start at zero), the metrics finite."""
    assert {short_name(layer) for layer in result.lora.layers} == expected_layers
    assert all(torch.isfinite(torch.tensor(values)).all() for values in result.history.values())
    downs = {
        short_name(key.removesuffix(".lora_down.weight")): value
        for key, value in result.lora.state_dict().items()
        if key.endswith(".lora_down.weight")
    }
    assert downs.keys() == expected_layers
    unmoved = {layer for layer, value in downs.items() if not value.abs().max() > 0}
    assert unmoved == set(dead_ends), f"layers whose LoRA stayed at its zero start: {sorted(unmoved)}"


def reload_lora(family, tensors, tmp_path, layout="comfyui"):
    """Save ``tensors`` in ``layout`` and load the file as LoraLoaderModelOnly does; returns the
    patched model, the file's keys, and the warnings the loader logged."""
    import comfy.sd
    import comfy.utils

    from prefpersonalize.trainers.lora_files import save_lora

    path = save_lora(tensors, str(tmp_path / f"{family.kind}_{layout}.safetensors"), family.model, layout=layout)
    loaded_tensors = comfy.utils.load_torch_file(path)
    with LoggedWarnings() as warnings:
        loaded, _ = comfy.sd.load_lora_for_models(family.model, None, loaded_tensors, 1.0, 0)
    return loaded, loaded_tensors, warnings.messages


def assert_every_key_used(loaded, tensors, warnings, layers):
    assert not [message for message in warnings if "lora key not loaded" in message], warnings
    assert set(loaded.patches) == {f"{layer}.weight" for layer in layers}
    assert len(tensors) == 3 * len(layers)  # up, down and alpha of each layer


# --- the named families ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_mode",
    [mode if mode in LIGHT_RUNS else pytest.param(mode, marks=pytest.mark.current_comfyui) for mode in RUNS],
)
def test_trains_the_family_blocks_in_every_mode(named, loss_mode):
    if named.kind == "qwen_image" and loss_mode not in LIGHT_RUNS:
        pytest.skip("Qwen-Image's loss-mode sweep is test_frame_axis.py's, on both ComfyUI versions")
    result = named.train(loss_mode, loss_mode=loss_mode, **RUNS[loss_mode])
    assert_trained(result, LORA_LAYERS[named.kind], DEAD_ENDS.get(named.kind, ()))
    assert result.steps_done == 1
    # The memory check ran a fake step of this family in this mode (none: it was skipped).
    assert result.memory is not None and result.memory.activations > 0


@pytest.mark.current_comfyui
def test_checkpointed_and_plain_training_give_the_same_lora(named):
    plain = named.train("dpo", **RUNS["dpo"]).lora.state_dict()
    checkpointed = named.train("checkpointed", gradient_checkpointing=True, checkpoint_depth=2).lora.state_dict()
    assert checkpointed.keys() == plain.keys()
    for key, value in plain.items():  # Flux-style blocks update their inputs in place: both paths must agree
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.current_comfyui
def test_learns_a_synthetic_preference(named):
    from harness.evaluation import implicit_accuracy

    result = named.train("learning", pairs=named.pairs(LEARNING_PAIRS, seed=2), **LEARNING)
    assert_trained(result, LORA_LAYERS[named.kind], DEAD_ENDS.get(named.kind, ()))
    held_out = named.pairs(HELD_OUT_PAIRS, seed=3)
    accuracy = implicit_accuracy(result.lora, held_out, repeats=HELD_OUT_REPEATS)
    assert accuracy >= 0.9, (accuracy, result.history["accuracy"], result.history["loss"])


def prediction(patcher, x, sigma, conditioning):
    """The model's x0 prediction for image latents ``x`` ``[B, C, h, w]``, in the model's own
    latent layout (Qwen-Image's frame axis) and back."""
    import comfy.model_management

    from prefpersonalize.comfy_glue.families import latent_layout
    from prefpersonalize.trainers.pair_batches import batch_kwargs, conditioning_batches

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    layout = latent_layout(patcher.model)
    conds = conditioning_batches(patcher.model, [conditioning], tuple(x.shape[1:]), patcher.load_device)
    kwargs = batch_kwargs(conds, [0] * x.shape[0], patcher.load_device)
    with torch.no_grad():
        return layout.to_image(patcher.model.apply_model(layout.to_model(x), sigma, **kwargs)).float()


@pytest.mark.current_comfyui
def test_saved_lora_reloads_through_the_stock_loader(named, tmp_path):
    result = named.train("learning", pairs=named.pairs(LEARNING_PAIRS, seed=2), **LEARNING)
    loaded, tensors, warnings = reload_lora(named, result.lora.state_dict(), tmp_path)
    assert_every_key_used(loaded, tensors, warnings, result.lora.layers)
    x, sigma = random_latents(2, named.shape, seed=9), torch.tensor([0.4, 0.8])
    trained = prediction(result.lora.inference_patcher(), x, sigma, named.conditioning)
    base = prediction(named.model, x, sigma, named.conditioning)
    assert (trained - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(prediction(loaded, x, sigma, named.conditioning), trained, rtol=1e-4, atol=1e-4)


def test_pairs_of_another_latent_family_are_refused(named):
    from prefpersonalize.pure.errors import InputError

    other = FAMILIES[OTHER_LATENTS[named.kind]].latent_shape
    with pytest.raises(InputError, match=rf"{other[0]}-channel latents .* expects {named.shape[0]}; build the pairs"):
        named.train("other latents", pairs=named.pairs(1, seed=1, shape=other))


def test_conditioning_of_another_text_encoder_is_refused(named):
    from prefpersonalize.pure.errors import InputError

    other = FAMILIES[OTHER_ENCODER[named.kind]].context_dim
    conditioning = family_conditioning(OTHER_ENCODER[named.kind], tokens=TOKENS)
    expected = (
        rf"{other}-wide text states .* reads {FAMILIES[named.kind].context_dim}-wide .* this model's text encoder"
    )
    with pytest.raises(InputError, match=expected):
        named.train("other encoder", pairs=named.pairs(1, seed=1, conditioning=conditioning))


def other_family_lora(kind, rank=4):
    """A LoRA in the comfyui layout on the layers a ``kind`` LoRA covers, shaped as that family's
    weights file says (read from its header: the file is ComfyUI's module names)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    with safe_open(dit_path(CACHE, kind, 0), framework="pt") as file:
        for layer in sorted(LORA_LAYERS[kind]):
            out_features, in_features = file.get_slice(f"{layer}.weight").get_shape()
            prefix = f"diffusion_model.{layer}"
            tensors[f"{prefix}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
            tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    return tensors


def test_resume_lora_of_another_family_is_refused(named):
    from prefpersonalize.pure.errors import InputError

    other = OTHER_LORA[named.kind]
    ensure_dit(comfyui_path(), CACHE, other)
    with pytest.raises(InputError, match="another model"):
        named.train("other lora", resume=other_family_lora(other))


def test_fp8_weights_are_refused_in_weight_mode(named):
    import comfy.sd

    from prefpersonalize.pure.errors import InputError
    from prefpersonalize.trainers.loop import train_dpo_lora

    path = ensure_dit(comfyui_path(), CACHE, named.kind)
    fp8 = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float8_e4m3fn})
    try:
        with pytest.raises(InputError, match="train only in bypass mode; set lora_mode to bypass"):
            train_dpo_lora(fp8, named.pairs(1, seed=1), config(lora_mode="weight"))
    finally:
        del fp8
        gc.collect()


# --- the generic path -----------------------------------------------------------------------------


def test_generic_family_trains_and_saves_in_the_comfyui_layout(generic, tmp_path, caplog):
    from prefpersonalize.comfy_glue.families import generic_family, model_family, named_family
    from prefpersonalize.pure.errors import InputError
    from prefpersonalize.trainers.lora_files import save_lora

    model = generic.model.model
    family = model_family(model)
    assert named_family(model) is None and family == generic_family(model)
    assert family.blocks == GENERIC_BLOCKS[generic.kind]
    result = generic.train("dpo")
    layers = {short_name(layer) for layer in result.lora.layers}
    # the linears of every block found, never a modulation (AuraFlow's modC / modX, Lumina's adaLN)
    assert layers and all(layer.split(".")[0] in family.blocks for layer in layers)
    assert not [layer for layer in layers if "mod" in layer or "adaLN" in layer]
    if generic.kind in LORA_LAYERS:
        assert LORA_LAYERS[generic.kind] <= layers
    assert_trained(result, layers)
    with caplog.at_level(logging.INFO):
        loaded, tensors, warnings = reload_lora(generic, result.lora.state_dict(), tmp_path)
    assert any("comfyui layout" in record.getMessage() for record in caplog.records), caplog.text
    assert_every_key_used(loaded, tensors, warnings, result.lora.layers)
    with pytest.raises(InputError, match="comfyui layout"):
        save_lora(result.lora.state_dict(), str(tmp_path / "kohya.safetensors"), generic.model, layout="kohya")
    assert not (tmp_path / "kohya.safetensors").exists()


# --- models that do not make images ---------------------------------------------------------------


def audio_model(config_name):
    """A real ``model_base`` instance of an audio family, built from ComfyUI's own
    ``supported_models`` config on the meta device (no weights: the family is read off the
    config and the latent format)."""
    import comfy.supported_models
    from comfy.ldm.audio.embedders import NumberConditioner

    config_class = getattr(comfy.supported_models, config_name)
    state_dict = {}
    if config_name == "StableAudio":  # its seconds embedders are built on the CPU and loaded
        embedder = NumberConditioner(768, min_val=0, max_val=512).state_dict()
        state_dict = {
            f"conditioner.conditioners.{name}.{key}": value
            for name in ("seconds_start", "seconds_total")
            for key, value in embedder.items()
        }
    return config_class(dict(config_class.unet_config)).get_model(state_dict, device="meta")


@pytest.mark.parametrize("config_name", ["StableAudio", "ACEStep"])
def test_models_that_make_no_images_are_refused(config_name, comfy_modules):
    from prefpersonalize.comfy_glue.families import model_family
    from prefpersonalize.pure.errors import InputError

    model = audio_model(config_name)
    assert model.latent_format.latent_dimensions == {"StableAudio": 1, "ACEStep": 2}[config_name]
    with pytest.raises(InputError, match=f"this is a {config_name} model, which does not make images"):
        model_family(model)
