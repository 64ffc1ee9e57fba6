"""A stack of conditioned residual blocks on channels-last tokens; nvSubquadratic ``ResidualNetwork``.

Matches nvSubquadratic ``networks/general_purpose_resnet.py`` (``ResidualNetwork``) without its register
tokens and readout crop: ``in_proj -> blocks -> final norm -> out_proj`` on x (B, *spatial, C).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from adaln.checks import check_tensor
from adaln.nn.blocks import build_module

BlockSpec = Union[Callable[[], nn.Module], Mapping[str, Any]]


def build_blocks(block: BlockSpec, depth: int) -> nn.ModuleList:
    """``depth`` fresh blocks from a zero-argument factory or a ``_target_`` / ``__target__`` config.

    Configs follow ``adaln.nn.blocks.instantiate`` (hydra's or nvSubquadratic's LazyConfig form).
    """
    if isinstance(block, nn.Module):
        raise TypeError("block must be a zero-argument factory or a config, not a module instance "
                        "(one instance would be shared by every layer)")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    return nn.ModuleList(build_module(block, "block") for _ in range(depth))


class ResidualNetwork(nn.Module):
    """``out_proj(final_norm(blocks(in_proj(x), condition)))``; x (B, *spatial, in_dim) -> (..., out_dim).

    | argument               | meaning                                                                 |
    |------------------------|-------------------------------------------------------------------------|
    | in_dim, out_dim        | channels of the input and the output (``in_proj``/``out_proj`` Linear)   |
    | hidden_dim             | C, the width of every block                                             |
    | depth                  | number of blocks, each built afresh from ``block``                      |
    | block                  | factory or ``_target_``/``__target__`` config of a ``forward(x, cond)`` |
    | condition_dim          | when set, ``condition_in_proj`` = Linear(condition_dim, C)              |
    | checkpoint_activations | recompute each block in backward (``use_reentrant=False``)              |
    | in_proj                | replaces the default Linear(in_dim, C), e.g. a patch embedding          |

    ``forward(x, condition=None)``: condition (B, Cc) or (B, *spatial_cond, Cc) with Cc = condition_dim
    when set (required then), else Cc = C and it goes to the blocks unchanged (None included: blocks
    that need a condition raise). ``final_norm`` is LayerNorm(C), eps 1e-5 as nvSubquadratic.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        depth: int,
        block: BlockSpec,
        condition_dim: int | None = None,
        checkpoint_activations: bool = False,
        *,
        in_proj: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.condition_dim, self.checkpoint_activations = condition_dim, checkpoint_activations
        self.in_proj = nn.Linear(in_dim, hidden_dim) if in_proj is None else in_proj
        self.condition_in_proj = nn.Linear(condition_dim, hidden_dim) if condition_dim is not None else None
        self.blocks = build_blocks(block, depth)
        self.final_norm = nn.LayerNorm(hidden_dim, eps=1e-5)
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        x = self._check_x(x)
        x = self.run_blocks(self.in_proj(x), self.embed_condition(condition, x.shape[0]))
        return self.out_proj(self.final_norm(x))

    def run_blocks(self, x: Tensor, condition: Tensor | None) -> Tensor:
        """Apply every block to x (B, *spatial, C), checkpointed when asked and gradients are on."""
        for block in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(block, x, condition, use_reentrant=False)
            else:
                x = block(x, condition)
        return x

    def embed_condition(self, condition: Tensor | None, batch: int) -> Tensor | None:
        """Validate the condition and project it to C channels when ``condition_dim`` is set."""
        expected = self.hidden_dim if self.condition_dim is None else self.condition_dim
        if condition is None:
            if self.condition_dim is not None:
                raise ValueError(
                    f"condition is required: (B, {expected}) or (B, *spatial, {expected}), got None"
                )
            return None
        check_tensor(condition, "condition", min_dim=2)
        if condition.shape[0] != batch or condition.shape[-1] != expected:
            raise ValueError(
                f"condition must be (B, {expected}) or (B, *spatial, {expected}) with B = {batch}, "
                f"got {tuple(condition.shape)}"
            )
        return condition if self.condition_in_proj is None else self.condition_in_proj(condition)

    def _check_x(self, x: Tensor) -> Tensor:
        check_tensor(x, "x", min_dim=3)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x must be (B, *spatial, {self.in_dim}) (channels-last), got {tuple(x.shape)}")
        return x
