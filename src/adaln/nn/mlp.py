"""Position-wise feed-forward layers and stochastic depth.

``Mlp`` is timm's ``Mlp`` as facebookresearch/DiT uses it (``fc1``, ``act``, ``fc2``; DiT passes
``GELU(approximate="tanh")``). ``SwiGLU`` is the LLaMA / Lumina 2 feed-forward (``w1``, ``w2``,
``w3``, no biases by default). ``DropPath`` is timm's per-sample stochastic depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_tensor

ACTIVATIONS = {
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def _check_features(x: Tensor, features: int) -> Tensor:
    check_tensor(x, "x")
    if x.shape[-1] != features:
        raise ValueError(f"x must have {features} channels in its last axis, got shape {tuple(x.shape)}")
    return x


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` then dropout, on x (..., in_features); timm ``Mlp`` layout and names."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act: str = "gelu_tanh",
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        hidden = hidden_features or in_features
        self.in_features, self.out_features = in_features, out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, self.out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, self.in_features)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` on x (..., dim); LLaMA / Lumina 2 ``FeedForward`` names (w1 gate, w3 up).

    ``hidden_dim`` is used as given (LLaMA's 2/3 rounding to ``multiple_of`` is the caller's choice).
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, *, bias: bool = False) -> None:
        super().__init__()
        self.in_features = dim
        self.out_features = out_dim or dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, self.out_features, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, self.in_features)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples with probability ``p`` and scale survivors by 1/(1-p).

    timm ``drop_path`` semantics (expectation preserved); identity in eval mode or with p = 0.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
