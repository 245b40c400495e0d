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
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

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
    return rearrange(x, "b t (h d) -> b h t d", h=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H * D]``."""
    return rearrange(x, "b h t d -> b t (h d)")


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
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
    references: int, strength: float | None = None, reference_masks: torch.Tensor | None = None, *, enabled: bool = True
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


@dataclass(frozen=True)
class JointAttentionSettings:
    """What a Joint Attention node chose: the defaults a call's layout may override, and when and
    where joint attention is active (the schedule, ``active_call``).

    Attributes:
        strength: see the module docstring; 0 = off.
        mode: ``"joint"`` or ``"blend"``.
        sigma_start, sigma_end: active while ``sigma_end <= sigma <= sigma_start``.
        blocks: block names (``input``, ``middle``, ``output``) where it is active: a UNet's
            down, middle and up blocks; a DiT's first, middle and last third of its blocks.
        adain_queries, adain_keys: StyleAligned AdaIN of the targets' queries / keys.
        reference_count: references at the start of each chunk when no layout says otherwise.
        positions: ``"offset"`` or ``"shared"`` (see ``POSITIONS``; RoPE DiTs only).
        reference_key_scale: factor on the reference keys the targets attend to (their logits
            scale with it: above 1 the targets attend to the references more sharply).
        block_indices: DiT blocks (indices in depth order, ``parse_block_list``) where it is
            active; ``None``: the ``blocks`` thirds decide.
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
    reference_key_scale: float = 1.0
    block_indices: frozenset | None = None

    def chooses(self, block: tuple[str, int]) -> bool:
        """Whether the block ``(name, index)`` is chosen: by its index where ``block_indices``
        is set, else by its name."""
        name, index = block
        return name in self.blocks if self.block_indices is None else index in self.block_indices

    def in_schedule(self, sigmas: torch.Tensor | float | None) -> bool:
        """Whether the call's ``sigmas`` (None: unknown) lie in the sigma window. A sigma is read
        only when a window is set: reading a GPU tensor waits for the GPU."""
        if sigmas is None or (self.sigma_start == math.inf and self.sigma_end <= 0):
            return True
        sigma = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
        return self.sigma_end <= sigma <= self.sigma_start


@dataclass(frozen=True, eq=False, kw_only=True)  # eq=False: == on a tensor field is no bool
class JointCall:
    """How the targets of one attention call attend to the references: the settings resolved
    against the call's layout (``active_call``), and the one settings object of
    ``joint_attention`` and ``token_attention``.

    Attributes:
        references: references at the start of every chunk (>= 1, < chunk size).
        chunks: cond/uncond chunks in the batch.
        strength: see the module docstring.
        mode: ``"joint"`` or ``"blend"``.
        adain_queries, adain_keys: AdaIN the targets' queries / keys to the references'.
        reference_keep: optional ``[references, Tk]`` bool, the reference tokens targets may
            attend to (subject masks; ``token_attention``: of the image tokens), or a slice of
            Tk, the same tokens of every reference; default all.
        key_scale: factor on the reference keys the targets see.
    """

    references: int
    chunks: int = 1
    strength: float = 1.0
    mode: str = "joint"
    adain_queries: bool = False
    adain_keys: bool = False
    reference_keep: torch.Tensor | slice | None = None
    key_scale: float = 1.0

    @property
    def adain(self) -> bool:
        return self.adain_queries or self.adain_keys


# ``(q, k, v) -> out``, all ``[B, T, H * D]``, the heads and options already bound.
BoundKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class AttentionKernels:
    """The kernels one call of ``joint_attention`` or ``token_attention`` computes with.

    Attributes:
        heads: H.
        attention: the plain attention.
        joint: the targets' attention over own + reference tokens (default ``attention``); lets
            a caller use a faster kernel for the longer key sets.
        upcast: float32 for the scaled joint mode's SDPA (ComfyUI's ``attn_precision``).
    """

    heads: int
    attention: BoundKernel
    joint: BoundKernel | None = None
    upcast: bool = False


