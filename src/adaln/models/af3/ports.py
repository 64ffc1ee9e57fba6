"""State dicts of the PyTorch ports of AlphaFold3: bytedance/Protenix and lucidrains/alphafold3-pytorch.

Both ports compute the diffusion transformer (Algorithms 23-25) with the official maths but other names
and layouts; :func:`load_protenix_state_dict` and :func:`load_alphafold3_pytorch_state_dict` read them
into our :class:`DiffusionTransformer` or :class:`ConditionedTransition`, the ``*_state_dict`` functions
write ours in their layout. Key names (after ``prefix``), per block ``i``:

* Protenix ``blocks.{i}.``: ``attention_pair_bias.layernorm_a.{layernorm_s, linear_s, linear_nobias_s}``
  (our attention AdaLN), ``attention_pair_bias.attention.{linear_q, linear_k, linear_v, linear_g,
  linear_o}`` (q, k, v, gate, ``transition2``), ``attention_pair_bias.linear_a_last`` (AdaLN-Zero gate),
  ``attention_pair_bias.{layernorm_z, linear_nobias_z}`` (pair norm and projection),
  ``conditioned_transition_block.{adaln, linear_nobias_a1, linear_nobias_a2, linear_nobias_b, linear_s}``.
* alphafold3-pytorch ``layers.{i}.2.branch.`` (attention) and ``layers.{i}.3.branch.`` (transition):
  ``adaptive_norm.{norm_cond, to_gamma.0, to_beta}`` (AdaLN), ``to_adaln_zero_gamma.0`` (gate),
  ``fn.attn.{to_q, to_kv, to_gates.0, to_out}`` (``to_kv``: k rows, then v rows),
  ``fn.{to_attn_bias_norm, to_attn_bias.0}`` (pair norm and projection), ``fn.ff.{0, 2}`` (transition).

(Protenix ``protenix/model/modules/transformer.py`` and ``primitives.py``; alphafold3-pytorch
``alphafold3_pytorch/alphafold3.py`` and ``attention.py`` at 0.7.12. Between its bias-free output gate,
commit ``ffe6a89``, and its hyper-connection wrapper, ``ebaa6ee``, alphafold3-pytorch stored the same keys
without ``.branch``: both are read, ``branch`` chooses on export. Older layouts (a gate with a bias,
``to_attn_bias.{0,1}``) are refused with the keys named.)

Layout differences handled here:

* SwiGLU halves: we (and the official code) gate with the first half of ``transition1``
  (``swish(a) * b``); alphafold3-pytorch's ``SwiGLU`` gates with the second (``x, gates = chunk(2)``):
  the halves are swapped. Protenix stores the halves as two Linears (``a1`` gated).
* Per-block pair LayerNorms: the official code (and we) normalise the pair once for all blocks and
  project it per super-block; the ports have a LayerNorm + projection per block. Folding is exact in
  real arithmetic: ``W (w * n + b) = (W diag w) n + W b`` with ``n`` the normalised pair, and ``W b``
  adds one constant per head to every logit of the softmax, which the softmax ignores (offsets are
  dropped). When every block's LayerNorm scale is the same, it and the projections are copied
  unchanged; otherwise the scales are multiplied into the projections (shared scale 1), which changes
  results only by rounding (measured: below 1e-15 in float64).
* alphafold3-pytorch's attention width is ``heads * dim_head`` (64 by default), not the token width:
  build our module with ``key_dim = value_dim = heads * dim_head``.

Anything under ``prefix`` that our module cannot represent (memory key/values, value-residual mixing,
register tokens, linear or routed attention, hyper-connections with several streams) is refused by
name, as are missing, mis-shaped, non-numeric and non-finite tensors; nothing is copied then.
Not representable and not visible in a state dict: alphafold3-pytorch's attention soft-clamping and
its old non-serial block order (``serial=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adaln.models.af3.params import checked_tensor
from adaln.models.af3.transformer import (
    AttentionPairBias,
    ConditionedTransition,
    DiffusionTransformer,
)
from adaln.nn.adaln import AF3AdaptiveLayerNorm, AdaptiveZeroInit

SUPPORTED = (DiffusionTransformer, ConditionedTransition)


@dataclass(frozen=True)
class _Link:
    """Our parameters <-> the port's tensors ``keys``; ``to_ours`` / ``to_theirs`` convert the lists."""

    ours: tuple[Tensor, ...]
    keys: tuple[str, ...]
    to_ours: Callable[[list[Tensor]], list[Tensor]]
    to_theirs: Callable[[list[Tensor]], list[Tensor]]


