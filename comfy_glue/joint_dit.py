"""Joint attention on DiTs (Flux.1 and .2, Chroma, Qwen-Image, Z-Image, SD3/SD3.5 MMDiT) through
ComfyUI's own hooks, no monkeypatching.

Three pieces, each a supported ComfyUI extension point of both ComfyUI versions the pack supports:

- an ``APPLY_MODEL`` wrapper (``TokenGrid``) puts the text token count and the image token grid of
  the call into a copy of ``transformer_options``: the attention calls see only token sequences;
- a ``patches_replace["dit"]`` block replacement (``JointDitBlock``) on every chosen double,
  single (Flux) or joint (MMDiT) block decides whether joint attention is active for the call
  (layout, strength, schedule, block) and, when it is, runs the block with
- an ``optimized_attention_override`` (``JointTokenAttention``) that computes the block's
  attention with ``token_attention``: the targets' image tokens also attend to the references'
  image tokens. Everything else is ComfyUI's own attention call (or the override already set by
  another node): every inactive call is exactly the stock computation, and in an active one the
  references' rows and the targets' text queries are computed with it, the targets' image
  queries only once, jointly.

A DiT without block replacements (Z-Image) gets ``JointLayers`` instead: an ``APPLY_MODEL``
wrapper setting ``LayerAttention`` as the override of the whole call, which finds the main
layers' calls by their token count.

How it fits the UNet version: docs/algorithms.md, section 'Joint attention on DiTs'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.patcher_extension
import torch
from comfy.ldm.flux.math import apply_rope1
from einops import rearrange

from ..pure.errors import InputError
from ..pure.joint_attention import (
    AttentionKernels,
    JointAttentionSettings,
    JointCall,
    active_call,
    merge_heads,
    sdpa_kernel,
    split_heads,
    token_attention,
    with_subject_masks,
)
from .joint_kernels import is_fallback_kernel

# Key in ``transformer_options`` of the call's ``DitTokens``, and of the wrapper that writes it.
TOKENS_KEY = "prefp_dit_tokens"


def padded(count: int, multiple: int) -> int:
    """``count`` rounded up to a multiple of ``multiple``."""
    return -(-count // multiple) * multiple


@dataclass(frozen=True)
class DitTokens:
    """A DiT call's token counts: ``text`` tokens (context and registers, padded as the model
    pads them), image ``grid`` (h, w), and the multiple a model pads its image tokens to
    (Z-Image: 32; 1 elsewhere)."""

    text: int
    grid: tuple[int, int]
    pad_multiple: int = 1

    @property
    def image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def sequence(self) -> int:
        """Tokens of a main block's attention: the text, then the (padded) image."""
        return self.text + padded(self.image, self.pad_multiple)


class TokenGrid:
    """``APPLY_MODEL`` wrapper: adds the call's ``DitTokens`` to ``transformer_options``. It also
    carries the Joint Attention node's ``settings`` (``dit_joint_settings``), so they are known
    even where they choose no block."""

    def __init__(self, diffusion_model, settings: JointAttentionSettings | None = None):
        self.settings = settings
        self.patch_size = diffusion_model.patch_size
        self.extra_text_tokens = getattr(diffusion_model, "register_length", 0)  # SD3's registers
        self.pad_multiple = getattr(diffusion_model, "pad_tokens_multiple", None) or 1  # Z-Image's

    def tokens(self, x: torch.Tensor, c_crossattn: torch.Tensor | None) -> DitTokens:
        text = (c_crossattn.shape[1] if c_crossattn is not None else 0) + self.extra_text_tokens
        grid = tuple(math.ceil(size / self.patch_size) for size in x.shape[-2:])
        return DitTokens(padded(text, self.pad_multiple), grid, self.pad_multiple)

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        options = {**(transformer_options or {}), TOKENS_KEY: self.tokens(x, c_crossattn)}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def offset_rotation(diffusion_model, positions: str):
    """The RoPE rotation that moves the references' keys one step along the index axis (where
    Flux Kontext places reference latents): ``ids -> [1, 1, 1, D/2, 2, 2]``; None without RoPE
    or for shared positions."""
    embedder = getattr(diffusion_model, "pe_embedder", None) or getattr(diffusion_model, "rope_embedder", None)
    if positions != "offset" or embedder is None:
        return None
    ids = torch.zeros(1, 1, len(embedder.axes_dim))
    ids[..., 0] = 1.0
    return embedder(ids)


