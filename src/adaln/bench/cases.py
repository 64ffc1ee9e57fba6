"""The fused ops in every configuration the report checks and times, with their inputs and comparisons.

An ``OpCase`` is one ``adaln.functional`` op in one configuration (norm, affine, gate kind, global or
per-token conditions, with or without shift); ``call(inputs, backend)`` runs it through ``backend``
("triton": the fused kernel, "torch": the reference path). ``compare_to_float64`` runs the kernel path
forward and backward on random cotangents and the reference path on the same values in float64, and
returns the relative error of every output and every input gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adaln import functional as F
from adaln import kernels

# Relative tolerance of a kernel against the float64 reference, as tests/test_kernels.py: fp32 arithmetic
# throughout; bf16/fp16 outputs and gradients are rounded once to their dtype (2^-8 / 2^-11 relative).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LAYOUTS = ("contiguous", "strided")
KERNEL_ENTRY_POINTS = ("modulate", "norm_modulate", "gate_residual", "gate_residual_norm_modulate",
                       "af3_adaptive_layernorm")


@dataclass(frozen=True)
class OpCase:
    op: str
    label: str
    per_token: bool
    conds: tuple[str, ...]  # condition tensors, (B, C) or x's shape
    call: Callable[[dict[str, Tensor], str], Tensor | tuple[Tensor, ...]]
    affine: tuple[str, ...] = ()  # (C,) weight / bias of the norm
    residual: bool = False  # takes y, x's shape

    @property
    def name(self) -> str:
        return f"{self.op} [{self.label}]"


def _where(per_token: bool) -> str:
    return "per-token" if per_token else "global"


def norm_modulate_case(norm: str, affine: str, per_token: bool, shift: bool) -> OpCase:
    names = {"w": ("weight",), "wb": ("weight", "bias"), "": ()}[affine]

    def call(t: dict[str, Tensor], backend: str) -> Tensor:
        return F.norm_modulate(t["x"], t.get("shift"), t["scale"], norm=norm, eps=1e-6, weight=t.get("weight"),
                               bias=t.get("bias"), backend=backend)

    label = f"{norm}{'+' + affine if affine else ''}, {_where(per_token)}{'' if shift else ', no shift'}"
    return OpCase("norm_modulate", label, per_token, ("shift", "scale") if shift else ("scale",), call, names)


def modulate_case(per_token: bool) -> OpCase:
    def call(t: dict[str, Tensor], backend: str) -> Tensor:
        return F.modulate(t["x"], t["shift"], t["scale"], backend=backend)

    return OpCase("modulate", _where(per_token), per_token, ("shift", "scale"), call)


def gate_residual_case(kind: str, per_token: bool) -> OpCase:
    def call(t: dict[str, Tensor], backend: str) -> Tensor:
        return F.gate_residual(t["x"], t["y"], t["gate"], kind=kind, backend=backend)

    return OpCase("gate_residual", f"{kind}, {_where(per_token)}", per_token, ("gate",), call, residual=True)


def fused_case(kind: str, norm: str, affine: str, per_token: bool, shift: bool, use_h: bool = True) -> OpCase:
    names = {"w": ("weight",), "wb": ("weight", "bias"), "": ()}[affine]

    def call(t: dict[str, Tensor], backend: str) -> Tensor | tuple[Tensor, Tensor]:
        h, out = F.gate_residual_norm_modulate(
            t["x"], t["y"], t["gate"], t.get("shift"), t["scale"], norm=norm, kind=kind, weight=t.get("weight"),
            bias=t.get("bias"), backend=backend)
        return (h, out) if use_h else out

    label = (f"{kind}, {norm}{'+' + affine if affine else ''}, {_where(per_token)}{'' if shift else ', no shift'}"
             f"{'' if use_h else ', h unused'}")
    conds = ("gate", "shift", "scale") if shift else ("gate", "scale")
    return OpCase("gate_residual_norm_modulate", label, per_token, conds, call, names, residual=True)


def af3_case(per_token: bool) -> OpCase:
    def call(t: dict[str, Tensor], backend: str) -> Tensor:
        return F.af3_adaptive_layernorm(t["x"], t["scale_logits"], t["bias"], eps=1e-5, backend=backend)

    return OpCase("af3_adaptive_layernorm", _where(per_token), per_token, ("scale_logits", "bias"), call)


def op_cases() -> list[OpCase]:
    """Every configuration of every fused op (DiT, Lumina 2 / Z-Image, PixArt, AF3 uses)."""
    return [
        norm_modulate_case("layer", "", False, True),   # DiT
        norm_modulate_case("layer", "", True, True),
        norm_modulate_case("layer", "wb", False, True),
        norm_modulate_case("layer", "wb", True, True),
        norm_modulate_case("rms", "", False, False),
        norm_modulate_case("rms", "w", False, False),   # Lumina 2 / Z-Image pre-norm
        norm_modulate_case("rms", "w", True, True),
        norm_modulate_case("rms", "", True, False),
        modulate_case(False),
        modulate_case(True),
        gate_residual_case("linear", False),
        gate_residual_case("linear", True),
        gate_residual_case("tanh", False),
        gate_residual_case("tanh", True),
        gate_residual_case("sigmoid", False),
        gate_residual_case("sigmoid", True),
        fused_case("linear", "layer", "", False, True),  # DiT's sub-block boundary
        fused_case("linear", "layer", "wb", False, True, use_h=False),
        fused_case("tanh", "rms", "w", True, False),
        fused_case("sigmoid", "layer", "wb", True, True),
        af3_case(False),
        af3_case(True),  # AF3: per-token conditions from the single embedding
    ]  # fmt: skip


def width_cases() -> list[OpCase]:
    """One configuration per op, run at every width."""
    return [norm_modulate_case("layer", "wb", False, True), norm_modulate_case("rms", "w", True, True),
            gate_residual_case("tanh", False), fused_case("linear", "layer", "wb", False, True), af3_case(True)]


def determinism_cases() -> list[OpCase]:
    """Ops whose global-condition (and affine) gradients are reductions over tokens."""
    return [norm_modulate_case("layer", "wb", False, True), gate_residual_case("linear", False),
            fused_case("linear", "layer", "wb", False, True), af3_case(False)]


def speed_cases() -> list[OpCase]:
    """The ops a DiT-XL/2 step runs (global conditions), as benchmarks/kernels.py times them."""
    return [modulate_case(False), norm_modulate_case("layer", "", False, True),
            norm_modulate_case("rms", "", False, False), gate_residual_case("linear", False),
            fused_case("linear", "layer", "", False, True)]


# ----------------------------------------------------------------------------------------------------
# inputs and comparisons
# ----------------------------------------------------------------------------------------------------


def make_inputs(case: OpCase, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, layout: str,
                gen: torch.Generator) -> dict[str, Tensor]:
    """Random normal inputs of ``case`` with x of ``shape`` (B, N, C) and ``dtype``.

    "contiguous": every tensor dense in x's dtype. "strided": x (and y) transposed views, and the
    conditions chunks of one fp32 tensor along channels (how an fp32 modulation linear hands them to the
    ops: DiT's ``adaLN_modulation(c).chunk(6)``), the affine fp32.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    b, c = shape[0], shape[-1]
    cond_shape = shape if case.per_token else (b, c)

    def randn(*size: int, dt: torch.dtype = dtype) -> Tensor:
        return torch.randn(*size, generator=gen, device=device).to(dt)

    def tokens() -> Tensor:
        if layout == "contiguous":
            return randn(*shape)
        return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)

    t = {"x": tokens()}
    if case.residual:
        t["y"] = tokens()
    if layout == "contiguous":
        t.update({name: randn(*cond_shape) for name in case.conds})
        t.update({name: randn(c) for name in case.affine})
    else:
        packed = randn(*cond_shape[:-1], len(case.conds) * c, dt=torch.float32)
        t.update(zip(case.conds, packed.chunk(len(case.conds), -1)))
        t.update({name: randn(c, dt=torch.float32) for name in case.affine})
    return t


