"""JeDi-style joint attention, training-free: targets' self-attention also sees the references.

Layout: every cond/uncond chunk holds the references first, then the targets; targets attend to
their own tokens plus their chunk's references, references only to themselves; the count travels
in ``transformer_options[LAYOUT_KEY]``. Strength (0 = off, bit-identical): ``"joint"`` adds
``log(strength)`` to the reference logits of one softmax; ``"blend"`` (RefDrop) gives
``(1 - c) * Attn(q, K, V) + c * Attn(q, K_ref, V_ref)``, c in [-1, 1]. Kernels are passed in.

Formulas and choices (layout contract, AdaIN, masks): docs/algorithms.md, section 'Joint-image sampling (JeDi)'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import InputError

# Key in ``transformer_options`` (and so in the patch's ``extra_options``) holding the layout.
LAYOUT_KEY = "prefp_joint_layout"

MODES = ("joint", "blend")
BLOCK_NAMES = ("input", "middle", "output")
# Where a RoPE DiT (Flux) places the reference tokens the targets see: at positions of their own
# (one step along the index axis, as Flux Kontext places reference latents) or on the targets' own
# grid positions (the new images then tend to copy the references' layout).
POSITIONS = ("offset", "shared")

# ``kernel(q, k, v, heads, extra_options) -> out``, all ``[B, T, heads * dim_head]``.
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], torch.Tensor]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, H * D]`` -> ``[B, H, T, D]``."""
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, heads, channels // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H * D]``."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    key_bias: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention with an optional additive bias per key.

    Args:
        q: ``[B, Tq, H * D]``.
        k, v: ``[B, Tk, H * D]``.
        heads: H.
        key_bias: optional ``[Tk]`` added to every query's logits for that key.
        upcast: compute in float32 (ComfyUI's ``attn_precision``), return in q's dtype.

    Returns:
        ``[B, Tq, H * D]``.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    mask = None if key_bias is None else key_bias.to(device=q.device, dtype=q.dtype).view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), attn_mask=mask
    )
    return merge_heads(out).to(dtype)


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict | None = None):
    """An ``AttentionKernel`` over plain PyTorch SDPA (used by the tests and as a default)."""
    upcast = (extra_options or {}).get("attn_precision") == torch.float32
    return sdpa_attention(q, k, v, heads, upcast=upcast)


def adain(x: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance norm over tokens: give ``x`` the per-channel mean and std of ``style``.

    Args:
        x: ``[..., T, C]``.
        style: ``[..., Ts, C]`` broadcastable to ``x`` except in the token dimension.

    Returns:
        ``[..., T, C]``: ``(x - mean_x) / std_x * std_style + mean_style``.
    """
    x_mean, x_std = x.mean(dim=-2, keepdim=True), x.std(dim=-2, keepdim=True, correction=0)
    s_mean, s_std = style.mean(dim=-2, keepdim=True), style.std(dim=-2, keepdim=True, correction=0)
    return (x - x_mean) / (x_std + eps) * s_std + s_mean


def masks_to_tokens(masks: torch.Tensor, grid: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Which tokens of each reference are subject, on a transformer block's token grid.

    Args:
        masks: ``[R, H, W]`` subject masks in 0..1 (any resolution).
        grid: ``(h, w)`` of the block's activations (``h * w`` tokens, row-major).
        threshold: a token is kept when at least this fraction of it is covered.

    Returns:
        ``[R, h * w]`` bool; a reference whose mask covers no token keeps its best-covered one.
    """
    coverage = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), grid).flatten(1)
    keep = coverage >= threshold
    empty = ~keep.any(dim=1)
    if empty.any():
        best = coverage.argmax(dim=1)
        keep[empty, best[empty]] = True
    return keep


def joint_layout(
    references: int, strength: float | None = None, reference_masks: torch.Tensor | None = None, enabled: bool = True
) -> dict:
    """The ``transformer_options[LAYOUT_KEY]`` entry a joint sampler writes.

    Args:
        references: how many entries at the start of every cond/uncond chunk are references.
        strength: overrides the patch's strength when given.
        reference_masks: optional ``[references, H, W]`` subject masks (1 = subject).
        enabled: False turns the patch off for this call (the "without references" pass of
            image guidance).
    """
    if references < 0:
        raise InputError(f"the reference count must be >= 0, got {references}")
    if reference_masks is not None and reference_masks.shape[0] != references:
        raise InputError(f"got {reference_masks.shape[0]} reference masks for {references} references")
    layout = {"references": int(references), "enabled": bool(enabled)}
    if strength is not None:
        layout["strength"] = float(strength)
    if reference_masks is not None:
        layout["reference_masks"] = reference_masks
    return layout


