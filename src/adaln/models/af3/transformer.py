"""AlphaFold3 diffusion transformer (Algorithms 23-25 and the atom transformer of Algorithm 7).

Matches google-deepmind/alphafold3 ``model/network/diffusion_transformer.py``: ``transition_block``
(ConditionedTransition), ``self_attention`` (AttentionPairBias), ``Transformer`` (DiffusionTransformer),
``cross_attention`` (CrossAttention) and ``CrossAttTransformer``. The official functions are unbatched;
ours accept any leading dims ``(..., N, C)``. Attention logits and softmax run in fp32 or higher.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_tensor
from adaln.models.af3.params import (
    LAYER_STACK,
    Entry,
    adaptive_layernorm_entries,
    adaptive_zero_init_entries,
    linear_entries,
    norm_entries,
    stack_entries,
)
from adaln.nn.adaln import AdaptiveZeroInit, AF3AdaptiveLayerNorm

# scipy.stats.truncnorm.std(a=-2, b=2): haiku_modules.TRUNCATED_NORMAL_STDDEV_FACTOR.
TRUNCATED_NORMAL_STDDEV_FACTOR = 0.87962566103423978
INITS = ("linear", "relu", "zeros")


# --------------------------------------------------------------------------------------------------
# Layers shared by every AF3 module: hm.Linear initialisers and hm.LayerNorm
# --------------------------------------------------------------------------------------------------


def af3_init_(weight: Tensor, init: str = "linear") -> Tensor:
    """hm.Linear initialisers: fan-in truncated normal (±2σ, σ corrected for the truncation).

    'linear': variance 1/fan_in; 'relu': 2/fan_in; 'zeros'.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "zeros":
        return nn.init.zeros_(weight)
    std = math.sqrt((2.0 if init == "relu" else 1.0) / weight.shape[1]) / TRUNCATED_NORMAL_STDDEV_FACTOR
    return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


def af3_linear(in_dim: int, out_dim: int, *, bias: bool = False, init: str = "linear") -> nn.Linear:
    """hm.Linear: no bias unless asked (bias initialised to 0), weights initialised by name."""
    linear = nn.Linear(in_dim, out_dim, bias=bias)
    af3_init_(linear.weight, init)
    if bias:
        nn.init.zeros_(linear.bias)
    return linear


class AF3LayerNorm(nn.LayerNorm):
    """hm.LayerNorm(use_fast_variance=False): eps 1e-5; (b)f16 inputs are normalised in fp32 ('upcast')."""

    def __init__(self, dim: int, *, scale: bool = True, offset: bool = False):
        super().__init__(dim, eps=1e-5, elementwise_affine=scale, bias=offset)

    def forward(self, x: Tensor) -> Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(ct)
        b = None if self.bias is None else self.bias.to(ct)
        return F.layer_norm(x.to(ct), self.normalized_shape, w, b, self.eps).to(x.dtype)


def check_features(x: object, name: str, dim: int, min_dim: int = 2) -> Tensor:
    """``x`` must be a floating tensor ``(..., dim)`` with at least ``min_dim`` dims."""
    check_tensor(x, name, min_dim=min_dim)
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must have {dim} channels in its last dim, got shape {tuple(x.shape)}")
    return x


def check_cond(cond: object, x: Tensor, cond_dim: int | None, name: str = "cond") -> Tensor | None:
    """A per-token condition ``(..., N, cond_dim)`` broadcastable to ``x``'s leading dims, viewed at them."""
    if cond_dim is None:
        if cond is not None:
            raise ValueError(f"{name} must be None: the module was built with cond_dim=None")
        return None
    if cond is None:
        raise ValueError(f"{name} is required: the module was built with cond_dim={cond_dim}")
    check_features(cond, name, cond_dim, min_dim=1)
    try:
        return cond.expand(*x.shape[:-1], cond_dim)
    except RuntimeError:
        raise ValueError(
            f"{name} must be (..., N, {cond_dim}) broadcastable to x's {tuple(x.shape[:-1])}, "
            f"got {tuple(cond.shape)}"
        ) from None