class JointTokenAttention:
    """``optimized_attention_override`` of one active block call: ``token_attention`` over the
    sequence ``(text, image[, Kontext references])`` (the image alone in MMDiT-X self-attention);
    masked attention calls stay plain.

    Args:
        call: the block call's ``JointCall`` (subject masks on the image token grid included).
        text: the text tokens before the image tokens.
        tokens: the call's ``DitTokens``.
        rotation: the references' RoPE offset (``offset_rotation``) or None.
        previous: an ``optimized_attention_override`` already set (it keeps computing attention).
    """

    def __init__(self, call: JointCall, text: int, tokens: DitTokens, *, rotation=None, previous=None):
        self.joint_call, self.text, self.tokens = call, text, tokens
        self.rotation, self.previous = rotation, previous

    def call(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def image_tokens(self, total: int) -> slice | None:
        image = self.tokens.image
        if total == image:
            return slice(0, image)
        return slice(self.text, self.text + image) if self.text + image <= total else None

    def __call__(self, func, q, k, v, *rest, **kwargs):
        heads = rest[0] if rest else kwargs["heads"]
        mask = rest[1] if len(rest) > 1 else kwargs.get("mask")  # Qwen-Image passes it by position
        skip_reshape = kwargs.get("skip_reshape", False)
        image = self.image_tokens(q.shape[2] if skip_reshape else q.shape[1])
        if mask is not None or image is None:
            return self.call(func, q, k, v, *rest, **kwargs)
        reference_k = None
        if self.rotation is not None and skip_reshape:
            reference_k = merge_heads(apply_rope1(k, self.rotation.to(k.device)))
        if skip_reshape:
            q, k, v = merge_heads(q), merge_heads(k), merge_heads(v)
        else:  # MMDiT hands over v as [B, T, H, D]
            q, k, v = (rearrange(x, "b t ... -> b t (...)") for x in (q, k, v))
        flat_kwargs = {
            key: value
            for key, value in kwargs.items()
            if key not in ("heads", "mask", "skip_reshape", "skip_output_reshape")
        }

        def attention(q_, k_, v_):
            return self.call(func, q_, k_, v_, heads, **flat_kwargs)

        def joint(q_, k_, v_):
            if self.previous is None and is_fallback_kernel(func):
                return sdpa_kernel(q_, k_, v_, heads, flat_kwargs)
            return attention(q_, k_, v_)

        upcast = kwargs.get("attn_precision") == torch.float32
        kernels = AttentionKernels(heads=heads, attention=attention, joint=joint, upcast=upcast)
        out = token_attention(q, k, v, call=self.joint_call, kernels=kernels, image=image, reference_k=reference_k)
        return split_heads(out, heads) if kwargs.get("skip_output_reshape") else out


class JointDitBlock:
    """A ``patches_replace["dit"]`` block replacement running the block with joint attention.

    Args:
        settings: the Joint Attention node's settings (``active_call`` decides when it is active).
        name: the block's name in ``settings.blocks`` (its third of the model's depth).
        index: the block's position in the model, for ``extra_options``-style ``block``.
        rotation: the references' RoPE offset (``offset_rotation``) or None.
        previous: a block replacement already on this block (it keeps running the block).
    """

    def __init__(self, settings: JointAttentionSettings, name: str, index: int, *, rotation=None, previous=None):
        self.settings, self.name, self.index = settings, name, index
        self.rotation, self.previous = rotation, previous

    def __call__(self, args: dict, extra: dict) -> dict:
        def run(block_args):
            if self.previous is not None:
                return self.previous(block_args, extra)
            return extra["original_block"](block_args)

        options = args.get("transformer_options") or {}
        tokens = options.get(TOKENS_KEY)
        if tokens is None:
            return run(args)
        call = active_call(self.settings, args["img"].shape[0], {**options, "block": (self.name, self.index)})
        if call is None:
            return run(args)
        call = with_subject_masks(call, options, tokens.grid)
        text = args["txt"].shape[1] if args.get("txt") is not None else tokens.text
        previous = options.get("optimized_attention_override")
        override = JointTokenAttention(call, text, tokens, rotation=self.rotation, previous=previous)
        return run({**args, "transformer_options": {**options, "optimized_attention_override": override}})


class LayerAttention:
    """``optimized_attention_override`` of one model call of a DiT without block replacements
    (``JointLayers``): main layers are the calls over the whole sequence (``DitTokens.sequence``;
    Z-Image's refiners see the text or the image alone), numbered by ComfyUI's ``block_index``
    where it sets one (0.33) or in call order (0.3.75); each runs ``JointTokenAttention`` where
    ``active_call`` says so, every other call stays plain."""

    def __init__(self, layers: JointLayers, tokens: DitTokens, options: dict, batch: int, previous=None):
        self.layers, self.tokens, self.options, self.batch = layers, tokens, options, batch
        self.previous = previous
        self.calls = 0

    def plain(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, q, k, v, *rest, **kwargs):
        total = q.shape[2] if kwargs.get("skip_reshape") else q.shape[1]
        if total != self.tokens.sequence:
            return self.plain(func, q, k, v, *rest, **kwargs)
        names = self.layers.names
        # Gradient checkpointing calls the layers again in backward: the count wraps around.
        index = (kwargs.get("transformer_options") or {}).get("block_index", self.calls % len(names))
        self.calls += 1
        call = active_call(self.layers.settings, self.batch, {**self.options, "block": (names[index], index)})
        if call is None:
            return self.plain(func, q, k, v, *rest, **kwargs)
        call = with_subject_masks(call, self.options, self.tokens.grid)
        attention = JointTokenAttention(
            call, self.tokens.text, self.tokens, rotation=self.layers.rotation, previous=self.previous
        )
        return attention(func, q, k, v, *rest, **kwargs)


class JointLayers:
    """``APPLY_MODEL`` wrapper putting joint attention on a DiT that ComfyUI gives no block
    replacements (``ModelFamily.joint_by_attention``: Z-Image): it writes the call's
    ``DitTokens`` (as ``TokenGrid``) and sets ``LayerAttention`` as the attention override of the
    whole call, composing with one another node set.

    Args:
        settings: the Joint Attention node's settings.
        names: the block name (``input``, ``middle``, ``output``) of each main layer, in order.
        grid: the model's ``TokenGrid``.
        rotation: the references' RoPE offset (``offset_rotation``) or None.
    """

    def __init__(self, settings: JointAttentionSettings, names: list[str], grid: TokenGrid, *, rotation=None):
        self.settings, self.names, self.grid, self.rotation = settings, names, grid, rotation

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if kwargs.get("ref_latents"):
            raise InputError(
                "Joint Attention on this model cannot run with reference latents (ReferenceLatent, an edit "
                "model's references): their tokens sit between the text and the image. Remove the "
                "ReferenceLatent node or the Joint Attention."
            )
        options = {**(transformer_options or {})}
        options[TOKENS_KEY] = tokens = self.grid.tokens(x, c_crossattn)
        previous = options.get("optimized_attention_override")
        options["optimized_attention_override"] = LayerAttention(self, tokens, options, x.shape[0], previous)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def dit_joint_settings(model) -> JointAttentionSettings | None:
    """The settings of the Joint Attention on ``model`` (a DiT), or None when it went through none."""
    options = model.model_options.get("transformer_options", {})
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    wrappers = comfy.patcher_extension.get_wrappers_with_key(apply_model, TOKENS_KEY, options)
    return next((wrapper.settings for wrapper in wrappers if wrapper.settings is not None), None)


def apply_dit_joint_attention(
    model, settings: JointAttentionSettings, blocks: list[tuple[tuple[str, int], str]], *, by_attention: bool = False
):
    """A clone of ``model`` with joint attention on the DiT ``blocks`` (from ``dit_blocks``) that
    ``settings.chooses``; block replacements of other nodes are kept as ``previous``, those of an
    earlier Joint Attention are replaced. ``by_attention``: the family has no block replacements
    (``JointLayers``)."""
    diffusion_model = model.get_model_object("diffusion_model")
    patched = model.clone()
    rotation = offset_rotation(diffusion_model, settings.positions)
    if by_attention:
        wrapper = JointLayers(settings, [name for _, name in blocks], TokenGrid(diffusion_model), rotation=rotation)
    else:
        wrapper = TokenGrid(diffusion_model, settings)
        replacements = patched.model_options["transformer_options"].setdefault("patches_replace", {})
        replacements = replacements.setdefault("dit", {})  # the clone's own copy
        for index, ((kind, number), name) in enumerate(blocks):
            previous = replacements.pop((kind, number), None)
            if isinstance(previous, JointDitBlock):  # an earlier Joint Attention's
                previous = previous.previous
            if settings.chooses((name, index)):
                previous = JointDitBlock(settings, name, index, rotation=rotation, previous=previous)
            if previous is not None:
                replacements[(kind, number)] = previous
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    wrappers = patched.model_options["transformer_options"].setdefault("wrappers", {}).setdefault(apply_model, {})
    wrappers[TOKENS_KEY] = [wrapper]  # an earlier Joint Attention's is replaced
    return patched