def check_strength(mode: str, strength: float) -> None:
    """Raise ``InputError`` with the fix when ``strength`` is outside ``mode``'s range."""
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}")
    if mode == "joint" and strength < 0:
        raise InputError(
            f"strength {strength} is negative; negative strength (pushing away from the references) needs mode 'blend'"
        )
    if mode == "blend" and not -1.0 <= strength <= 1.0:
        raise InputError(f"strength {strength} is outside [-1, 1], the range of mode 'blend'")


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    references: int,
    chunks: int,
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    strength: float = 1.0,
    mode: str = "joint",
    plain: torch.Tensor | None = None,
    adain_queries: bool = False,
    adain_keys: bool = False,
    reference_keep: torch.Tensor | None = None,
    upcast: bool = False,
    joint: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Self-attention of a joint batch in which targets also attend to the references.

    Args:
        q: ``[B, Tq, H * D]`` projected queries, B = ``chunks * (references + targets)``.
        k, v: ``[B, Tk, H * D]`` projected keys and values (Tk may differ from Tq, e.g. with
            token merging on the queries).
        heads: H.
        references: references at the start of every chunk (>= 1, < chunk size).
        chunks: number of cond/uncond chunks in the batch.
        attention: ``(q, k, v) -> out``, the plain attention kernel.
        strength: see the module docstring.
        mode: ``"joint"`` or ``"blend"``.
        plain: optional ``[B, Tq, H * D]`` already computed plain attention of the whole batch
            (when another attention patch computes it); else computed with ``attention``.
        adain_queries, adain_keys: AdaIN the targets' queries / keys to the references'.
        reference_keep: optional ``[references, Tk]`` bool, the reference tokens targets may
            attend to (subject masks); default all.
        upcast: float32 attention for the scaled joint mode.
        joint: ``(q, k, v) -> out`` for the targets' attention to the references (default
            ``attention``); lets a caller use a faster kernel for the longer key sets.

    Returns:
        ``[B, Tq, H * D]``; reference rows equal plain attention.
    """
    batch, tokens_q, channels = q.shape
    joint = joint or attention
    per_chunk = batch // chunks
    targets = per_chunk - references
    if batch % chunks or references < 1 or targets < 1:
        raise InputError(
            f"a batch of {batch} in {chunks} chunk(s) has no room for {references} reference(s) and at least one target"
        )

    def chunked(x):  # [B, T, C] -> [chunks, per_chunk, T, C]
        return x.view(chunks, per_chunk, x.shape[1], channels)

    q_c, k_c, v_c = chunked(q), chunked(k), chunked(v)
    q_t, k_t, v_t = q_c[:, references:], k_c[:, references:], v_c[:, references:]
    k_r, v_r, q_r = k_c[:, :references], v_c[:, :references], q_c[:, :references]
    if reference_keep is not None:
        k_r, v_r = k_r[:, reference_keep], v_r[:, reference_keep]  # [chunks, kept tokens, C]
    else:
        k_r, v_r = k_r.reshape(chunks, -1, channels), v_r.reshape(chunks, -1, channels)

    if adain_queries:
        q_t = adain(q_t, q_r.reshape(chunks, 1, -1, channels))
    if adain_keys:
        k_t = adain(k_t, k_r.unsqueeze(1))

    def flat(x):  # [chunks, targets, T, C] -> [chunks * targets, T, C]
        return x.reshape(chunks * targets, x.shape[2], channels)

    def per_target(x):  # [chunks, T, C] -> [chunks * targets, T, C], one copy per target
        return x.unsqueeze(1).expand(-1, targets, -1, -1).reshape(chunks * targets, x.shape[1], channels)

    if plain is None:
        rows = torch.arange(batch, device=q.device).view(chunks, per_chunk)
        ref_rows = rows[:, :references].reshape(-1)
        out = torch.empty_like(q)
        out[ref_rows] = attention(q[ref_rows], k[ref_rows], v[ref_rows])
        if mode == "blend" and not (adain_queries or adain_keys):
            target_rows = rows[:, references:].reshape(-1)
            out[target_rows] = attention(q[target_rows], k[target_rows], v[target_rows])
    else:
        out = plain.clone()
    out_t = out.view(chunks, per_chunk, tokens_q, channels)[:, references:]

    if mode == "joint":
        keys = torch.cat([flat(k_t), per_target(k_r)], dim=1)
        values = torch.cat([flat(v_t), per_target(v_r)], dim=1)
        if strength == 1.0:
            attended = joint(flat(q_t), keys, values)
        else:
            bias = torch.zeros(keys.shape[1], device=q.device)
            bias[k_t.shape[2] :] = math.log(strength)
            attended = sdpa_attention(flat(q_t), keys, values, heads, key_bias=bias, upcast=upcast)
        out_t.copy_(attended.view_as(out_t))
    elif mode == "blend":
        own = flat(out_t) if not (adain_queries or adain_keys) else attention(flat(q_t), flat(k_t), flat(v_t))
        to_refs = joint(flat(q_t), per_target(k_r), per_target(v_r))
        out_t.copy_(((1.0 - strength) * own + strength * to_refs).view_as(out_t))
    else:
        raise InputError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}")
    return out


def token_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    references: int,
    chunks: int,
    image: slice,
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    strength: float = 1.0,
    mode: str = "joint",
    plain: torch.Tensor | None = None,
    adain_queries: bool = False,
    adain_keys: bool = False,
    reference_keep: torch.Tensor | None = None,
    upcast: bool = False,
    joint: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    reference_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Joint attention of a DiT's token sequence: only the targets' image tokens also see the
    references' image tokens; text tokens and references attend as before.

    Args:
        q, k, v: ``[B, T, H * D]``, T text and image tokens in one sequence (a DiT's joint
            attention), B = ``chunks * (references + targets)``.
        image: where the image tokens are in T (the same for queries and keys).
        reference_keep: optional ``[references, image tokens]`` bool, the reference image tokens
            targets may attend to (subject masks); default all.
        reference_k: optional ``[B, T, H * D]`` keys the targets see for the references' tokens
            (the references' own rows keep ``k``), e.g. rotated to positions of their own.
        plain: optional already computed plain attention ``[B, T, H * D]``.
        The rest: as ``joint_attention``; AdaIN matches the targets' image queries and keys to the
        references' image tokens.

    Returns:
        ``[B, T, H * D]``: equal to ``plain`` except in the targets' image-token rows.
    """
    batch, tokens, channels = k.shape
    per_chunk = batch // chunks
    if batch % chunks or references < 1 or per_chunk - references < 1:
        raise InputError(
            f"a batch of {batch} in {chunks} chunk(s) has no room for {references} reference(s) and at least one target"
        )
    plain = attention(q, k, v) if plain is None else plain
    rows = torch.arange(batch, device=q.device).view(chunks, per_chunk)
    ref_rows, target_rows = rows[:, :references].reshape(-1), rows[:, references:].reshape(-1)

    q_mod, k_mod, plain_mod = q, k.clone(), plain
    if adain_queries or adain_keys:

        def matched(x):  # targets' image tokens to their chunk's references' image-token statistics
            x = x.clone()
            x_c = x.view(chunks, per_chunk, tokens, channels)
            style = x_c[:, :references, image].reshape(chunks, 1, -1, channels)
            x_c[:, references:, image] = adain(x_c[:, references:, image], style)
            return x

        q_mod = matched(q) if adain_queries else q
        k_mod = matched(k) if adain_keys else k_mod
        if mode == "blend":  # the targets' own attention is taken with the matched queries and keys
            plain_mod = plain.clone()
            plain_mod[target_rows] = attention(q_mod[target_rows], k_mod[target_rows], v[target_rows])
    if reference_k is not None:
        k_mod[ref_rows] = reference_k[ref_rows]
    keep = torch.zeros(references, tokens, dtype=torch.bool, device=q.device)
    keep[:, image] = True if reference_keep is None else reference_keep.to(q.device)
    image_out = joint_attention(
        q_mod[:, image].contiguous(),
        k_mod,
        v,
        heads,
        references,
        chunks,
        attention=attention,
        strength=strength,
        mode=mode,
        plain=plain_mod[:, image].contiguous(),
        reference_keep=keep,
        upcast=upcast,
        joint=joint,
    )
    out = plain.clone()
    out[target_rows, image] = image_out[target_rows]
    return out