def run_op(case: OpCase, inputs: dict[str, Tensor], backend: str, cots: list[Tensor] | None = None,
           seed: int = 1) -> tuple[list[Tensor], dict[str, Tensor], list[Tensor]]:
    """Outputs, the gradient of every input and the cotangents used: ``cots`` cast to each output's dtype,
    or (None) unit normals drawn from ``seed`` in each output's dtype."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}  # keeps the inputs' strides
    outs = case.call(leaves, backend)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    if cots is None:
        gen = torch.Generator(device=outs[0].device).manual_seed(seed)
        cots = [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outs]
    cots = [c.to(o.dtype) for c, o in zip(cots, outs)]
    grads = torch.autograd.grad(outs, list(leaves.values()), cots)
    return [o.detach() for o in outs], dict(zip(leaves, grads)), cots


def rel_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| / max(max |ref|, 1) in float64; inf when ``a`` is not finite.

    Relative to the reference, and absolute below 1 (the scale of the unit-normal inputs and cotangents):
    a gradient that is zero in exact arithmetic (LayerNorm's dx at C = 1) holds only float64 rounding
    noise, which no relative measure can compare.
    """
    if a.numel() == 0:
        return 0.0
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return (a - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)


def compare_to_float64(case: OpCase, inputs: dict[str, Tensor]) -> tuple[dict[str, float], int, list[str]]:
    """Kernel path vs the float64 reference on the same input and cotangent values: relative error per
    output / gradient, values compared and contract violations (an output not in x's dtype, a gradient
    not in its input's dtype or shape)."""
    outs, grads, cots = run_op(case, inputs, "triton")
    outs64, grads64, _ = run_op(case, {k: v.detach().double() for k, v in inputs.items()}, "torch", cots)
    errors, problems = {}, []
    for i, (o, o64) in enumerate(zip(outs, outs64)):
        if o.dtype != inputs["x"].dtype:
            problems.append(f"out{i} is {o.dtype}, x is {inputs['x'].dtype}")
        errors[f"out{i}"] = rel_err(o, o64)
    for name, g64 in grads64.items():
        g, given = grads[name], inputs[name]
        if g.dtype != given.dtype or g.shape != given.shape:
            problems.append(f"d{name} is {g.dtype} {tuple(g.shape)}, {name} is {given.dtype} {tuple(given.shape)}")
        errors[f"d{name}"] = rel_err(g, g64)
    compared = sum(o.numel() for o in outs) + sum(g.numel() for g in grads.values())
    return errors, compared, problems


