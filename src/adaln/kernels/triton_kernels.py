"""Triton kernels for the AdaLN ops and the launchers that size their grids.

Every tensor here is a contiguous 2-D row matrix: ``x`` is ``(M, C)`` (all token axes flattened) and a
condition is ``(G, C)`` whose row for x row ``r`` is ``r // (M // G)`` (``G = B`` for a global condition,
``G = M`` per-token). Each row is held whole in registers (``BLOCK_C = next_power_of_2(C)``, masked), so
statistics need one read of x; all arithmetic is fp32 and results are stored in their buffer's dtype.

Backward reductions over rows (d shift/scale/gate of global conditions, d weight/bias) are deterministic:
program ``p`` reduces a fixed tile of rows inside one sample and writes its sum to row ``p`` of an fp32
partials buffer; torch then sums the partials of each sample along a fixed axis. No atomics.

This module imports triton at import time; ``adaln.kernels.ops`` imports it on first use, so
``TRITON_INTERPRET=1`` (the CPU interpreter used by the tests) takes effect when set before that call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

NORM_CODES = {"none": 0, "layer": 1, "rms": 2}
MODULATION_CODES = {"one_plus": 0, "sigmoid": 1}
GATE_CODES = {"linear": 1, "tanh": 2, "sigmoid": 3}

FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 2048
# elements of each row-sized value per thread: the backward keeps ~10 of them live (x, dy, xhat, the
# accumulators...), so it gets half the forward's (8 per thread there used 255 registers at C=1152, sm_90)
FWD_ELEMENTS_PER_THREAD = 8
BWD_ELEMENTS_PER_THREAD = 4
MAX_ROWS_PER_TILE = 16


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocate an output or partials buffer (the single allocation point; tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(g):
    # (1 - e^{-2|g|}) / (1 + e^{-2|g|}) cancels near 0, so small |g| uses the odd Taylor series
    # (next term 1382/155925 g^11 < 1e-8 relative at |g| = 0.25).
    a = tl.abs(g)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, small, large)
    return tl.where(g < 0.0, -t, t)


@triton.jit
def _gate_act(g, GATE: tl.constexpr):
    """act(g): identity (DiT), tanh (Lumina 2) or sigmoid (AF3)."""
    if GATE == 1:
        return g
    elif GATE == 2:
        return _tanh(g)
    else:
        return tl.sigmoid(g)


@triton.jit
def _gate_act_grad(a, GATE: tl.constexpr):
    """d act / d g, written in terms of a = act(g)."""
    if GATE == 1:
        return tl.full(a.shape, 1.0, tl.float32)
    elif GATE == 2:
        return 1.0 - a * a
    else:
        return a * (1.0 - a)


@triton.jit
def _modulation(s, MOD: tl.constexpr):
    """The multiplier on the normalised x: 1 + scale (DiT) or sigmoid(scale_logits) (AF3)."""
    if MOD == 0:
        return 1.0 + s
    else:
        return tl.sigmoid(s)


@triton.jit
def _normalize(x, mask, C, eps, NORM: tl.constexpr):
    """(x - mean) * rstd (LayerNorm), x * rstd (RMSNorm) or x (none), row-wise, 0 outside ``mask``."""
    if NORM == 0:
        return x, tl.full([x.shape[0]], 1.0, tl.float32)
    if NORM == 1:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
    else:
        xc = x
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _cond_offsets(rows, cols, div, C):
    return (rows // div).to(tl.int64)[:, None] * C + cols[None, :]


# ----------------------------------------------------------------------------------------------------
# norm + modulate (optionally preceded by the gated residual), forward and backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _norm_modulate_fwd(
    x_ptr, y_ptr, gate_ptr, h_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, out_ptr,
    M, C, gate_div, shift_div, scale_div, eps,
    NORM: tl.constexpr, MOD: tl.constexpr, GATE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out = norm(h) * mod(scale) + shift with h = x, or h = x + act(gate) * y stored to h_ptr."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GATE != 0:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + _cond_offsets(rows, cols, gate_div, C), mask=mask, other=0.0).to(tl.float32)
        h = (x + _gate_act(g, GATE) * y).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
        # normalise the stored h (rounded to its dtype), exactly what the unfused ops would read
        x = h.to(tl.float32)
    n, _ = _normalize(x, mask, C, eps, NORM)
    if HAS_W:
        n = n * tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        n = n + tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    s = tl.load(scale_ptr + _cond_offsets(rows, cols, scale_div, C), mask=mask, other=0.0).to(tl.float32)
    out = n * _modulation(s, MOD)
    if HAS_SHIFT:
        out += tl.load(shift_ptr + _cond_offsets(rows, cols, shift_div, C), mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_or_accumulate(acc, value, ptr, offs, mask, PER_ROW: tl.constexpr):
    """Per-token condition: store the row's gradient. Global: add it to this program's accumulator."""
    if PER_ROW:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)
        return acc
    else:
        return acc + value


@triton.jit
def _store_partial(acc, ptr, cols, C):
    """Write this program's column sums of ``acc`` to row program_id of a partials buffer."""
    tl.store(ptr + tl.program_id(0).to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=cols < C)