def check_mask(mask: object, x: Tensor, name: str = "mask") -> Tensor:
    """A token mask ``(..., N)`` broadcastable to ``x.shape[:-1]`` (None: all valid), in fp32 or wider."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=dtype, device=x.device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    try:
        return mask.to(dtype).expand(x.shape[:-1])
    except RuntimeError:
        expected = tuple(x.shape[:-1])
        raise ValueError(f"{name} must be broadcastable to {expected}, got {tuple(mask.shape)}") from None


def check_devices(module: nn.Module, **tensors: object) -> None:
    """Every given tensor on the module's device, else ``ValueError`` naming the argument."""
    ref = next(module.parameters())
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.device != ref.device:
            raise ValueError(
                f"{name} is on device {t.device}, but the {type(module).__name__} parameters are on "
                f"{ref.device}: move the input or the module"
            )


def check_inputs(module: nn.Module, **tensors: object) -> None:
    """Every given tensor on the module's device and, if floating, in its dtype (outside autocast).

    Raises ``ValueError`` (device) or ``TypeError`` (dtype) naming the argument, so a mismatch never
    surfaces as a matmul error deep inside the module.
    """
    check_devices(module, **tensors)
    dtype = next(module.parameters()).dtype
    for name, t in tensors.items():
        # Under autocast the matmuls run in the autocast dtype whatever the input dtype.
        if (
            isinstance(t, Tensor)
            and t.is_floating_point()
            and t.dtype != dtype
            and not torch.is_autocast_enabled(t.device.type)
        ):
            raise TypeError(
                f"{name} has dtype {t.dtype}, but the {type(module).__name__} parameters are {dtype}: "
                f"cast the input or the module (module.to({t.dtype})), or run under torch.autocast"
            )


def attend(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, bias: Tensor, pair_logits: Tensor | None
) -> Tensor:
    """softmax((q d^-1/2)·k + bias + pair_logits)·v per head.

    q: (..., Q, H*d); k, v: (..., K, H*d); bias, pair_logits: broadcastable to (..., H, Q, K).
    """
    # "Gradient norms can blow up without running this einsum in float32" (official comment).
    ct = torch.promote_types(q.dtype, torch.float32)
    qh = q.unflatten(-1, (num_heads, -1)).to(ct)
    kh = k.unflatten(-1, (num_heads, -1)).to(ct)
    logits = torch.einsum("...qhc,...khc->...hqk", qh * qh.shape[-1] ** -0.5, kh) + bias.to(ct)
    if pair_logits is not None:
        logits = logits + pair_logits.to(ct)
    weights = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.einsum("...hqk,...khc->...qhc", weights, v.unflatten(-1, (num_heads, -1)))
    return out.flatten(-2)


# --------------------------------------------------------------------------------------------------
# Token-level blocks: Algorithms 23-25
# --------------------------------------------------------------------------------------------------


class ConditionedTransition(nn.Module):
    """Algorithm 25 as implemented (``transition_block``): AdaLN -> SwiGLU -> AdaptiveZeroInit.

    ``b = swish(a1) * a2`` with ``[a1, a2] = LinearNoBias(AdaLN(x, cond))`` of width ``2 * factor * C``
    ('relu' init); returns ``AdaptiveZeroInit(b, cond)``. x: (..., N, C); cond: (..., N, Cc) or None.
    Returns the residual update (..., N, C).
    """

    def __init__(self, dim: int, cond_dim: int | None = None, factor: int = 2):
        super().__init__()
        self.dim, self.cond_dim, hidden = dim, cond_dim, factor * dim
        self.adaptive_layernorm = AF3AdaptiveLayerNorm(dim, cond_dim)
        self.transition1 = af3_linear(dim, 2 * hidden, init="relu")
        self.adaptive_zero_init = AdaptiveZeroInit(hidden, dim, cond_dim)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        check_features(x, "x", self.dim)
        cond = check_cond(cond, x, self.cond_dim)
        check_inputs(self, x=x, cond=cond)
        a, b = self.transition1(self.adaptive_layernorm(x, cond)).chunk(2, dim=-1)
        return self.adaptive_zero_init(F.silu(a) * b, cond)

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        return {
            **adaptive_layernorm_entries(self.adaptive_layernorm, f"{prefix}ffw_"),
            **linear_entries(f"{prefix}ffw_transition1", self.transition1),
            **adaptive_zero_init_entries(self.adaptive_zero_init, f"{prefix}ffw_"),
        }