def bitwise_repeatable(case: OpCase, inputs: dict[str, Tensor]) -> list[str]:
    """The gradients that differ bit for bit between two identical kernel runs."""
    _, first, cots = run_op(case, inputs, "triton", seed=2)
    _, second, _ = run_op(case, inputs, "triton", cots)
    return [f"d{name}" for name in first if not torch.equal(first[name], second[name])]


# ----------------------------------------------------------------------------------------------------
# which path backend="auto" took
# ----------------------------------------------------------------------------------------------------


@contextmanager
def count_kernel_calls() -> Iterator[dict[str, int]]:
    """Count the calls ``adaln.functional`` makes into the fused kernels (``adaln.kernels.<op>``)."""
    counts = dict.fromkeys(KERNEL_ENTRY_POINTS, 0)
    originals = {name: getattr(kernels, name) for name in KERNEL_ENTRY_POINTS}

    def counted(name: str) -> Callable:
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    try:
        for name in KERNEL_ENTRY_POINTS:
            setattr(kernels, name, counted(name))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)


@contextmanager
def auto_uses_interpreter(enabled: bool) -> Iterator[None]:
    """Let ``backend="auto"`` pick the kernels for CPU tensors under Triton's interpreter (``--smoke`` on
    CPU), so the module checks compare the kernel path there too; a no-op when ``enabled`` is False."""
    if not enabled:
        yield
        return
    original = F.use_triton

    def use_triton(backend: str, x: Tensor) -> bool:
        if backend == "auto" and not kernels.reference_forced() and kernels.triton_runnable(x):
            return True
        return original(backend, x)

    F.use_triton = use_triton
    try:
        yield
    finally:
        F.use_triton = original