@triton.jit
def _norm_modulate_bwd(
    dout_ptr, x_ptr, dh_ptr, y_ptr, gate_ptr, scale_ptr, w_ptr, b_ptr,
    dx_ptr, dy_ptr, dgate_ptr, dshift_ptr, dscale_ptr, dw_ptr, db_ptr,
    M, C, group_rows, tiles_per_group, tile_rows, gate_div, scale_div, eps,
    NORM: tl.constexpr, MOD: tl.constexpr, GATE: tl.constexpr, HAS_DH: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    GATE_PER_ROW: tl.constexpr, SHIFT_PER_ROW: tl.constexpr, SCALE_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Gradients of ``_norm_modulate_fwd`` for the rows of one tile (``x_ptr`` holds h when GATE != 0).

    Program p owns rows [start, end) of sample ``p // tiles_per_group``; per-token condition gradients
    are stored directly, global ones and d weight/bias are summed into row p of a partials buffer.
    """
    pid = tl.program_id(0)
    group_start = (pid // tiles_per_group) * group_rows
    start = group_start + (pid % tiles_per_group) * tile_rows
    end = tl.minimum(start + tile_rows, group_start + group_rows)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc_dgate = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    acc_dshift = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    acc_dscale = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    acc_dw = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    acc_db = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = _normalize(x, mask, C, eps, NORM)
        n = xhat
        if HAS_W:
            n = n * w
        if HAS_B:
            n = n + b
        s_offs = _cond_offsets(rows, cols, scale_div, C)
        m = _modulation(tl.load(scale_ptr + s_offs, mask=mask, other=0.0).to(tl.float32), MOD)
        if MOD == 0:
            dscale = dout * n
        else:
            dscale = dout * n * m * (1.0 - m)
        acc_dscale = _store_or_accumulate(acc_dscale, dscale, dscale_ptr, s_offs, mask, SCALE_PER_ROW)
        if HAS_SHIFT:
            acc_dshift = _store_or_accumulate(acc_dshift, dout, dshift_ptr, offs, mask, SHIFT_PER_ROW)
        dn = dout * m
        dxhat = dn
        if HAS_W:
            acc_dw += dn * xhat
            dxhat = dn * w
        if HAS_B:
            acc_db += dn
        if NORM == 0:
            dx = dxhat
        else:
            proj = tl.sum(dxhat * xhat, axis=1)[:, None] / C
            if NORM == 1:
                dx = (dxhat - tl.sum(dxhat, axis=1)[:, None] / C - xhat * proj) * rstd[:, None]
            else:
                dx = (dxhat - xhat * proj) * rstd[:, None]
        if GATE != 0:
            if HAS_DH:
                dx += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g_offs = _cond_offsets(rows, cols, gate_div, C)
            a = _gate_act(tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(tl.float32), GATE)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + offs, (dx * a).to(dy_ptr.dtype.element_ty), mask=mask)
            acc_dgate = _store_or_accumulate(
                acc_dgate, dx * y * _gate_act_grad(a, GATE), dgate_ptr, g_offs, mask, GATE_PER_ROW
            )
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if GATE != 0:
        if not GATE_PER_ROW:
            _store_partial(acc_dgate, dgate_ptr, cols, C)
    if HAS_SHIFT:
        if not SHIFT_PER_ROW:
            _store_partial(acc_dshift, dshift_ptr, cols, C)
    if not SCALE_PER_ROW:
        _store_partial(acc_dscale, dscale_ptr, cols, C)
    if HAS_W:
        _store_partial(acc_dw, dw_ptr, cols, C)
    if HAS_B:
        _store_partial(acc_db, db_ptr, cols, C)


# ----------------------------------------------------------------------------------------------------
# gated residual alone, forward and backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gate_residual_fwd(
    x_ptr, y_ptr, gate_ptr, h_ptr, M, C, gate_div,
    GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """h = x + act(gate) * y."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + _cond_offsets(rows, cols, gate_div, C), mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, (x + _gate_act(g, GATE) * y).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_residual_bwd(
    dh_ptr, y_ptr, gate_ptr, dy_ptr, dgate_ptr,
    C, group_rows, tiles_per_group, tile_rows, gate_div,
    GATE: tl.constexpr, GATE_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dy = dh * act(gate) and d gate = dh * y * act'(gate) over one tile of rows (dx = dh needs no kernel)."""
    pid = tl.program_id(0)
    group_start = (pid // tiles_per_group) * group_rows
    start = group_start + (pid % tiles_per_group) * tile_rows
    end = tl.minimum(start + tile_rows, group_start + group_rows)
    cols = tl.arange(0, BLOCK_C)
    acc_dgate = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & (cols < C)[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_offs = _cond_offsets(rows, cols, gate_div, C)
        a = _gate_act(tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(tl.float32), GATE)
        tl.store(dy_ptr + offs, (dh * a).to(dy_ptr.dtype.element_ty), mask=mask)
        acc_dgate = _store_or_accumulate(
            acc_dgate, dh * y * _gate_act_grad(a, GATE), dgate_ptr, g_offs, mask, GATE_PER_ROW
        )
    if not GATE_PER_ROW:
        _store_partial(acc_dgate, dgate_ptr, cols, C)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _block_config(C: int, tile_elements: int, elements_per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps): whole rows padded to a power of two, several rows when C is small."""
    block_c = triton.next_power_of_2(C)
    block_m = max(1, min(MAX_ROWS_PER_TILE, tile_elements // block_c))
    num_warps = max(1, min(16, block_m * block_c // (32 * elements_per_thread)))
    return block_m, block_c, num_warps


def _programs_target(device: torch.device) -> int:
    """Backward grid size to aim for: 4 programs per SM (the CPU interpreter runs programs one by one)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _row_tiling(m: int, group_rows: int, block_m: int, device: torch.device) -> tuple[int, int, int]:
    """(tiles_per_group, tile_rows, num_programs): tiles never cross a sample, sizes fixed by the shape."""
    groups = m // group_rows
    tiles_per_group = max(1, min(triton.cdiv(group_rows, block_m), triton.cdiv(_programs_target(device), groups)))
    tile_rows = triton.cdiv(group_rows, tiles_per_group)
    tiles_per_group = triton.cdiv(group_rows, tile_rows)
    return tiles_per_group, tile_rows, groups * tiles_per_group


def _div(m: int, cond: Tensor | None) -> int:
    """Rows of x per condition row (1 per-token, tokens per sample for a global condition)."""
    return 1 if cond is None else m // cond.shape[0]


def _group_rows(m: int, *conds: Tensor | None) -> int:
    """Rows per reduction group: one sample if any condition is global, else all rows (for d weight)."""
    divs = {_div(m, c) for c in conds if c is not None} - {1}
    return divs.pop() if divs else m


def _check_rows(x: Tensor, full: dict, conds: dict, affine: dict) -> None:
    """full tensors (M, C); conditions (G, C) with G dividing M; affine (C,). Catches misuse of the raw ops."""
    m, c = x.shape
    for name, t in full.items():
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must be {tuple(x.shape)} like x, got {tuple(t.shape)}")
    for name, t in conds.items():
        if t is not None and (t.dim() != 2 or t.shape[1] != c or (m > 0 and (t.shape[0] == 0 or m % t.shape[0]))):
            raise ValueError(f"{name} must be (G, {c}) with G dividing M = {m}, got {tuple(t.shape)}")
    for name, t in affine.items():
        if t is not None and t.shape != (c,):
            raise ValueError(f"{name} must be ({c},), got {tuple(t.shape)}")


def _cond_grad(cond: Tensor, m: int, num_programs: int) -> Tensor:
    """Buffer a kernel writes a condition's gradient to: itself per-token, fp32 partials if global."""
    c = cond.shape[1]
    if _div(m, cond) == 1:
        return empty(tuple(cond.shape), cond.dtype, cond.device)
    return empty((num_programs, c), torch.float32, cond.device)


def _reduce_cond_grad(buf: Tensor, cond: Tensor, m: int) -> Tensor:
    """Sum each sample's partial rows in a fixed order (deterministic), cast to the condition's dtype."""
    if _div(m, cond) == 1:
        return buf
    return buf.view(cond.shape[0], -1, cond.shape[1]).sum(1).to(cond.dtype)


def norm_modulate_forward(
    x: Tensor,
    y: Tensor | None,
    gate: Tensor | None,
    shift: Tensor | None,
    scale: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    norm: str,
    modulation: str,
    kind: str | None,
    eps: float,
) -> tuple[Tensor | None, Tensor]:
    """Launch the forward; returns (h or None, out). x, y: (M, C); gate, shift, scale: (G, C)."""
    _check_rows(x, {"y": y}, {"gate": gate, "shift": shift, "scale": scale}, {"weight": weight, "bias": bias})
    m, c = x.shape
    h = None if y is None else empty((m, c), x.dtype, x.device)
    out = empty((m, c), x.dtype, x.device)
    if m == 0:
        return h, out
    block_m, block_c, num_warps = _block_config(c, FWD_TILE_ELEMENTS, FWD_ELEMENTS_PER_THREAD)
    _norm_modulate_fwd[(triton.cdiv(m, block_m),)](
        x, y, gate, h, shift, scale, weight, bias, out,
        m, c, _div(m, gate), _div(m, shift), _div(m, scale), eps,
        NORM=NORM_CODES[norm], MOD=MODULATION_CODES[modulation], GATE=0 if y is None else GATE_CODES[kind],
        HAS_SHIFT=shift is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return h, out


def norm_modulate_backward(
    dout: Tensor,
    dh: Tensor | None,
    x: Tensor,
    y: Tensor | None,
    gate: Tensor | None,
    shift: Tensor | None,
    scale: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    norm: str,
    modulation: str,
    kind: str | None,
    eps: float,
) -> dict[str, Tensor]:
    """Launch the backward (x is h when ``y`` is given); returns gradients keyed by input name.

    ``dh`` is the gradient arriving at h from outside the op (None when h is not used downstream).
    """
    conds = {"gate": gate, "shift": shift, "scale": scale}
    _check_rows(x, {"dout": dout, "dh": dh, "y": y}, conds, {"weight": weight, "bias": bias})
    inputs = {"x": x, "y": y, "gate": gate, "shift": shift, "scale": scale, "weight": weight, "bias": bias}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    m, c = x.shape
    if m == 0:
        return {k: torch.zeros_like(v) for k, v in inputs.items()}
    block_m, block_c, num_warps = _block_config(c, BWD_TILE_ELEMENTS, BWD_ELEMENTS_PER_THREAD)
    group_rows = _group_rows(m, gate, shift, scale)
    tiles_per_group, tile_rows, programs = _row_tiling(m, group_rows, block_m, x.device)
    grads = {"x": empty((m, c), x.dtype, x.device), "y": None if y is None else empty((m, c), y.dtype, y.device)}
    for name in ("gate", "shift", "scale"):
        grads[name] = None if name not in inputs else _cond_grad(inputs[name], m, programs)
    for name in ("weight", "bias"):
        grads[name] = None if name not in inputs else empty((programs, c), torch.float32, x.device)
    _norm_modulate_bwd[(programs,)](
        dout, x, dh, y, gate, scale, weight, bias,
        grads["x"], grads["y"], grads["gate"], grads["shift"], grads["scale"], grads["weight"], grads["bias"],
        m, c, group_rows, tiles_per_group, tile_rows, _div(m, gate), _div(m, scale), eps,
        NORM=NORM_CODES[norm], MOD=MODULATION_CODES[modulation], GATE=0 if y is None else GATE_CODES[kind],
        HAS_DH=dh is not None, HAS_SHIFT=shift is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        GATE_PER_ROW=_div(m, gate) == 1, SHIFT_PER_ROW=_div(m, shift) == 1, SCALE_PER_ROW=_div(m, scale) == 1,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    for name in ("gate", "shift", "scale"):
        if name in inputs:
            grads[name] = _reduce_cond_grad(grads[name], inputs[name], m)
    for name in ("weight", "bias"):
        if name in inputs:
            grads[name] = grads[name].sum(0).to(inputs[name].dtype)
    return {k: v for k, v in grads.items() if v is not None}


def gate_residual_forward(x: Tensor, y: Tensor, gate: Tensor, kind: str) -> Tensor:
    """Launch h = x + act(gate) * y. x, y: (M, C); gate: (G, C)."""
    _check_rows(x, {"y": y}, {"gate": gate}, {})
    m, c = x.shape
    h = empty((m, c), x.dtype, x.device)
    if m == 0:
        return h
    block_m, block_c, num_warps = _block_config(c, FWD_TILE_ELEMENTS, FWD_ELEMENTS_PER_THREAD)
    _gate_residual_fwd[(triton.cdiv(m, block_m),)](
        x, y, gate, h, m, c, _div(m, gate),
        GATE=GATE_CODES[kind], BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return h


def gate_residual_backward(dh: Tensor, y: Tensor, gate: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Launch the backward of h = x + act(gate) * y; returns (dy, dgate) (dx is dh itself)."""
    _check_rows(y, {"dh": dh}, {"gate": gate}, {})
    m, c = y.shape
    if m == 0:
        return torch.zeros_like(y), torch.zeros_like(gate)
    block_m, block_c, num_warps = _block_config(c, BWD_TILE_ELEMENTS, BWD_ELEMENTS_PER_THREAD)
    group_rows = _group_rows(m, gate)
    tiles_per_group, tile_rows, programs = _row_tiling(m, group_rows, block_m, y.device)
    dy = empty((m, c), y.dtype, y.device)
    dgate = _cond_grad(gate, m, programs)
    _gate_residual_bwd[(programs,)](
        dh, y, gate, dy, dgate, c, group_rows, tiles_per_group, tile_rows, _div(m, gate),
        GATE=GATE_CODES[kind], GATE_PER_ROW=_div(m, gate) == 1, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return dy, _reduce_cond_grad(dgate, gate, m)