class AttentionPairBias(nn.Module):
    """Algorithm 24 as implemented (``self_attention``): gated multi-head attention with pair logits.

    q = Linear(AdaLN(x)) (with bias), k, v = LinearNoBias(AdaLN(x)); logits (fp32) =
    (q d^-1/2)·k + 1e9 (mask_k - 1) + pair_logits; output gated by sigmoid(LinearNoBias(AdaLN(x)))
    (zero init: the official ``gating_query`` has ``bias_init=1`` but no bias) and passed through
    AdaptiveZeroInit. ``key_dim`` / ``value_dim`` (all heads together) default to ``dim``, as
    ``SelfAttentionConfig``'s None does. x: (..., N, C); cond: (..., N, Cc) or None; mask: (..., N);
    pair_logits: (..., H, N, N). Returns the residual update (..., N, C).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int | None = None,
        num_heads: int = 16,
        *,
        key_dim: int | None = None,
        value_dim: int | None = None,
    ):
        super().__init__()
        for name, width in (("key_dim", key_dim), ("value_dim", value_dim)):
            if (dim if width is None else width) % num_heads:
                name = f"dim ({dim}, the default {name})" if width is None else f"{name} ({width})"
                raise ValueError(f"{name} must be divisible by num_heads ({num_heads})")
        key_dim = dim if key_dim is None else key_dim
        value_dim = dim if value_dim is None else value_dim
        self.dim, self.cond_dim, self.num_heads = dim, cond_dim, num_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.adaptive_layernorm = AF3AdaptiveLayerNorm(dim, cond_dim)
        self.q_projection = af3_linear(dim, key_dim, bias=True)
        self.k_projection = af3_linear(dim, key_dim)
        self.v_projection = af3_linear(dim, value_dim)
        self.gating_query = af3_linear(dim, value_dim, init="zeros")
        self.adaptive_zero_init = AdaptiveZeroInit(value_dim, dim, cond_dim)

    def forward(
        self,
        x: Tensor,
        cond: Tensor | None = None,
        mask: Tensor | None = None,
        pair_logits: Tensor | None = None,
    ) -> Tensor:
        check_features(x, "x", self.dim)
        cond = check_cond(cond, x, self.cond_dim)
        check_inputs(self, x=x, cond=cond, pair_logits=pair_logits)
        check_devices(self, mask=mask)
        mask = check_mask(mask, x)
        n = x.shape[-2]
        if pair_logits is not None:
            check_tensor(pair_logits, "pair_logits", min_dim=3)
            if pair_logits.shape[-3:] != (self.num_heads, n, n):
                raise ValueError(
                    f"pair_logits must be (..., {self.num_heads}, {n}, {n}), got {tuple(pair_logits.shape)}"
                )
        bias = (1e9 * (mask - 1.0))[..., None, None, :]
        xn = self.adaptive_layernorm(x, cond)
        q, k, v = self.q_projection(xn), self.k_projection(xn), self.v_projection(xn)
        out = attend(q, k, v, self.num_heads, bias, pair_logits)
        out = out * torch.sigmoid(self.gating_query(xn))
        return self.adaptive_zero_init(out, cond)

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        keys = (self.num_heads, self.key_dim // self.num_heads)
        values = (self.num_heads, self.value_dim // self.num_heads)
        return {
            **adaptive_layernorm_entries(self.adaptive_layernorm, prefix),
            **linear_entries(f"{prefix}q_projection", self.q_projection, out_shape=keys),
            **linear_entries(f"{prefix}k_projection", self.k_projection, out_shape=keys),
            **linear_entries(f"{prefix}v_projection", self.v_projection, out_shape=values),
            **linear_entries(f"{prefix}gating_query", self.gating_query),
            **adaptive_zero_init_entries(self.adaptive_zero_init, prefix),
        }


class DiffusionTransformerBlock(nn.Module):
    """One block of Algorithm 23: ``a += AttentionPairBias(a); a += ConditionedTransition(a)``."""

    def __init__(
        self,
        dim: int,
        cond_dim: int | None,
        num_heads: int,
        *,
        transition_factor: int = 2,
        key_dim: int | None = None,
        value_dim: int | None = None,
    ):
        super().__init__()
        self.attention = AttentionPairBias(dim, cond_dim, num_heads, key_dim=key_dim, value_dim=value_dim)
        self.transition = ConditionedTransition(dim, cond_dim, transition_factor)

    def forward(self, x: Tensor, cond: Tensor | None, mask: Tensor, pair_logits: Tensor | None) -> Tensor:
        x = x + self.attention(x, cond, mask, pair_logits)
        return x + self.transition(x, cond)

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        return {**self.attention._af3_entries(prefix), **self.transition._af3_entries(prefix)}


class DiffusionTransformer(nn.Module):
    """Algorithm 23 as implemented (``Transformer``): blocks grouped in super-blocks.

    One pair LayerNorm (scale, no offset) is shared by all blocks; each super-block of
    ``super_block_size`` blocks has one LinearNoBias(c_pair -> super_block_size x num_heads) giving the
    pair logits of its blocks (Protenix and alphafold3-pytorch have a LayerNorm + projection per block;
    :mod:`adaln.models.af3.ports` folds them). ``transition_factor`` (``num_intermediate_factor``),
    ``key_dim`` and ``value_dim`` (``SelfAttentionConfig``; None = c_token) default to the official
    config. x: (..., N, c_token); cond: (..., N, c_single); pair: (..., N, N, c_pair); mask: (..., N).
    """

    _af3_scoped = True

    def __init__(
        self,
        c_token: int = 768,
        c_single: int | None = 384,
        c_pair: int = 128,
        num_blocks: int = 24,
        num_heads: int = 16,
        super_block_size: int = 4,
        *,
        transition_factor: int = 2,
        key_dim: int | None = None,
        value_dim: int | None = None,
    ):
        super().__init__()
        if num_blocks % super_block_size:
            raise ValueError(
                f"num_blocks ({num_blocks}) must be a multiple of super_block_size ({super_block_size})"
            )
        self.c_token, self.c_single, self.c_pair = c_token, c_single, c_pair
        self.num_heads, self.super_block_size = num_heads, super_block_size
        self.pair_input_layer_norm = AF3LayerNorm(c_pair)
        self.pair_logits_projection = nn.ModuleList(
            af3_linear(c_pair, super_block_size * num_heads) for _ in range(num_blocks // super_block_size)
        )
        self.blocks = nn.ModuleList(
            DiffusionTransformerBlock(
                c_token, c_single, num_heads, transition_factor=transition_factor, key_dim=key_dim,
                value_dim=value_dim,
            )
            for _ in range(num_blocks)
        )

    def forward(self, x: Tensor, cond: Tensor | None, pair: Tensor, mask: Tensor | None = None) -> Tensor:
        check_features(x, "x", self.c_token)
        cond = check_cond(cond, x, self.c_single)
        check_features(pair, "pair", self.c_pair, min_dim=3)
        check_inputs(self, x=x, cond=cond, pair=pair)
        check_devices(self, mask=mask)
        mask = check_mask(mask, x)
        n = x.shape[-2]
        if pair.shape[-3:-1] != (n, n):
            expected = f"(..., {n}, {n}, {self.c_pair})"
            raise ValueError(f"pair must be {expected} to match x, got {tuple(pair.shape)}")
        pair_act = self.pair_input_layer_norm(pair)
        for i, projection in enumerate(self.pair_logits_projection):
            # (..., N, N, blocks, H) -> (blocks, ..., H, N, N): the pair logits of this super-block.
            logits = projection(pair_act).unflatten(-1, (self.super_block_size, self.num_heads))
            logits = logits.movedim(-2, 0).movedim(-1, -3)
            for j in range(self.super_block_size):
                x = self.blocks[i * self.super_block_size + j](x, cond, mask, logits[j])
        return x

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        local = prefix.rsplit("/", 1)[-1]
        n_super = len(self.pair_logits_projection)
        out_shape = (self.super_block_size, self.num_heads)
        projections = [
            linear_entries("pair_logits_projection", proj, out_shape=out_shape)
            for proj in self.pair_logits_projection
        ]
        blocks = [block._af3_entries(local) for block in self.blocks]
        return {
            **norm_entries(f"{prefix}/pair_input_layer_norm", self.pair_input_layer_norm),
            **stack_entries(projections, (n_super,), f"{prefix}/{LAYER_STACK}/"),
            **stack_entries(
                blocks, (n_super, self.super_block_size), f"{prefix}/{LAYER_STACK}/{LAYER_STACK}/"
            ),
        }


# --------------------------------------------------------------------------------------------------
# Atom-level blocks: the cross-attention transformer of Algorithm 7
# --------------------------------------------------------------------------------------------------

MASK_MODES = ("official", "corrected")


class CrossAttention(nn.Module):
    """Local attention of Algorithm 7 as implemented (``cross_attention``): queries attend to key windows.

    Separate AdaLNs for queries and keys; the official mask bias is ``1e9 (mask_q - 1)(mask_k - 1)``, which
    is 0 for every valid query, so valid queries also attend to padded keys (``mask_mode='official'``);
    ``'corrected'`` uses ``-1e9 (1 - mask_k)`` instead. ``key_dim`` / ``value_dim`` (all heads together)
    default to ``CrossAttentionConfig``'s 128 whatever ``dim`` is. x_q: (..., Q, C); x_k: (..., K, C);
    cond_q, cond_k alike with Cc channels; mask_q: (..., Q); mask_k: (..., K); pair_logits: (..., H, Q, K).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int | None,
        num_heads: int = 4,
        mask_mode: str = "official",
        *,
        key_dim: int = 128,
        value_dim: int = 128,
    ):
        super().__init__()
        for name, width in (("key_dim", key_dim), ("value_dim", value_dim)):
            if width % num_heads:
                raise ValueError(f"{name} ({width}) must be divisible by num_heads ({num_heads})")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.dim, self.cond_dim, self.num_heads, self.mask_mode = dim, cond_dim, num_heads, mask_mode
        self.key_dim, self.value_dim = key_dim, value_dim
        self.q_layernorm = AF3AdaptiveLayerNorm(dim, cond_dim)
        self.k_layernorm = AF3AdaptiveLayerNorm(dim, cond_dim)
        self.q_projection = af3_linear(dim, key_dim, bias=True)
        self.k_projection = af3_linear(dim, key_dim)
        self.v_projection = af3_linear(dim, value_dim)
        self.gating_query = af3_linear(dim, value_dim, init="zeros")
        self.adaptive_zero_init = AdaptiveZeroInit(value_dim, dim, cond_dim)

    def forward(
        self,
        x_q: Tensor,
        x_k: Tensor,
        cond_q: Tensor | None,
        cond_k: Tensor | None,
        mask_q: Tensor,
        mask_k: Tensor,
        pair_logits: Tensor | None = None,
    ) -> Tensor:
        ct = torch.promote_types(x_q.dtype, torch.float32)
        mask_q, mask_k = mask_q.to(ct), mask_k.to(ct)
        if self.mask_mode == "official":
            bias = 1e9 * (mask_q - 1.0)[..., None, :, None] * (mask_k - 1.0)[..., None, None, :]
        else:
            bias = (1e9 * (mask_k - 1.0))[..., None, None, :]
        q_in = self.q_layernorm(x_q, cond_q)
        k_in = self.k_layernorm(x_k, cond_k)
        q, k, v = self.q_projection(q_in), self.k_projection(k_in), self.v_projection(k_in)
        out = attend(q, k, v, self.num_heads, bias, pair_logits)
        out = out * torch.sigmoid(self.gating_query(q_in))
        return self.adaptive_zero_init(out, cond_q)

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        keys = (self.num_heads, self.key_dim // self.num_heads)
        values = (self.num_heads, self.value_dim // self.num_heads)
        return {
            **adaptive_layernorm_entries(self.q_layernorm, f"{prefix}q"),
            **adaptive_layernorm_entries(self.k_layernorm, f"{prefix}k"),
            **linear_entries(f"{prefix}q_projection", self.q_projection, out_shape=keys),
            **linear_entries(f"{prefix}k_projection", self.k_projection, out_shape=keys),
            **linear_entries(f"{prefix}v_projection", self.v_projection, out_shape=values),
            **linear_entries(f"{prefix}gating_query", self.gating_query),
            **adaptive_zero_init_entries(self.adaptive_zero_init, prefix),
        }


class CrossAttTransformer(nn.Module):
    """``CrossAttTransformer``: ``num_blocks`` x (CrossAttention + ConditionedTransition) on atom subsets.

    Keys are gathered from the current queries before every block. queries: (B, S, Q, C);
    key_index: (B, S, K) indices into the flattened (S*Q) queries; masks (B, S, Q) / (B, S, K);
    conds alike with Cc channels; pair: (B, S, Q, K, Cp). One pair LayerNorm and one projection to
    ``num_blocks x num_heads`` logits serve all blocks. ``transition_factor``
    (``num_intermediate_factor``, 2 in the encoder and decoder configs), ``key_dim`` and ``value_dim``
    (``CrossAttentionConfig``, 128) default to the official config.
    """

    _af3_scoped = True

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        pair_dim: int,
        num_blocks: int = 3,
        num_heads: int = 4,
        mask_mode: str = "official",
        *,
        transition_factor: int = 2,
        key_dim: int = 128,
        value_dim: int = 128,
    ):
        super().__init__()
        self.num_blocks, self.num_heads = num_blocks, num_heads
        self.pair_input_layer_norm = AF3LayerNorm(pair_dim)
        self.pair_logits_projection = af3_linear(pair_dim, num_blocks * num_heads)
        self.attention = nn.ModuleList(
            CrossAttention(dim, cond_dim, num_heads, mask_mode, key_dim=key_dim, value_dim=value_dim)
            for _ in range(num_blocks)
        )
        self.transition = nn.ModuleList(
            ConditionedTransition(dim, cond_dim, transition_factor) for _ in range(num_blocks)
        )

    def forward(
        self,
        queries: Tensor,
        queries_mask: Tensor,
        key_index: Tensor,
        keys_mask: Tensor,
        queries_cond: Tensor,
        keys_cond: Tensor,
        pair: Tensor,
    ) -> Tensor:
        logits = self.pair_logits_projection(self.pair_input_layer_norm(pair))
        # (B, S, Q, K, blocks, H) -> (blocks, B, S, H, Q, K)
        logits = logits.unflatten(-1, (self.num_blocks, self.num_heads)).permute(4, 0, 1, 5, 2, 3)
        for attention, transition, block_logits in zip(self.attention, self.transition, logits):
            keys = gather_keys(queries, key_index)
            update = attention(queries, keys, queries_cond, keys_cond, queries_mask, keys_mask, block_logits)
            queries = queries + update
            queries = queries + transition(queries, queries_cond)
        return queries

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        local = prefix.rsplit("/", 1)[-1]
        blocks = [
            {**attention._af3_entries(local), **transition._af3_entries(local)}
            for attention, transition in zip(self.attention, self.transition)
        ]
        return {
            **norm_entries(f"{prefix}/pair_input_layer_norm", self.pair_input_layer_norm),
            **linear_entries(
                f"{prefix}/pair_logits_projection",
                self.pair_logits_projection,
                out_shape=(self.num_blocks, self.num_heads),
            ),
            **stack_entries(blocks, (self.num_blocks,), f"{prefix}/{LAYER_STACK}/"),
        }


def gather_keys(queries: Tensor, key_index: Tensor) -> Tensor:
    """Key windows from the flattened query subsets: (B, S, Q, ...) x (B, S, K) -> (B, S, K, ...)."""
    b, s, q = queries.shape[:3]
    flat = queries.reshape(b, s * q, *queries.shape[3:])
    batch = torch.arange(b, device=queries.device).view(b, 1, 1)
    return flat[batch, key_index]
