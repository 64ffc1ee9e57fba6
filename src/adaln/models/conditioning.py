"""Conditioning beyond class labels: pooled vectors through AdaLN, token sequences through cross-attention.

Where modern DiTs put their conditions:

- class label: DiT's ``LabelEmbedding``, added to the timestep embedding before AdaLN;
- pooled vector (``VectorEmbedder``): SD3's ``CombinedTimestepTextProjEmbeddings`` -- the pooled text
  embedding goes through ``PixArtAlphaTextProjection(act_fn="silu")`` and is added to the timestep
  embedding, so it reaches every block through AdaLN (a global, per-sample control);
- token sequence (``TokenEmbedder`` + ``CrossDiTBlock``): PixArt-alpha's ``CaptionEmbedder`` and
  ``PixArtBlock`` order (self-attention -> cross-attention -> MLP), keys/values from the tokens;
- none: Z-Image's time-only AdaLN (``ConditionalDiT`` with no conditioner configured).

Null values for classifier-free guidance (``ConditionalDiT.null_cond``) and training dropout:

===========  ==================================  ================================================
conditioner  null value                          what the network sees for it
===========  ==================================  ================================================
y            class ``num_classes``               the learned null row of the label table (DiT)
vec          the zero vector                     ``VectorEmbedder(0)``: its learned bias path
tokens       ``token_mask`` all False             the learned null token alone (always prepended)
===========  ==================================  ================================================

Each conditioner drops whole samples to its null with its own probability during training, drawn per
sample from the ``generator`` passed to the forward (or the global RNG), in the order y, vec, tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from adaln.checks import check_tensor
from adaln.diffusion import EDMPrecond
from adaln.models._inputs import check_token_mask
from adaln.models.dit import DiTBase, EDMTimestep
from adaln.nn.adaln import AdaLNZero
from adaln.nn.attention import Attention, CrossAttention
from adaln.nn.blocks import DiTBlock
from adaln.nn.embeddings import LabelEmbedding
from adaln.nn.mlp import Mlp

__all__ = [
    "ConditionalDiT",
    "CrossDiTBlock",
    "TokenEmbedder",
    "VectorEmbedder",
    "conditional_dit_edm_denoiser",
    "drop_samples",
]


#################################################################################
#                 Condition embedders with per-sample null dropout              #
#################################################################################


def drop_samples(batch: int, prob: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(B,) bool, True with probability ``prob`` each: the samples whose condition becomes null."""
    g_device = generator.device if generator is not None else device
    return torch.rand(batch, generator=generator, device=g_device).to(device) < prob