@contextmanager
def forced_reference() -> Iterator[None]:
    """``backend="auto"`` runs the PyTorch reference path inside the block."""
    before = kernels.reference_forced()
    kernels.force_reference(True)
    try:
        yield
    finally:
        kernels.force_reference(before)


# ----------------------------------------------------------------------------------------------------
# whole modules: backend="auto" against the forced reference path
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleCase:
    """A module, its positional inputs ``inputs(gen, device)`` and how many leading ones get gradients."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, torch.device], tuple[Tensor, ...]]
    differentiable: int = 2


def module_cases(dit: tuple[int, int, int], af3: tuple[int, int, int, int, int, int]) -> list[ModuleCase]:
    """DiTBlock and AdaLNZeroResidualBlock at ``dit`` = (C, heads, tokens), AF3's DiffusionTransformer at
    ``af3`` = (c_token, c_single, c_pair, heads, tokens, blocks), its blocks in one super-block."""
    from adaln.models.af3 import DiffusionTransformer
    from adaln.nn import AdaLNZeroResidualBlock, Attention, DiTBlock, Mlp

    c, heads, n = dit
    ct, cs, cp, af3_heads, na, blocks = af3
    side = max(1, round(n**0.5))

    def residual_block() -> nn.Module:
        return AdaLNZeroResidualBlock(
            Attention(c, heads), nn.LayerNorm(c, eps=1e-6, elementwise_affine=False), Mlp(c, 4 * c),
            nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c), nn.Identity(), c)

    def randn(gen: torch.Generator, device: torch.device, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    def af3_inputs(gen: torch.Generator, device: torch.device) -> tuple[Tensor, ...]:
        mask = torch.ones(2, na, device=device)
        mask[1, -na // 4 :] = 0  # padded tokens in the second sample
        return randn(gen, device, 2, na, ct), randn(gen, device, 2, na, cs), randn(gen, device, 2, na, na, cp), mask

    return [
        ModuleCase(f"DiTBlock C={c}", lambda: DiTBlock(c, heads),
                   lambda g, d: (randn(g, d, 2, n, c), randn(g, d, 2, c))),
        ModuleCase(f"AdaLNZeroResidualBlock C={c}, per-token condition", residual_block,
                   lambda g, d: (randn(g, d, 2, side, side, c), randn(g, d, 2, side, side, c))),
        ModuleCase(f"AF3 DiffusionTransformer {ct}/{cs}/{cp}, {blocks} blocks",
                   lambda: DiffusionTransformer(ct, cs, cp, num_blocks=blocks, num_heads=af3_heads,
                                                super_block_size=blocks),
                   af3_inputs, differentiable=3),
    ]  # fmt: skip


def randomize_(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random weights everywhere (the zero-initialised modulations and gates would hide every kernel):
    matrices ~ N(0, 1/fan_in), 1-D weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            if p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


def run_module(module: nn.Module, inputs: tuple[Tensor, ...], differentiable: int, autocast: bool, seed: int = 3
               ) -> dict[str, Tensor]:
    """The output and the gradients of every parameter and of the first ``differentiable`` inputs for a
    seeded random cotangent, in fp32 or (``autocast``) under bf16 autocast."""
    leaves = [t.detach().requires_grad_() if i < differentiable else t for i, t in enumerate(inputs)]
    device = next(module.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = module(*leaves)
    gen = torch.Generator(device=device).manual_seed(seed)
    cot = torch.randn(out.shape, generator=gen, device=device).to(out.dtype)
    named = dict(module.named_parameters())
    named.update({f"input{i}": t for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad})
    grads = torch.autograd.grad(out, list(named.values()), cot, allow_unused=True)
    result = {"output": out.detach()}
    result.update({f"d {k}": g for k, g in zip(named, grads) if g is not None})
    return result


def module_rel_err(a: Tensor, ref: Tensor) -> float:
    """max |a - ref| / max |ref| in float64 (absolute where ref is all zero; inf when a is not finite)."""
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    scale = ref.abs().max().item()
    diff = (a - ref).abs().max().item()
    return diff / scale if scale > 0 else diff