def _same(ours: Tensor, key: str) -> _Link:
    return _Link((ours,), (key,), lambda v: v, lambda v: v)


def _halves_swapped(ours: Tensor, key: str) -> _Link:
    def swap(v: list[Tensor]) -> list[Tensor]:
        first, second = v[0].chunk(2, dim=0)
        return [torch.cat([second, first])]

    return _Link((ours,), (key,), swap, swap)


def _stacked(ours: Tensor, keys: tuple[str, ...]) -> _Link:
    """One of ours = the port's equal-sized tensors stacked along the output rows (in ``keys`` order)."""
    return _Link((ours,), keys, lambda v: [torch.cat(v)], lambda v: list(v[0].chunk(len(keys), dim=0)))


def _split(ours: tuple[Tensor, Tensor], key: str) -> _Link:
    """Two of ours (k, v) = the port's one tensor, split along the output rows."""
    rows = ours[0].shape[0]
    return _Link(ours, (key,), lambda v: [v[0][:rows], v[0][rows:]], lambda v: [torch.cat(v)])


# --------------------------------------------------------------------------------------------------
# Per-module tables: Protenix
# --------------------------------------------------------------------------------------------------


def _protenix_adaln(norm: AF3AdaptiveLayerNorm, p: str) -> list[_Link]:
    return [
        _same(norm.single_cond_layer_norm.weight, f"{p}layernorm_s.weight"),
        _same(norm.single_cond_scale.weight, f"{p}linear_s.weight"),
        _same(norm.single_cond_scale.bias, f"{p}linear_s.bias"),
        _same(norm.single_cond_bias.weight, f"{p}linear_nobias_s.weight"),
    ]


def _protenix_gate(zero: AdaptiveZeroInit, key: str) -> list[_Link]:
    return [
        _same(zero.adaptive_zero_cond.weight, f"{key}.weight"),
        _same(zero.adaptive_zero_cond.bias, f"{key}.bias"),
    ]


def _protenix_transition(t: ConditionedTransition, p: str) -> list[_Link]:
    return [
        *_protenix_adaln(t.adaptive_layernorm, f"{p}adaln."),
        _stacked(t.transition1.weight, (f"{p}linear_nobias_a1.weight", f"{p}linear_nobias_a2.weight")),
        _same(t.adaptive_zero_init.transition2.weight, f"{p}linear_nobias_b.weight"),
        *_protenix_gate(t.adaptive_zero_init, f"{p}linear_s"),
    ]


def _protenix_attention(a: AttentionPairBias, p: str) -> list[_Link]:
    m = f"{p}attention."
    return [
        *_protenix_adaln(a.adaptive_layernorm, f"{p}layernorm_a."),
        _same(a.q_projection.weight, f"{m}linear_q.weight"),
        _same(a.q_projection.bias, f"{m}linear_q.bias"),
        _same(a.k_projection.weight, f"{m}linear_k.weight"),
        _same(a.v_projection.weight, f"{m}linear_v.weight"),
        _same(a.gating_query.weight, f"{m}linear_g.weight"),
        _same(a.adaptive_zero_init.transition2.weight, f"{m}linear_o.weight"),
        *_protenix_gate(a.adaptive_zero_init, f"{p}linear_a_last"),
    ]


def _protenix_block(prefix: str, i: int) -> tuple[str, str, str, str]:
    """(attention, transition, pair-norm, pair-projection) key stems of block ``i``."""
    block = f"{prefix}blocks.{i}."
    attention = f"{block}attention_pair_bias."
    transition = f"{block}conditioned_transition_block."
    return attention, transition, f"{attention}layernorm_z", f"{attention}linear_nobias_z"


# --------------------------------------------------------------------------------------------------
# Per-module tables: alphafold3-pytorch
# --------------------------------------------------------------------------------------------------


