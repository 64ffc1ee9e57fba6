"""Fused Triton kernels vs float64 formulas written here, forward and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), reached
through ``backend="triton"``. Every output and partials buffer the kernels allocate is filled with NaN
first, so an element a kernel forgets to write fails the comparison.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from adaln import functional as F  # noqa: E402
from adaln import kernels  # noqa: E402
from adaln.kernels import triton_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

pytestmark = pytest.mark.skipif(
    not kernels.triton_runnable(torch.empty(1, 8, device=DEVICE)),
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Kernel outputs and partial sums start as NaN: unwritten elements cannot pass a comparison."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(triton_kernels, "empty", nan_empty)


# ----------------------------------------------------------------------------------------------------
# float64 formulas of the sources (DiT modulate, LayerNorm / RMSNorm, AF3 Algorithm 26)
# ----------------------------------------------------------------------------------------------------


def expand64(c, x):
    """A global (B, C) condition as (B, 1, ..., 1, C); per-token ones unchanged."""
    if c is None or c.shape == x.shape:
        return c
    return c.view(c.shape[0], *([1] * (x.dim() - 2)), c.shape[-1])


def layer_norm64(x, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def rms_norm64(x, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def act64(g, kind):
    return {"linear": g, "tanh": torch.tanh(g), "sigmoid": 1 / (1 + torch.exp(-g))}[kind]


def modulate64(x, shift, scale):
    out = x * (1 + expand64(scale, x))
    return out if shift is None else out + expand64(shift, x)


def norm_modulate64(x, shift, scale, norm, eps, weight=None, bias=None):
    n = layer_norm64(x, eps) if norm == "layer" else rms_norm64(x, eps)
    n = n if weight is None else n * weight
    n = n if bias is None else n + bias
    return modulate64(n, shift, scale)


def gate_residual64(x, y, gate, kind):
    return x + act64(expand64(gate, x), kind) * y


def af3_adaptive_layernorm64(x, scale_logits, bias, eps):
    return act64(expand64(scale_logits, x), "sigmoid") * layer_norm64(x, eps) + expand64(bias, x)


# ----------------------------------------------------------------------------------------------------
# harness
# ----------------------------------------------------------------------------------------------------


def make_inputs(spec, noncontiguous_x=False):
    """spec: name -> (shape, dtype) or None. Random normal values (never zero-initialised)."""
    out = {}
    for name, s in spec.items():
        if s is None:
            out[name] = None
            continue
        shape, dtype = s
        if name == "x" and noncontiguous_x:
            t = torch.randn(*shape[:-2], shape[-1], shape[-2], device=DEVICE).transpose(-1, -2)
        else:
            t = torch.randn(*shape, device=DEVICE)
        out[name] = t.to(dtype)
    return out


def run(fn, inputs, seed=1):
    """Outputs and gradients of every input for random cotangents (cast to each output's dtype)."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen, device=DEVICE).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, cots)
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return [o.detach() for o in outs], grads


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def assert_matches(fn, fn64, inputs, dtype):
    """fn (kernel path) vs fn64 (float64 formula on the same input values): outputs and all gradients."""
    outs, grads = run(fn, inputs)
    outs64, grads64 = run(fn64, {k: None if v is None else v.double() for k, v in inputs.items()})
    errors = {}
    for i, (o, o64) in enumerate(zip(outs, outs64)):
        assert o.dtype == inputs["x"].dtype
        errors[f"out{i}"] = rel_err(o, o64)
    for name, g64 in grads64.items():
        assert grads[name].dtype == inputs[name].dtype and grads[name].shape == inputs[name].shape
        errors[f"d{name}"] = rel_err(grads[name], g64)
    bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad}"
    return errors


def cond_shape(x_shape, per_token):
    return x_shape if per_token else (x_shape[0], x_shape[-1])


# ----------------------------------------------------------------------------------------------------
# norm_modulate / modulate
# ----------------------------------------------------------------------------------------------------

