"""ComfyUI's attention kernels as joint attention calls them, on UNets and DiTs alike."""

from __future__ import annotations

from comfy.ldm.modules.attention import attention_basic, attention_split, attention_sub_quad, optimized_attention

from ..pure.joint_attention import sdpa_kernel

# ComfyUI's fallback kernels (chosen where it enables no fused one, e.g. on CPU), unwrapped: an
# attention override is handed the function inside ComfyUI's ``wrap_attn`` decorator.
FALLBACK_KERNELS = tuple(
    getattr(kernel, "__wrapped__", kernel) for kernel in (attention_sub_quad, attention_split, attention_basic)
)


def is_fallback_kernel(kernel) -> bool:
    """Whether ``kernel`` (ComfyUI's ``optimized_attention``, or the function an attention override
    is handed) is one of ComfyUI's fallback kernels: sub-quadratic, split or basic. On CPU they are
    several times slower than PyTorch's fused SDPA and their memory grows with the key count, which
    joint attention doubles, so the targets' joint attention uses SDPA instead of them."""
    return getattr(kernel, "__wrapped__", kernel) in FALLBACK_KERNELS


def comfy_attention(q, k, v, heads, extra_options):
    """ComfyUI's own attention kernel (xformers, SDPA, sage, ... as the user chose)."""
    return optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


def joint_attention_kernel(q, k, v, heads, extra_options):
    """Kernel for the targets' attention over own + reference tokens: ComfyUI's own when it is a
    fused one (PyTorch SDPA, xformers, sage, flash) or overridden, PyTorch SDPA otherwise."""
    if is_fallback_kernel(optimized_attention) and "optimized_attention_override" not in extra_options:
        return sdpa_kernel(q, k, v, heads, extra_options)
    return comfy_attention(q, k, v, heads, extra_options)