def _lucid_adaln(norm: AF3AdaptiveLayerNorm, p: str) -> list[_Link]:
    return [
        _same(norm.single_cond_layer_norm.weight, f"{p}norm_cond.weight"),
        _same(norm.single_cond_scale.weight, f"{p}to_gamma.0.weight"),
        _same(norm.single_cond_scale.bias, f"{p}to_gamma.0.bias"),
        _same(norm.single_cond_bias.weight, f"{p}to_beta.weight"),
    ]


def _lucid_wrapper(norm: AF3AdaptiveLayerNorm, zero: AdaptiveZeroInit, p: str) -> list[_Link]:
    """``ConditionWrapper``: AdaLN before the branch, sigmoid gate on the raw condition after it."""
    return [
        *_lucid_adaln(norm, f"{p}adaptive_norm."),
        _same(zero.adaptive_zero_cond.weight, f"{p}to_adaln_zero_gamma.0.weight"),
        _same(zero.adaptive_zero_cond.bias, f"{p}to_adaln_zero_gamma.0.bias"),
    ]


def _lucid_transition(t: ConditionedTransition, p: str) -> list[_Link]:
    return [
        *_lucid_wrapper(t.adaptive_layernorm, t.adaptive_zero_init, p),
        _halves_swapped(t.transition1.weight, f"{p}fn.ff.0.weight"),
        _same(t.adaptive_zero_init.transition2.weight, f"{p}fn.ff.2.weight"),
    ]


def _lucid_attention(a: AttentionPairBias, p: str) -> list[_Link]:
    m = f"{p}fn.attn."
    return [
        *_lucid_wrapper(a.adaptive_layernorm, a.adaptive_zero_init, p),
        _same(a.q_projection.weight, f"{m}to_q.weight"),
        _same(a.q_projection.bias, f"{m}to_q.bias"),
        _split((a.k_projection.weight, a.v_projection.weight), f"{m}to_kv.weight"),
        _same(a.gating_query.weight, f"{m}to_gates.0.weight"),
        _same(a.adaptive_zero_init.transition2.weight, f"{m}to_out.weight"),
    ]


def _lucid_block(prefix: str, i: int, branch: bool) -> tuple[str, str, str, str]:
    infix = ".branch" if branch else ""
    attention, transition = f"{prefix}layers.{i}.2{infix}.", f"{prefix}layers.{i}.3{infix}."
    return attention, transition, f"{attention}fn.to_attn_bias_norm", f"{attention}fn.to_attn_bias.0"