def active_call(settings: JointAttentionSettings, batch: int, options: dict) -> JointCall | None:
    """The ``JointCall`` of an attention call over ``batch`` entries, or None where joint attention
    is off for it (the layout is disabled, strength is 0, fewer than 1 reference, the block is not
    chosen, sigma is outside the window, or a chunk has no room for a target).

    Reads ``LAYOUT_KEY`` (overrides of the reference count and strength, the on/off switch),
    ``cond_or_uncond`` (the chunks), ``block`` and ``sigmas`` from ``options``: a UNet patch's
    ``extra_options``, or a DiT block's ``transformer_options`` with its ``block`` added.
    """
    layout = options.get(LAYOUT_KEY) or {}
    references = int(layout.get("references", settings.reference_count))
    strength = float(layout.get("strength", settings.strength))
    chunks = max(1, len(options.get("cond_or_uncond") or [0]))
    block = options.get("block")
    if not layout.get("enabled", True) or strength == 0 or references < 1:
        return None
    if (block is not None and not settings.chooses(block)) or not settings.in_schedule(options.get("sigmas")):
        return None
    if batch % chunks or batch // chunks <= references:
        return None
    return JointCall(
        references=references,
        chunks=chunks,
        strength=strength,
        mode=settings.mode,
        adain_queries=settings.adain_queries,
        adain_keys=settings.adain_keys,
        key_scale=settings.reference_key_scale,
    )


def parse_block_list(text: str) -> frozenset[int] | None:
    """``"0-4, 10, 20-25"`` -> the block indices it names; ``None`` for an empty text.

    Raises:
        InputError: anything but comma-separated indices and ``first-last`` ranges.
    """
    indices = set()
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        first, _, last = part.partition("-")
        if not first.strip().isdigit() or (last and not last.strip().isdigit()):
            raise InputError(f"block list entry '{part}' is not an index or a range like 3-7")
        start, end = int(first), int(last or first)
        if end < start:
            raise InputError(f"block list range '{part}' runs backwards; write it as {end}-{start}")
        indices.update(range(start, end + 1))
    return frozenset(indices) if indices else None


def with_subject_masks(call: JointCall, options: dict, grid: tuple[int, int] | None) -> JointCall:
    """``call`` with ``reference_keep`` ``[references, h * w]`` from the layout's subject masks on
    the token ``grid`` ``(h, w)``; unchanged without masks, without a grid (the caller's tokens
    are not one), or with masks for another reference count."""
    masks = (options.get(LAYOUT_KEY) or {}).get("reference_masks")
    if masks is None or grid is None or masks.shape[0] != call.references:
        return call
    return replace(call, reference_keep=masks_to_tokens(masks, grid))