NORM_MODULATE_CASES = [
    # x shape, scale per-token, shift per-token (None: no shift), norm, affine, x dtype, cond dtype
    ((2, 37, 24), False, False, "layer", "wb", torch.float32, torch.float32),
    ((2, 37, 24), True, True, "rms", "w", torch.float32, torch.float32),
    ((3, 5, 40), False, None, "layer", "", torch.float32, torch.float32),
    ((2, 7, 24), True, False, "layer", "b", torch.float32, torch.float32),
    ((1, 50, 40), False, None, "rms", "", torch.float32, torch.float32),
    ((2, 3, 4, 96), True, True, "layer", "wb", torch.bfloat16, torch.float32),
    ((1, 50, 40), False, False, "rms", "w", torch.bfloat16, torch.bfloat16),
    ((2, 9, 24), True, True, "layer", "wb", torch.float16, torch.float16),
    ((2, 3, 1152), False, False, "layer", "wb", torch.float32, torch.float32),
    # Lumina 2 / Z-Image pre-norm: RMSNorm with its weight, scale only (AdaLNZero(shift=False))
    ((2, 7, 48), False, None, "rms", "w", torch.float32, torch.float32),
    ((2, 7, 48), False, None, "rms", "w", torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("shape,scale_tok,shift_tok,norm,affine,dtype,cdtype", NORM_MODULATE_CASES)
def test_norm_modulate_matches_float64(shape, scale_tok, shift_tok, norm, affine, dtype, cdtype):
    c = shape[-1]
    inputs = make_inputs(
        {
            "x": (shape, dtype),
            "shift": None if shift_tok is None else (cond_shape(shape, shift_tok), cdtype),
            "scale": (cond_shape(shape, scale_tok), cdtype),
            "weight": ((c,), cdtype) if "w" in affine else None,
            "bias": ((c,), cdtype) if "b" in affine else None,
        },
        noncontiguous_x=len(shape) == 3 and scale_tok,
    )

    def fused(x, shift, scale, weight, bias):
        return F.norm_modulate(x, shift, scale, norm=norm, eps=1e-6, weight=weight, bias=bias, backend="triton")

    def formula(x, shift, scale, weight, bias):
        return norm_modulate64(x, shift, scale, norm, 1e-6, weight, bias)

    assert_matches(fused, formula, inputs, dtype)


@pytest.mark.parametrize(
    "shape,per_token,shift,dtype",
    [((2, 37, 24), False, True, torch.float32), ((2, 5, 40), True, False, torch.float32),
     ((2, 5, 96), False, True, torch.bfloat16)],
)  # fmt: skip
def test_modulate_matches_float64(shape, per_token, shift, dtype):
    cs = cond_shape(shape, per_token)
    inputs = make_inputs({"x": (shape, dtype), "shift": (cs, dtype) if shift else None, "scale": (cs, dtype)})

    def fused(x, shift, scale):
        return F.modulate(x, shift, scale, backend="triton")

    assert_matches(fused, modulate64, inputs, dtype)


# ----------------------------------------------------------------------------------------------------
# gate_residual, AF3 adaptive LayerNorm
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,per_token,kind,dtype",
    [((2, 37, 24), False, "linear", torch.float32), ((2, 9, 40), True, "tanh", torch.float32),
     ((1, 50, 24), False, "tanh", torch.float32), ((2, 5, 96), False, "sigmoid", torch.bfloat16),
     ((2, 5, 24), True, "sigmoid", torch.float16)],
)  # fmt: skip
def test_gate_residual_matches_float64(shape, per_token, kind, dtype):
    inputs = make_inputs({"x": (shape, dtype), "y": (shape, dtype), "gate": (cond_shape(shape, per_token), dtype)})

    def fused(x, y, gate):
        return F.gate_residual(x, y, gate, kind=kind, backend="triton")

    def formula(x, y, gate):
        return gate_residual64(x, y, gate, kind)

    assert_matches(fused, formula, inputs, dtype)


@pytest.mark.parametrize(
    "shape,per_token,dtype",
    [((3, 11, 40), True, torch.float32), ((2, 13, 24), False, torch.float32), ((2, 6, 96), True, torch.bfloat16)],
)
def test_af3_adaptive_layernorm_matches_float64(shape, per_token, dtype):
    cs = cond_shape(shape, per_token)
    inputs = make_inputs({"x": (shape, dtype), "scale_logits": (cs, dtype), "bias": (cs, dtype)})

    def fused(x, scale_logits, bias):
        return F.af3_adaptive_layernorm(x, scale_logits, bias, eps=1e-5, backend="triton")

    def formula(x, scale_logits, bias):
        return af3_adaptive_layernorm64(x, scale_logits, bias, 1e-5)

    assert_matches(fused, formula, inputs, dtype)


# ----------------------------------------------------------------------------------------------------
# gate_residual_norm_modulate (the fused sub-block boundary)
# ----------------------------------------------------------------------------------------------------

FUSED_CASES = [
    # x shape, gate/scale per-token, shift (None/"g"/"t"), kind, norm, affine, dtype, h used downstream
    ((2, 37, 24), False, "g", "linear", "layer", "wb", torch.float32, True),
    ((2, 9, 40), True, "t", "tanh", "rms", "w", torch.float32, True),
    ((1, 50, 24), False, None, "sigmoid", "layer", "", torch.float32, False),
    ((2, 5, 96), False, "g", "linear", "layer", "wb", torch.bfloat16, True),
    ((1, 4, 1152), False, "g", "linear", "layer", "", torch.float32, True),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape,per_token,shift,kind,norm,affine,dtype,use_h", FUSED_CASES)
def test_gate_residual_norm_modulate_matches_float64(
    backend, shape, per_token, shift, kind, norm, affine, dtype, use_h
):
    c, cs = shape[-1], cond_shape(shape, per_token)
    inputs = make_inputs(
        {
            "x": (shape, dtype),
            "y": (shape, dtype),
            "gate": (cs, dtype),
            "shift": None if shift is None else (cond_shape(shape, shift == "t"), dtype),
            "scale": (cs, dtype),
            "weight": ((c,), dtype) if "w" in affine else None,
            "bias": ((c,), dtype) if "b" in affine else None,
        }
    )

    def fused(x, y, gate, shift, scale, weight, bias):
        h, out = F.gate_residual_norm_modulate(
            x, y, gate, shift, scale, norm=norm, kind=kind, weight=weight, bias=bias, backend=backend
        )
        return (h, out) if use_h else out

    def formula(x, y, gate, shift, scale, weight, bias):
        h = gate_residual64(x, y, gate, kind)
        out = norm_modulate64(h, shift, scale, norm, 1e-6, weight, bias)
        return (h, out) if use_h else out

    assert_matches(fused, formula, inputs, dtype)


# ----------------------------------------------------------------------------------------------------
# determinism, poisoning, torch.compile / custom-op registration
# ----------------------------------------------------------------------------------------------------


def test_poisoned_allocator_is_active():
    buf = triton_kernels.empty((2, 3), torch.float32, torch.device(DEVICE))
    assert torch.isnan(buf).all()


def test_gradients_are_bitwise_deterministic():
    shape = (1, 50, 40)  # one sample split over several programs: global reductions go through partials
    inputs = make_inputs(
        {"x": (shape, torch.float32), "y": (shape, torch.float32), "gate": ((1, 40), torch.float32),
         "shift": ((1, 40), torch.float32), "scale": ((1, 40), torch.float32), "weight": ((40,), torch.float32),
         "bias": ((40,), torch.float32)}
    )  # fmt: skip

    def fused(x, y, gate, shift, scale, weight, bias):
        return F.gate_residual_norm_modulate(x, y, gate, shift, scale, weight=weight, bias=bias, backend="triton")

    _, first = run(fused, inputs)
    _, second = run(fused, inputs)
    assert set(first) == {"x", "y", "gate", "shift", "scale", "weight", "bias"}
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    inputs = make_inputs(
        {"x": ((2, 6, 24), torch.float32), "y": ((2, 6, 24), torch.float32), "gate": ((2, 24), torch.float32),
         "shift": ((2, 24), torch.float32), "scale": ((2, 6, 24), torch.float32)}
    )  # fmt: skip

    def block(x, y, gate, shift, scale):
        h, out = F.gate_residual_norm_modulate(x, y, gate, shift, scale, kind="tanh", backend="triton")
        out = F.af3_adaptive_layernorm(out, scale, h, backend="triton")
        out = F.modulate(out, None, gate, backend="triton")
        y2 = F.norm_modulate(out, shift, gate, norm="rms", backend="triton")
        return F.gate_residual(out, y2, gate, backend="triton")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    outs, grads = run(block, inputs)
    outs_c, grads_c = run(compiled, inputs)
    torch.testing.assert_close(outs_c, outs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads_c, grads, rtol=1e-6, atol=1e-6)


def test_custom_ops_pass_opcheck():
    x, y, tok = (torch.randn(6, 24, device=DEVICE, requires_grad=True) for _ in range(3))
    g, s = (torch.randn(2, 24, device=DEVICE, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(24, device=DEVICE, requires_grad=True) for _ in range(2))
    ops = torch.ops.adaln
    cases = [
        (ops.norm_modulate.default, (x, g, tok, w, b, "layer", "one_plus", 1e-6)),
        (ops.norm_modulate.default, (x, None, s, None, None, "none", "sigmoid", 0.0)),
        (ops.gate_residual.default, (x, y, g, "tanh")),
        (ops.gate_residual_norm_modulate.default, (x, y, g, tok, s, w, None, "sigmoid", "rms", 1e-6)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args, raise_exception=False)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# ----------------------------------------------------------------------------------------------------
# dispatch and errors
# ----------------------------------------------------------------------------------------------------


def test_auto_dispatch_honours_triton_supported_and_force_reference(monkeypatch):
    x = torch.randn(2, 5, 24, device=DEVICE)
    scale = torch.randn(2, 24, device=DEVICE)
    calls = []
    real = kernels.norm_modulate

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(kernels, "norm_modulate", spy)
    monkeypatch.setattr(kernels, "triton_supported", lambda t: True)
    F.norm_modulate(x, None, scale)
    assert len(calls) == 1
    try:
        kernels.force_reference(True)
        F.norm_modulate(x, None, scale)
    finally:
        kernels.force_reference(False)
    assert len(calls) == 1


def test_triton_supported_needs_cuda_and_supported_input():
    assert not kernels.triton_supported(torch.randn(2, 8))
    assert not kernels.triton_runnable(torch.randn(2, 8, dtype=torch.float64))
    assert not kernels.triton_runnable(torch.randn(1, kernels.MAX_CHANNELS + 1, device=DEVICE))
    assert kernels.triton_runnable(torch.randn(2, 8, device=DEVICE, dtype=torch.bfloat16))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 5, 24, device=DEVICE)
    s = torch.randn(2, 24, device=DEVICE)
    with pytest.raises(TypeError, match="x must be one of"):
        kernels.norm_modulate(x.double(), None, s.double(), "layer", 1e-6)
    with pytest.raises(ValueError, match="scale must be global"):
        kernels.modulate(x, None, torch.randn(2, 5, 1, device=DEVICE))
    with pytest.raises(ValueError, match="norm must be one of"):
        kernels.norm_modulate(x, None, s, "batch", 1e-6)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        F.gate_residual(x.double(), x.double(), s.double(), backend="triton")
    with pytest.raises(ValueError, match="y must have x's shape"):
        F.gate_residual_norm_modulate(x, x[:, :3], s, s, s)
    with pytest.raises(ValueError, match="bias is not defined for norm='rms'"):
        F.gate_residual_norm_modulate(x, x, s, s, s, norm="rms", bias=torch.randn(24, device=DEVICE))
    with pytest.raises(ValueError, match="gate must be global"):
        F.gate_residual_norm_modulate(x, x, s[:1], s, s)


def test_raw_ops_reject_mismatched_rows():
    x = torch.randn(6, 24, device=DEVICE)
    with pytest.raises(ValueError, match="scale must be"):
        torch.ops.adaln.norm_modulate(x, None, torch.randn(4, 24, device=DEVICE), None, None, "layer", "one_plus", 1e-6)
    with pytest.raises(ValueError, match="y must be"):
        torch.ops.adaln.gate_residual(x, torch.randn(3, 24, device=DEVICE), torch.randn(2, 24, device=DEVICE), "linear")