def _check_prob(p: float, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


class VectorEmbedder(nn.Module):
    """Pooled condition vectors -> hidden: ``linear_2(SiLU(linear_1(vec)))`` (B, vec_dim) -> (B, hidden).

    SD3's ``PixArtAlphaTextProjection(pooled_dim, hidden, act_fn="silu")`` (keys ``linear_1``,
    ``linear_2`` load by name); its output is added to the timestep embedding before AdaLN. Null value:
    the zero vector (pooled text embeddings are unit-norm, so zero is never a real one); dropout zeroes
    whole rows. Init normal std 0.02, biases 0 (as DiT's timestep MLP and PixArt's caption MLP).
    """

    def __init__(self, vec_dim: int, hidden_size: int, dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.vec_dim, self.hidden_size = vec_dim, hidden_size
        self.dropout_prob = _check_prob(dropout_prob, "dropout_prob")
        self.linear_1 = nn.Linear(vec_dim, hidden_size)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)
        for linear in (self.linear_1, self.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def null(self, batch: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """The null condition: zeros (B, vec_dim)."""
        return torch.zeros(batch, self.vec_dim, device=device, dtype=dtype or self.linear_1.weight.dtype)

    def token_drop(self, vec: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Zero each row with probability ``dropout_prob``."""
        drop = drop_samples(vec.shape[0], self.dropout_prob, generator, vec.device)
        return torch.where(drop[:, None], torch.zeros_like(vec), vec)

    def forward(self, vec: Tensor, train: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        """vec (B, vec_dim) -> (B, hidden); ``train`` None means ``self.training``."""
        check_tensor(vec, "vec", min_dim=2)
        if vec.dim() != 2 or vec.shape[1] != self.vec_dim:
            raise ValueError(f"vec must have shape (B, vec_dim) = (B, {self.vec_dim}), got {tuple(vec.shape)}")
        train = self.training if train is None else train
        if train and self.dropout_prob > 0:
            vec = self.token_drop(vec, generator)
        return self.linear_2(self.act_1(self.linear_1(vec.to(self.linear_1.weight.dtype))))


class TokenEmbedder(nn.Module):
    """Condition tokens -> cross-attention context, with a learned null token (PixArt ``CaptionEmbedder``).

    forward(tokens (B, M, token_dim) | None, mask (B, M) bool | None) -> (context (B, 1 + M, hidden),
    keep (B, 1 + M) bool). ``y_proj`` is PixArt's ``Mlp(token_dim, hidden, hidden)`` with tanh-GELU.
    The learned ``null_token`` (token_dim,) is prepended to every sequence and never masked: a sample
    whose tokens are all masked (``mask`` all False, ``tokens`` None, or dropped in training) attends to
    it alone, and the softmax always has one key. Where we differ from PixArt: its null caption is a
    whole padded sequence (``y_embedding``, token_num x C) swapped in for dropped samples; ours is one
    token and the padding mask does the dropping. Init: ``y_proj`` normal std 0.02, ``null_token``
    ``randn / sqrt(token_dim)`` (PixArt's ``y_embedding``).
    """

    def __init__(self, token_dim: int, hidden_size: int, dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.token_dim, self.hidden_size = token_dim, hidden_size
        self.dropout_prob = _check_prob(dropout_prob, "dropout_prob")
        self.y_proj = Mlp(token_dim, hidden_size, hidden_size, act="gelu_tanh")
        self.null_token = nn.Parameter(torch.randn(token_dim) / token_dim**0.5)
        for linear in (self.y_proj.fc1, self.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def check(self, tokens: Tensor | None, mask: Tensor | None, batch: int) -> None:
        """Raise ValueError/TypeError unless tokens (B, M, token_dim) and mask (B, M) bool fit."""
        if tokens is None:
            if mask is not None:
                raise ValueError("token_mask was given without tokens; pass tokens (B, M, token_dim) too")
            return
        check_tensor(tokens, "tokens", min_dim=3)
        if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != self.token_dim:
            raise ValueError(
                f"tokens must have shape (B, M, token_dim) = ({batch}, M, {self.token_dim}), "
                f"got {tuple(tokens.shape)}"
            )
        check_token_mask(mask, tokens, "token_mask", "tokens")

    def forward(
        self,
        tokens: Tensor | None,
        mask: Tensor | None = None,
        *,
        batch: int | None = None,
        train: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """See the class docstring; ``batch`` is required when ``tokens`` is None."""
        if tokens is None and batch is None:
            raise ValueError("batch is required when tokens is None")
        b = tokens.shape[0] if isinstance(tokens, Tensor) else batch
        self.check(tokens, mask, b)
        dtype = self.y_proj.fc1.weight.dtype
        null = self.null_token.to(dtype).expand(b, 1, self.token_dim)
        if tokens is None:
            return self.y_proj(null), torch.ones(b, 1, dtype=torch.bool, device=null.device)
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        train = self.training if train is None else train
        if train and self.dropout_prob > 0:
            mask = mask & ~drop_samples(b, self.dropout_prob, generator, tokens.device)[:, None]
        context = self.y_proj(torch.cat([null, tokens.to(dtype)], dim=1))  # (B, 1 + M, hidden)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        return context, keep


#################################################################################
#                     DiT block with a cross-attention sub-block                #
#################################################################################


class CrossDiTBlock(nn.Module):
    """DiT block + cross-attention sub-block: self-attention -> cross-attention -> MLP (PixArt order).

    Forward computation, c the (B, C) condition, context (B, M, C) keys/values source::

        x = x + gate_msa * attn(LN(x) * (1 + scale_msa) + shift_msa)             # DiTBlock branch 1
        x = x + gate_ca * cross_attn(LN(x) * (1 + scale_ca) + shift_ca, context, keep)
        x = x + gate_mlp * mlp(LN(x) * (1 + scale_mlp) + shift_mlp)             # DiTBlock branch 2

    ``attn``, ``mlp`` and ``adaLN_modulation`` are ``DiTBlock``'s (same names and shapes, so a DiT
    block's weights load into it); the cross branch has its own AdaLN-Zero ``cross_modulation`` giving
    (shift_ca, scale_ca, gate_ca), zero-initialised, so the sub-block is the identity at init. PixArt
    adds cross-attention without a norm or gate and zeroes ``cross_attn.proj`` instead; a gate keeps the
    attention weights trainable from step 0 and lets the noise level decide how much text to let in.
    x (B, N, C), c (B, C), context (B, M, C), keep (B, M) bool -> (B, N, C).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.cross_attn = CrossAttention(hidden_size, hidden_size, num_heads, qkv_bias=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")
        self.adaLN_modulation = AdaLNZero(hidden_size, hidden_size, branches=2)
        self.cross_modulation = AdaLNZero(hidden_size, hidden_size, branches=1)

    def forward(self, x: Tensor, c: Tensor, context: Tensor, keep: Tensor | None = None) -> Tensor:
        ada, cross = self.adaLN_modulation, self.cross_modulation
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = ada(c)
        ((shift_ca, scale_ca, gate_ca),) = cross(c)
        x = ada.residual(x, self.attn(ada.modulate(x, shift_msa, scale_msa)), gate_msa)
        x = cross.residual(x, self.cross_attn(cross.modulate(x, shift_ca, scale_ca), context, keep), gate_ca)
        return ada.residual(x, self.mlp(ada.modulate(x, shift_mlp, scale_mlp)), gate_mlp)


#################################################################################
#                              The conditional DiT                              #
#################################################################################


class ConditionalDiT(DiTBase):
    """DiT with any combination of class, pooled-vector and token conditioners (or none: time only).

    forward(x (B, C, H, W), t (B,), y (B,) int | None, vec (B, vec_dim) | None, tokens (B, M, token_dim)
    | None, token_mask (B, M) bool | None) -> (B, out_channels, H, W). The AdaLN condition is
    ``t_embedder(t) [+ y_embedder(y)] [+ vec_embedder(vec)]``; with ``token_dim`` every block is a
    ``CrossDiTBlock`` attending to ``token_embedder(tokens)``, else a ``DiTBlock``. A conditioner that is
    configured but not given takes its null value (see the module docstring); one given but not
    configured raises ``ValueError``. ``*_dropout`` are the training probabilities of nulling each.
    Patches, positions, final layer, input checks and initialisation are ``adaln.models.dit.DiTBase``'s
    (fb DiT's ``initialize_weights``; the vec/token embedders keep theirs; cross-attention gates start at 0).
    ``x`` must have the parameters' dtype (any dtype under ``torch.autocast``) and every input their device.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        num_classes: int | None = None,
        vec_dim: int | None = None,
        token_dim: int | None = None,
        y_dropout: float = 0.1,
        vec_dropout: float = 0.1,
        token_dropout: float = 0.1,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("vec_dim", vec_dim), ("token_dim", token_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self._build_stem(input_size, patch_size, in_channels, hidden_size, learn_sigma=learn_sigma)
        self.depth, self.num_heads, self.mlp_ratio = depth, num_heads, mlp_ratio
        self.num_classes, self.vec_dim, self.token_dim = num_classes, vec_dim, token_dim

        self.y_embedder = None if num_classes is None else LabelEmbedding(
            num_classes, hidden_size, _check_prob(y_dropout, "y_dropout")
        )
        self.vec_embedder = None if vec_dim is None else VectorEmbedder(vec_dim, hidden_size, vec_dropout)
        self.token_embedder = None if token_dim is None else TokenEmbedder(token_dim, hidden_size, token_dropout)
        self._register_pos_embed("tokens")
        block = CrossDiTBlock if token_dim is not None else DiTBlock
        self.blocks = nn.ModuleList(block(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self._build_head()
        self.initialize_weights()

    def _keeps_own_init(self) -> tuple[nn.Module, ...]:
        # The pooled-vector and token embedders keep their own init (normal 0.02, PixArt's null token).
        return tuple(e for e in (self.vec_embedder, self.token_embedder) if e is not None)

    @property
    def conditioners(self) -> tuple[str, ...]:
        """Names of the configured conditioners among ("y", "vec", "tokens")."""
        named = (("y", self.y_embedder), ("vec", self.vec_embedder), ("tokens", self.token_embedder))
        return tuple(name for name, module in named if module is not None)

    def null_cond(self, keys: Iterable[str] | None = None) -> dict[str, object]:
        """``null_cond`` for ``ClassifierFreeGuidance``: y -> num_classes, vec -> 0, token_mask -> False.

        ``keys`` (default: every configured conditioner, "tokens" standing for "token_mask") picks the
        conditioners to null. Tokens are nulled through their mask, so guided calls must pass
        ``token_mask`` with ``tokens``. A time-only model has nothing to null (guidance does not apply).
        """
        keys = self.conditioners if keys is None else tuple("tokens" if k == "token_mask" else k for k in keys)
        unknown = [k for k in keys if k not in self.conditioners]
        if unknown:
            raise ValueError(f"cannot null {unknown}: this model's conditioners are {list(self.conditioners)}")
        if "y" in keys and self.y_embedder.dropout_prob == 0:
            raise ValueError("y has no null class: build the model with y_dropout > 0 to guide on y")
        nulls = {"y": self.num_classes, "vec": 0.0, "tokens": False}
        return {("token_mask" if k == "tokens" else k): nulls[k] for k in keys}

    def condition(
        self, t: Tensor, y: Tensor | None, vec: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:
        """The AdaLN condition ``t_emb [+ y_emb] [+ vec_emb]`` (B, hidden); nulls for missing ones."""
        c = self.t_embedder(t)
        b = t.shape[0]
        if self.y_embedder is not None:
            if y is None:
                if self.y_embedder.dropout_prob == 0:
                    raise ValueError("y is required: this model has no null class (y_dropout=0)")
                y = torch.full((b,), self.num_classes, dtype=torch.long, device=t.device)
            c = c + self.y_embedder(y, self.training, generator=generator)
        if self.vec_embedder is not None:
            vec = self.vec_embedder.null(b, device=t.device) if vec is None else vec
            c = c + self.vec_embedder(vec, generator=generator)
        return c

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        vec: Tensor | None = None,
        tokens: Tensor | None = None,
        token_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) -> (B, out_channels, H, W); see the class docstring for the rest."""
        self._check_inputs(x, t, y, vec, tokens, token_mask)
        b = x.shape[0]
        c = self.condition(t, y, vec, generator)  # (B, D)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        if self.token_embedder is None:
            for block in self.blocks:
                h = block(h, c)
        else:
            context, keep = self.token_embedder(tokens, token_mask, batch=b, generator=generator)
            for block in self.blocks:
                h = block(h, c, context, keep)
        return self.unpatchify(self.final_layer(h, c))

    def _check_inputs(self, x, t, y, vec, tokens, token_mask) -> None:
        b = self._check_x_t(x, t)
        given = {"y": y, "vec": vec, "tokens": tokens if tokens is not None else token_mask}
        extra = [k for k, v in given.items() if v is not None and k not in self.conditioners]
        if extra:
            names = ["token_mask" if k == "tokens" and tokens is None else k for k in extra]
            raise ValueError(
                f"{names} given but this model is not configured for them (conditioners: "
                f"{list(self.conditioners) or 'none, time only'})"
            )
        if y is not None:
            self._check_y(y, b)
        if vec is not None:
            check_tensor(vec, "vec")
            if tuple(vec.shape) != (b, self.vec_dim):
                raise ValueError(f"vec must have shape (B, vec_dim) = ({b}, {self.vec_dim}), got {tuple(vec.shape)}")
        if self.token_embedder is not None:
            self.token_embedder.check(tokens, token_mask, b)
        self._check_devices(vec=vec, tokens=tokens, token_mask=token_mask)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"hidden_size={self.hidden_size}, depth={self.depth}, num_heads={self.num_heads}, "
            f"num_classes={self.num_classes}, vec_dim={self.vec_dim}, token_dim={self.token_dim}"
        )


def conditional_dit_edm_denoiser(
    model: ConditionalDiT, sigma_data: float = 0.5, *, timestep_scale: float = 1000.0
) -> EDMPrecond:
    """EDM denoiser ``D(x, sigma, y=..., vec=..., tokens=..., token_mask=...)`` around a ConditionalDiT.

    The same preconditioning as ``adaln.models.dit.dit_edm_denoiser``; guide it with
    ``ClassifierFreeGuidance(denoiser, scale, null_cond=model.null_cond())``.
    """
    if model.learn_sigma:
        raise ValueError("conditional_dit_edm_denoiser needs learn_sigma=False (the output must be C channels)")
    return EDMPrecond(model, sigma_data, noise_input=EDMTimestep(timestep_scale))