def chunk_rows(batch: int, call: JointCall, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch indices of the references and of the targets, ``[chunks * references]`` and
    ``[chunks * targets]``; ``InputError`` when a chunk has no room for a target."""
    per_chunk = batch // call.chunks
    if batch % call.chunks or call.references < 1 or per_chunk - call.references < 1:
        raise InputError(
            f"a batch of {batch} in {call.chunks} chunk(s) has no room for {call.references} reference(s) and at "
            "least one target"
        )
    rows = rearrange(torch.arange(batch, device=device), "(c n) -> c n", c=call.chunks)
    return rows[:, : call.references].reshape(-1), rows[:, call.references :].reshape(-1)


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    call: JointCall,
    kernels: AttentionKernels,
    plain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention of a joint batch in which targets also attend to the references.

    Args:
        q: ``[B, Tq, H * D]`` projected queries, B = ``chunks * (references + targets)``.
        k, v: ``[B, Tk, H * D]`` projected keys and values (Tk may differ from Tq, e.g. with
            token merging on the queries).
        call: references, chunks, strength, mode, AdaIN and subject tokens.
        kernels: the heads and the kernels to compute with.
        plain: optional ``[B, Tq, H * D]`` already computed plain attention of the whole batch
            (when another attention patch computes it); else computed with ``kernels.attention``.

    Returns:
        ``[B, Tq, H * D]``; reference rows equal plain attention.
    """
    batch, tokens_q, channels = q.shape
    references, chunks = call.references, call.chunks
    attention, joint = kernels.attention, kernels.joint or kernels.attention
    ref_rows, target_rows = chunk_rows(batch, call, q.device)
    per_chunk = batch // chunks
    targets = per_chunk - references

    q_c, k_c, v_c = (rearrange(x, "(c n) t d -> c n t d", c=chunks) for x in (q, k, v))
    q_t, k_t, v_t = q_c[:, references:], k_c[:, references:], v_c[:, references:]
    k_r, v_r, q_r = k_c[:, :references], v_c[:, :references], q_c[:, :references]
    if isinstance(call.reference_keep, slice):  # the same tokens of every reference: views, no mask
        k_r, v_r = (rearrange(x[:, :, call.reference_keep], "c r t d -> c (r t) d") for x in (k_r, v_r))
    elif call.reference_keep is not None:
        keep = call.reference_keep.to(k.device)
        k_r, v_r = k_r[:, keep], v_r[:, keep]  # [chunks, kept tokens, C]
    else:
        k_r, v_r = rearrange(k_r, "c r t d -> c (r t) d"), rearrange(v_r, "c r t d -> c (r t) d")

    if call.adain_queries:
        q_t = adain(q_t, rearrange(q_r, "c r t d -> c 1 (r t) d"))
    if call.adain_keys:
        k_t = adain(k_t, k_r.unsqueeze(1))
    if call.key_scale != 1.0:
        k_r = k_r * call.key_scale

    def flat(x):  # [chunks, targets, T, C] -> [chunks * targets, T, C]
        return rearrange(x, "c n t d -> (c n) t d")

    def per_target(x):  # [chunks, T, C] -> [chunks * targets, T, C], one copy per target
        return repeat(x, "c t d -> (c n) t d", n=targets)

    if plain is None:
        out = torch.empty_like(q)
        out[ref_rows] = attention(q[ref_rows], k[ref_rows], v[ref_rows])
        if call.mode == "blend" and not call.adain:
            out[target_rows] = attention(q[target_rows], k[target_rows], v[target_rows])
    else:
        out = plain.clone()
    out_t = out.view(chunks, per_chunk, tokens_q, channels)[:, references:]  # a view: written below

    if call.mode == "joint":
        keys = torch.cat([flat(k_t), per_target(k_r)], dim=1)
        values = torch.cat([flat(v_t), per_target(v_r)], dim=1)
        if call.strength == 1.0:
            attended = joint(flat(q_t), keys, values)
        else:
            bias = torch.zeros(keys.shape[1], device=q.device)
            bias[k_t.shape[2] :] = math.log(call.strength)
            attended = sdpa_attention(flat(q_t), keys, values, kernels.heads, key_bias=bias, upcast=kernels.upcast)
        out_t.copy_(attended.view_as(out_t))
    elif call.mode == "blend":
        own = attention(flat(q_t), flat(k_t), flat(v_t)) if call.adain else flat(out_t)
        to_refs = joint(flat(q_t), per_target(k_r), per_target(v_r))
        out_t.copy_(((1.0 - call.strength) * own + call.strength * to_refs).view_as(out_t))
    else:
        raise InputError(f"unknown mode '{call.mode}'; use one of {', '.join(MODES)}")
    return out


def chunk_spans(batch: int, call: JointCall) -> list[tuple[slice, slice]]:
    """Each chunk's rows as (references, targets) slices of the batch (``chunk_rows`` as
    slices, so indexing with them gives views, not copies)."""
    per_chunk = batch // call.chunks
    return [
        (slice(start, start + call.references), slice(start + call.references, start + per_chunk))
        for start in range(0, batch, per_chunk)
    ]


def outside_of(image: slice, tokens: int) -> slice | torch.Tensor | None:
    """The token positions not in ``image``: a slice where they are one run (text before or
    after the image tokens), else their indices; None when there are none."""
    start, stop, _ = image.indices(tokens)
    if start == 0 and stop == tokens:
        return None
    if start == 0:
        return slice(stop, tokens)
    if stop == tokens:
        return slice(0, start)
    return torch.cat([torch.arange(0, start), torch.arange(stop, tokens)])


def plain_outside_target_images(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: JointCall,
    image: slice,
    attention: BoundKernel,
) -> torch.Tensor:
    """Plain attention ``[B, T, H * D]`` of the references' rows and of the targets' queries
    outside ``image``; the targets' image queries are left at 0 (joint attention fills them).
    Chunk by chunk on views of q, k and v, so nothing of them is copied (at the peak of a
    sampling step, such copies were the joint batch's extra memory)."""
    out = torch.zeros_like(q)
    outside = outside_of(image, q.shape[1])
    for references, targets in chunk_spans(q.shape[0], call):
        out[references] = attention(q[references], k[references], v[references])
        if outside is not None:
            out[targets, outside] = attention(q[targets, outside], k[targets], v[targets])
    return out


def token_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    call: JointCall,
    kernels: AttentionKernels,
    image: slice,
    plain: torch.Tensor | None = None,
    reference_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Joint attention of a DiT's token sequence: only the targets' image tokens also see the
    references' image tokens; text tokens and references attend as before.

    Args:
        q, k, v: ``[B, T, H * D]``, T text and image tokens in one sequence (a DiT's joint
            attention), B = ``chunks * (references + targets)``.
        call: as in ``joint_attention``; its ``reference_keep`` is ``[references, image tokens]``,
            and AdaIN matches the targets' image queries and keys to the references' image tokens.
        kernels: as in ``joint_attention``.
        image: where the image tokens are in T (the same for queries and keys).
        plain: optional already computed plain attention ``[B, T, H * D]``. Without it the
            plain attention is computed where it is kept: in joint mode the references' rows and
            the targets' other (text) queries only, so the targets' image rows, which the joint
            attention replaces, are computed once.
        reference_k: optional ``[B, T, H * D]`` keys the targets see for the references' tokens
            (the references' own rows keep ``k``), e.g. rotated to positions of their own.

    Returns:
        ``[B, T, H * D]``: the plain attention except in the targets' image-token rows.
    """
    batch, tokens, channels = k.shape
    references, chunks = call.references, call.chunks
    ref_rows, target_rows = chunk_rows(batch, call, q.device)
    owned = plain is None  # made here, so written in place at the end
    if plain is None and call.mode == "joint":
        plain = plain_outside_target_images(q, k, v, call, image, kernels.attention)
    elif plain is None:  # blend mixes the targets' own attention in
        plain = kernels.attention(q, k, v)

    q_mod, k_mod, plain_mod = q, k, plain
    if call.adain:

        def matched(x):  # targets' image tokens to their chunk's references' image-token statistics
            x = x.clone()
            x_c = x.view(chunks, batch // chunks, tokens, channels)  # a view: written below
            style = rearrange(x_c[:, :references, image], "c r t d -> c 1 (r t) d")
            x_c[:, references:, image] = adain(x_c[:, references:, image], style)
            return x

        q_mod = matched(q) if call.adain_queries else q
        k_mod = matched(k) if call.adain_keys else k_mod
        if call.mode == "blend":  # the targets' own attention is taken with the matched queries and keys
            plain_mod = plain.clone()
            plain_mod[target_rows] = kernels.attention(q_mod[target_rows], k_mod[target_rows], v[target_rows])
    if reference_k is not None:
        k_mod = k_mod.clone() if k_mod is k else k_mod
        k_mod[ref_rows] = reference_k[ref_rows]
    if call.reference_keep is None:
        keep = image  # a slice: no data-dependent mask (a fake step, the memory check, can run it)
    else:
        keep = torch.zeros(references, tokens, dtype=torch.bool, device=q.device)
        keep[:, image] = call.reference_keep.to(q.device)
    image_out = joint_attention(
        q_mod[:, image].contiguous(),
        k_mod,
        v,
        call=replace(call, reference_keep=keep, adain_queries=False, adain_keys=False),  # matched above
        kernels=kernels,
        plain=plain_mod[:, image].contiguous(),
    )
    out = plain if owned else plain.clone()
    out[target_rows, image] = image_out[target_rows]
    return out