@dataclass(frozen=True)
class JointAttentionSettings:
    """What a Joint Attention patch does when the layout does not override it.

    Attributes:
        strength: see the module docstring; 0 = off.
        mode: ``"joint"`` or ``"blend"``.
        sigma_start, sigma_end: active while ``sigma_end <= sigma <= sigma_start``.
        blocks: block names (``input``, ``middle``, ``output``) where it is active: a UNet's
            down, middle and up blocks; a DiT's first, middle and last third of its blocks.
        adain_queries, adain_keys: StyleAligned AdaIN of the targets' queries / keys.
        reference_count: references at the start of each chunk when no layout says otherwise.
        positions: ``"offset"`` or ``"shared"`` (see ``POSITIONS``; RoPE DiTs only).
    """

    strength: float = 1.0
    mode: str = "joint"
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    blocks: frozenset = field(default_factory=lambda: frozenset(BLOCK_NAMES))
    adain_queries: bool = False
    adain_keys: bool = False
    reference_count: int = 1
    positions: str = "offset"


class JointAttentionPatch:
    """A self-attention replacement (ComfyUI ``attn1_replace`` signature) doing joint attention.

    ``patch(q, k, v, extra_options) -> out`` with projected ``[B, T, H * D]`` tensors. Reads
    ``n_heads``, ``cond_or_uncond``, ``sigmas``, ``block``, ``activations_shape``,
    ``attn_precision`` and ``LAYOUT_KEY`` from ``extra_options``.

    Args:
        settings: the defaults (strength, mode, schedule, blocks, AdaIN, reference count).
        kernel: the plain attention kernel, ``kernel(q, k, v, heads, extra_options)``.
        previous: an attention replacement that was already on this block; it keeps computing
            the plain attention (references, and everything while the patch is inactive), so
            patches compose instead of replacing each other.
        joint_kernel: kernel for the targets' attention over own + reference tokens (default
            ``kernel``).
    """

    def __init__(
        self,
        settings: JointAttentionSettings,
        kernel: AttentionKernel = sdpa_kernel,
        previous: Callable | None = None,
        joint_kernel: AttentionKernel | None = None,
    ):
        self.settings = settings
        self.kernel = kernel
        self.previous = previous
        self.joint_kernel = joint_kernel or kernel

    def plain(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return self.kernel(q, k, v, extra_options["n_heads"], extra_options)

    def active_references(self, batch: int, extra_options: dict) -> tuple[int, int, float]:
        """``(references, chunks, strength)`` for this call; references = 0 means inactive."""
        settings = self.settings
        layout = extra_options.get(LAYOUT_KEY) or {}
        references = int(layout.get("references", settings.reference_count))
        strength = float(layout.get("strength", settings.strength))
        chunks = max(1, len(extra_options.get("cond_or_uncond") or [0]))
        if not layout.get("enabled", True) or strength == 0 or references < 1:
            return 0, chunks, strength
        block = extra_options.get("block")
        if block is not None and block[0] not in settings.blocks:
            return 0, chunks, strength
        sigmas = extra_options.get("sigmas")
        scheduled = settings.sigma_start != math.inf or settings.sigma_end > 0
        if sigmas is not None and scheduled:  # reading a GPU sigma waits for the GPU: only when it matters
            sigma = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
            if not settings.sigma_end <= sigma <= settings.sigma_start:
                return 0, chunks, strength
        if batch % chunks or batch // chunks <= references:
            return 0, chunks, strength
        return references, chunks, strength

    def reference_keep(self, extra_options: dict, tokens: int, references: int) -> torch.Tensor | None:
        masks = (extra_options.get(LAYOUT_KEY) or {}).get("reference_masks")
        shape = extra_options.get("activations_shape")
        if masks is None or shape is None or shape[-2] * shape[-1] != tokens or masks.shape[0] != references:
            return None
        return masks_to_tokens(masks, (shape[-2], shape[-1]))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        references, chunks, strength = self.active_references(q.shape[0], extra_options)
        if references == 0:
            return self.plain(q, k, v, extra_options)
        settings = self.settings
        heads = extra_options["n_heads"]
        plain = self.plain(q, k, v, extra_options) if self.previous is not None else None
        keep = self.reference_keep(extra_options, k.shape[1], references)
        if keep is not None:
            keep = keep.to(q.device)
        return joint_attention(
            q,
            k,
            v,
            heads,
            references,
            chunks,
            attention=lambda q_, k_, v_: self.kernel(q_, k_, v_, heads, extra_options),
            joint=lambda q_, k_, v_: self.joint_kernel(q_, k_, v_, heads, extra_options),
            strength=strength,
            mode=settings.mode,
            plain=plain,
            adain_queries=settings.adain_queries,
            adain_keys=settings.adain_keys,
            reference_keep=keep,
            upcast=extra_options.get("attn_precision") == torch.float32,
        )