# --------------------------------------------------------------------------------------------------
# Loading: collect every value and error first, then copy
# --------------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, state_dict: Mapping[str, object], prefix: str):
        if not isinstance(state_dict, Mapping):
            kind = type(state_dict).__name__
            raise TypeError(f"state_dict must be a mapping of name -> tensor, got {kind}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.state_dict, self.prefix = state_dict, prefix
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.problems: list[str] = []

    def get(self, key: str, shape: tuple[int, ...] | None) -> Tensor | None:
        """The tensor at ``key`` (float64), or None after recording why it cannot be used."""
        self.used.add(key)
        if key not in self.state_dict:
            self.missing.append(key)
            return None
        value = checked_tensor(self.state_dict[key])
        if isinstance(value, str):
            self.problems.append(f"{key}: {value}")
            return None
        if shape is not None and tuple(value.shape) != shape:
            self.problems.append(f"{key}: expected shape {shape}, got {tuple(value.shape)}")
            return None
        return value.to(torch.float64)

    def raise_errors(self, module: nn.Module, port: str, hint: str = "") -> None:
        """One ValueError listing every problem (``hint`` added when an attention tensor is mis-shaped)."""
        unsupported = sorted(k for k in self.state_dict if k.startswith(self.prefix) and k not in self.used)
        if not (self.missing or self.problems or unsupported):
            return
        lines = [f"cannot load the {port} state dict into {type(module).__name__} (prefix {self.prefix!r}):"]
        for title, keys in (
            ("missing", sorted(self.missing)),
            ("unusable", self.problems),
            ("not representable by this module", unsupported),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        if hint and any(".attn." in problem for problem in self.problems):
            lines.append(f"  {hint}")
        raise ValueError("\n".join(lines))


def _read_links(reader: _Reader, links: list[_Link]) -> list[tuple[Tensor, Tensor]]:
    writes = []
    for link in links:
        expected = [tuple(t.shape) for t in link.to_theirs([p.detach() for p in link.ours])]
        values = [reader.get(k, shape) for k, shape in zip(link.keys, expected)]
        if all(v is not None for v in values):
            writes.extend(zip(link.ours, link.to_ours(values)))
    return writes


def _fold_pair_norms(
    reader: _Reader, module: DiffusionTransformer, stems: list[tuple[str, str]], offsets: bool
) -> list[tuple[Tensor, Tensor]]:
    """Per-block pair LayerNorm (scale w_b, optional offset) + projection W_b -> our shared norm."""
    c_pair, heads = module.c_pair, module.num_heads
    scales, projections = [], []
    for norm, projection in stems:
        scales.append(reader.get(f"{norm}.weight", (c_pair,)))
        if offsets or f"{norm}.bias" in reader.state_dict:
            # An offset adds W_b b_b, one constant per head, to every logit: the softmax ignores it.
            reader.get(f"{norm}.bias", (c_pair,))
        projections.append(reader.get(f"{projection}.weight", (heads, c_pair)))
    if any(t is None for t in scales + projections):
        return []
    if all(torch.equal(s, scales[0]) for s in scales):
        shared = scales[0]
    else:  # fold each block's scale into its projection: W (w * n) = (W diag w) n
        shared = torch.ones(c_pair, dtype=torch.float64)
        projections = [w * s[None, :] for w, s in zip(projections, scales)]
    writes = [(module.pair_input_layer_norm.weight, shared)]
    size = module.super_block_size
    for i, linear in enumerate(module.pair_logits_projection):
        writes.append((linear.weight, torch.cat(projections[i * size : (i + 1) * size])))
    return writes


def _links(
    module: nn.Module,
    prefix: str,
    transition: Callable[[ConditionedTransition, str], list[_Link]],
    attention: Callable[[AttentionPairBias, str], list[_Link]],
    block_stems: Callable[[int], tuple[str, str, str, str]],
) -> list[_Link]:
    """Every link of ``module`` but the pair norms and projections (handled by the fold)."""
    if isinstance(module, ConditionedTransition):
        return transition(module, prefix)
    links = []
    for i, block in enumerate(module.blocks):
        attention_stem, transition_stem, _, _ = block_stems(i)
        links += attention(block.attention, attention_stem)
        links += transition(block.transition, transition_stem)
    return links


def _check_module(module: object) -> None:
    if not isinstance(module, SUPPORTED):
        names = ", ".join(t.__name__ for t in SUPPORTED)
        raise TypeError(f"module must be one of {names}, got {type(module).__name__}")
    cond_dim = module.c_single if isinstance(module, DiffusionTransformer) else module.cond_dim
    if cond_dim is None:
        name = type(module).__name__
        raise ValueError(f"the ports' blocks are always conditioned: build {name} with a conditioning width")


def _load(
    module: nn.Module,
    state_dict: Mapping[str, object],
    prefix: str,
    port: str,
    transition: Callable[[ConditionedTransition, str], list[_Link]],
    attention: Callable[[AttentionPairBias, str], list[_Link]],
    block_stems: Callable[[int], tuple[str, str, str, str]],
    offsets: bool,
    hint: str,
) -> None:
    _check_module(module)
    reader = _Reader(state_dict, prefix)
    writes = _read_links(reader, _links(module, prefix, transition, attention, block_stems))
    if isinstance(module, DiffusionTransformer):
        pair_stems = [block_stems(i)[2:] for i in range(len(module.blocks))]
        writes += _fold_pair_norms(reader, module, pair_stems, offsets)
    reader.raise_errors(module, port, hint)
    with torch.no_grad():
        for param, value in writes:
            param.copy_(value.to(param.dtype))


def load_protenix_state_dict(module: nn.Module, state_dict: Mapping[str, object], prefix: str = "") -> None:
    """Copy bytedance/Protenix weights into ``module`` (in place).

    module: our :class:`DiffusionTransformer` (Protenix ``DiffusionTransformer``: ``blocks.{i}.``) or
    :class:`ConditionedTransition` (``ConditionedTransitionBlock``); state_dict: the Protenix
    ``state_dict()``; prefix: the module's path in it including the trailing dot, e.g.
    ``'diffusion_module.diffusion_transformer.'``. Folds the per-block pair LayerNorms (see the module
    docstring). Raises one ``ValueError`` listing every missing, unusable and unrepresentable key under
    ``prefix``; nothing is copied then.
    """
    _load(
        module, state_dict, prefix, "Protenix", _protenix_transition, _protenix_attention,
        lambda i: _protenix_block(prefix, i), offsets=False, hint="",
    )


def load_alphafold3_pytorch_state_dict(
    module: nn.Module, state_dict: Mapping[str, object], prefix: str = ""
) -> None:
    """Copy lucidrains/alphafold3-pytorch weights into ``module`` (in place).

    module: our :class:`DiffusionTransformer` (alphafold3-pytorch ``DiffusionTransformer``: ``layers.{i}.``)
    or :class:`ConditionedTransition` (``ConditionWrapper(Transition)``); state_dict: its ``state_dict()``;
    prefix: the module's path in it including the trailing dot, e.g.
    ``'diffusion_module.token_transformer.'``. Swaps the SwiGLU halves and folds the per-block pair
    LayerNorms (see the module docstring). Raises one ``ValueError`` listing every missing, unusable and
    unrepresentable key under ``prefix``; nothing is copied then.
    """
    branch = _has_branch(state_dict, prefix, module)
    hint = (
        "its attention width is heads * dim_head: build ours with key_dim = value_dim = heads * dim_head"
    )
    _load(
        module, state_dict, prefix, "alphafold3-pytorch", _lucid_transition, _lucid_attention,
        lambda i: _lucid_block(prefix, i, branch), offsets=True, hint=hint,
    )


def _has_branch(state_dict: Mapping[str, object], prefix: str, module: nn.Module) -> bool:
    if isinstance(module, ConditionedTransition) or not isinstance(state_dict, Mapping):
        return False
    return any(str(k).startswith(f"{prefix}layers.0.2.branch.") for k in state_dict)


# --------------------------------------------------------------------------------------------------
# Export: ours in the ports' layouts
# --------------------------------------------------------------------------------------------------


def _export(
    module: nn.Module,
    prefix: str,
    transition: Callable[[ConditionedTransition, str], list[_Link]],
    attention: Callable[[AttentionPairBias, str], list[_Link]],
    block_stems: Callable[[int], tuple[str, str, str, str]],
    offsets: bool,
) -> dict[str, Tensor]:
    _check_module(module)
    out = {}
    for link in _links(module, prefix, transition, attention, block_stems):
        out.update(zip(link.keys, (t.clone() for t in link.to_theirs([p.detach() for p in link.ours]))))
    if isinstance(module, DiffusionTransformer):
        scale = module.pair_input_layer_norm.weight.detach()
        size = module.super_block_size
        for i in range(len(module.blocks)):
            _, _, norm, projection = block_stems(i)
            weight = module.pair_logits_projection[i // size].weight.detach()
            out[f"{norm}.weight"] = scale.clone()
            if offsets:
                out[f"{norm}.bias"] = torch.zeros_like(scale)
            heads = module.num_heads
            out[f"{projection}.weight"] = weight[(i % size) * heads : (i % size + 1) * heads].clone()
    return out


def protenix_state_dict(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The inverse of :func:`load_protenix_state_dict`: our weights under Protenix's names."""
    return _export(
        module, prefix, _protenix_transition, _protenix_attention, lambda i: _protenix_block(prefix, i), False
    )


def alphafold3_pytorch_state_dict(
    module: nn.Module, prefix: str = "", *, branch: bool = True
) -> dict[str, Tensor]:
    """The inverse of :func:`load_alphafold3_pytorch_state_dict`: our weights under its names.

    branch: the hyper-connection layout (``layers.{i}.2.branch.``, 0.7.x); False: the earlier one.
    Pair LayerNorm offsets are written as zeros (``nn.LayerNorm`` has one, ours does not).
    """
    return _export(
        module, prefix, _lucid_transition, _lucid_attention, lambda i: _lucid_block(prefix, i, branch), True
    )
