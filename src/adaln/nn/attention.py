"""Multi-head attention on channels-last tokens.

``Attention`` matches the timm ``Attention`` that facebookresearch/DiT models.py uses (parameter names
``qkv``, ``proj``; ``qkv`` output laid out ``[q; k; v]``, each with heads contiguous, i.e. timm's
``reshape(B, N, 3, H, d)``), so fb DiT weights load by name. ``CrossAttention`` matches PixArt-alpha's
``MultiHeadCrossAttention`` (``q_linear``, ``kv_linear`` laid out ``[k; v]``, ``proj``). Both run
``torch.nn.functional.scaled_dot_product_attention`` (softmax scale ``head_dim ** -0.5``) over the
flattened token axes of ``x`` (B, *spatial, C) and return x's shape. ``StreamAttention`` is one stream's
projections in the joint attention of MMDiT (SD3) and Flux, which their blocks run themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_tensor

QK_NORMS = (None, "layer", "rms")


def _qk_norm(kind: str | None, head_dim: int) -> nn.Module:
    """Per-head norm of q and k (SD3 / Lumina 2 style); eps 1e-6 as the DiT family."""
    if kind is None:
        return nn.Identity()
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    return nn.RMSNorm(head_dim, eps=1e-6)


def _check_heads(dim: int, num_heads: int, qk_norm: str | None) -> int:
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
    return dim // num_heads


def _check_x(x: Tensor, dim: int) -> Tensor:
    check_tensor(x, "x", min_dim=3)
    if x.shape[-1] != dim:
        raise ValueError(f"x must be (B, *spatial, {dim}) (channels-last), got {tuple(x.shape)}")
    return x


def _key_padding(mask: Tensor | None, batch: int, keys: int, key_shape: tuple[int, ...]) -> Tensor | None:
    """Validate a key-padding mask (True = keep) and view it as (B, 1, 1, keys)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = keep), got {getattr(mask, 'dtype', type(mask))}")
    if tuple(mask.shape) not in ((batch, keys), (batch, *key_shape)):
        raise ValueError(f"mask must be (B, N) = {(batch, keys)} over the keys, got {tuple(mask.shape)}")
    return mask.reshape(batch, 1, 1, keys)


def _attention_mask(
    bias: Tensor | None, keep: Tensor | None, shape: tuple[int, int, int, int], dtype: torch.dtype
) -> Tensor | None:
    """Fold an additive bias (B|1, H|1, Nq, Nk) and a key-padding mask into one SDPA ``attn_mask``."""
    b, h, nq, nk = shape
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.dim() != 4 or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, h) or (
            tuple(bias.shape[2:]) != (nq, nk)
        ):
            raise ValueError(
                f"bias must be (B or 1, H or 1, N, M) = ({b} or 1, {h} or 1, {nq}, {nk}), "
                f"got {tuple(bias.shape)}"
            )
        bias = bias.to(dtype)
    if keep is None:
        return bias
    if bias is None:
        return keep
    return torch.where(keep, bias, -math.inf)


class Attention(nn.Module):
    """Multi-head self-attention over every token axis of x (B, *spatial, C); timm/fb DiT layout.

    ``forward(x, bias=None, mask=None)``: ``bias`` is added to the logits, shape (B or 1, H or 1, N, N)
    with N the number of tokens; ``mask`` (B, N) or (B, *spatial) bool keeps the keys marked True.
    A query whose keys are all masked has no defined softmax (torch's math backend returns 0 there).
    The forward takes no ``conditioning`` argument: ``AdaLNZeroResidualBlock`` forwards the pooled
    condition only to mixers that declare one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        qk_norm: str | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads, qk_norm)
        self.dim, self.num_heads, self.attn_drop = dim, num_heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, bias: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        _check_x(x, self.dim)
        b, spatial, n = x.shape[0], tuple(x.shape[1:-1]), math.prod(x.shape[1:-1])
        keep = _key_padding(mask, b, n, spatial)
        qkv = self.qkv(x.reshape(b, n, self.dim)).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask = _attention_mask(bias, keep, (b, self.num_heads, n, n), q.dtype)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, self.dim)))
        return out.reshape(x.shape)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from x (B, *spatial, C), keys/values from context (B, M, Cc).

    PixArt-alpha ``MultiHeadCrossAttention`` layout (``q_linear``, ``kv_linear``, ``proj``), with the
    context width ``context_dim`` projected to ``dim`` by ``kv_linear``. ``forward(x, context,
    mask=None)``: ``mask`` (B, M) bool keeps the context tokens marked True (text padding).
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        qk_norm: str | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads, qk_norm)
        self.dim, self.context_dim, self.num_heads, self.attn_drop = dim, context_dim, num_heads, attn_drop
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        _check_x(x, self.dim)
        check_tensor(context, "context", min_dim=3)
        b, n = x.shape[0], math.prod(x.shape[1:-1])
        if context.dim() != 3 or context.shape[0] != b or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context must be (B, M, context_dim) = ({b}, M, {self.context_dim}), "
                f"got {tuple(context.shape)}"
            )
        m = context.shape[1]
        keep = _key_padding(mask, b, m, (m,))
        q = self.q_linear(x.reshape(b, n, self.dim)).reshape(b, n, self.num_heads, self.head_dim)
        kv = self.kv_linear(context).reshape(b, m, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, M, d)
        q, k = self.q_norm(q.transpose(1, 2)), self.k_norm(k)
        attn_mask = _attention_mask(None, keep, (b, self.num_heads, n, m), q.dtype)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, self.dim)))
        return out.reshape(x.shape)


class StreamAttention(nn.Module):
    """One stream's projections in a joint attention (Stability ``SelfAttention`` in SD3's mmditx.py, BFL
    ``SelfAttention`` in Flux): ``qkv`` laid out ``[q; k; v]`` with heads contiguous (as ``Attention``),
    per-head ``q_norm`` / ``k_norm`` (``"rms"``: weighted RMSNorm eps 1e-6, BFL ``QKNorm``, diffusers
    ``norm_q`` / ``norm_k``) and the output ``proj`` (None for a pre-only stream).
    x (B, N, dim) -> q, k, v (B, heads, N, head_dim); the block runs the attention over both streams.
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: str | None = "rms", pre_only: bool = False) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def heads(self, x: Tensor, *, queries: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
        """(q, k, v), each (B, heads, N, head_dim); q is None when ``queries`` is False."""
        b, n = x.shape[:2]
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return (self.q_norm(q) if queries else None), self.k_norm(k), v
