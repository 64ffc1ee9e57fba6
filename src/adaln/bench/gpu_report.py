"""One GPU report: every fused kernel, module, model and the real job checked and timed on one CUDA device.

    python benchmarks/gpu_report.py --out DIR [--smoke] [--budget SECONDS] [--sections a,b]
    adaln bench gpu --out DIR ...

Writes ``DIR/report.json`` and ``DIR/report.md`` (rewritten after every section). Sections, run in this
order, each in its own slice of the budget (default 8 minutes; what a section leaves unused goes to the
ones after it) and cut off with a note when its slice is spent:

1. ``device_facts``: name, memory, versions, optional packages found, device-to-device copy bandwidth and
   bf16 matmul TFLOP/s (the ceilings the figures below are divided by).
2. ``kernel_correctness``: every fused op configuration, forward and every gradient, against the float64
   reference in fp32/bf16/fp16 at DiT-XL/2 (1152), AF3 (768, 384) and odd widths (1, 97, 8192),
   contiguous and strided inputs; bitwise-repeatable condition gradients; DiTBlock,
   AdaLNZeroResidualBlock and AF3's DiffusionTransformer with ``backend="auto"`` against the forced reference.
6. ``host_syncs``: one compiled training step of the digits DiT (the engine's loss and optimizer step)
   under ``torch.cuda.set_sync_debug_mode("error")``.
5. ``job``: the digits preset trained (bf16 autocast on CUDA) and scored through the engine, as
   ``adaln train`` runs it; a 2-process NCCL DDP run when the machine has 2 GPUs.
3. ``kernel_speed``: eager, torch.compile and ours, forward and forward+backward, TB/s and fraction of
   the copy bandwidth, at DiT-XL/2 256² and 512² and the AF3 token track.
4. ``models``: DiT-XL/2 256² batch 64 bf16 fused AdamW training and forward img/s for ours (kernels),
   ours on the reference path and diffusers' ``DiTTransformer2DModel``, each with its blocks compiled;
   AF3's DiffusionTransformer forward at N = 256 / 768 / 1536 eager, compiled and CUDA-graphed; peak memory.

Failed checks and items that raised are listed first in report.md and make the exit status 1; 0 means
every check that ran passed. ``--smoke`` runs the same code on CPU at tiny shapes (the kernels in
Triton's interpreter, ``torch.compile`` with the ``eager`` backend: dynamo's tracing without code
generation), each repeated item once, in about a minute: its figures test the report, they measure nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from adaln import kernels
from adaln.bench import cases, timing
from adaln.bench.report import Deadline, Report, Section, SliceTimeout, hard_limit

DEFAULT_BUDGET_S = 480.0
WRITE_RESERVE_S = 3.0  # kept back from the sections for the last report write
SOFT_SHARE = 0.85  # a section starts no new item after this share of its slice; the hard limit ends the slice
GiB = 2**30


# ----------------------------------------------------------------------------------------------------
# Shapes of each mode
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Every shape and count the report uses; ``FULL`` on the device, ``SMOKE`` on CPU."""

    tokens: tuple[int, int]  # (B, N) of the correctness inputs
    dit_width: int
    af3_width: int
    widths: tuple[int, ...]  # the width sweep
    thin: bool  # smoke: each repeated item once (one dtype and layout per op config, in rotation, ...)
    determinism_shape: tuple[int, int, int]
    module_dit: tuple[int, int, int]  # (C, heads, tokens)
    module_af3: tuple[int, int, int, int, int, int]  # (c_token, c_single, c_pair, heads, tokens, blocks)
    speed_dit_shapes: dict[str, tuple[int, int, int]]
    speed_af3_shape: tuple[str, tuple[int, int, int]]
    speed_target_ms: float
    copy_bytes: int
    matmul_n: int
    dit: dict = field(default_factory=dict)  # DiT kwargs
    dit_batch: int = 64
    af3: dict = field(default_factory=dict)  # DiffusionTransformer kwargs
    af3_tokens: tuple[int, ...] = ()
    warmup: int = 2
    steps: int = 10
    job: dict = field(default_factory=dict)  # overrides of the digits preset
    sync: dict = field(default_factory=dict)
    ddp_steps: int = 300


FULL = Sizes(
    tokens=(3, 37), dit_width=1152, af3_width=768, widths=(1, 97, 384, 768, 8192), thin=False,
    determinism_shape=(2, 300, 1152), module_dit=(1152, 16, 256), module_af3=(768, 384, 128, 16, 128, 4),
    speed_dit_shapes={"DiT-XL/2 256² [64,256,1152]": (64, 256, 1152),
                      "DiT-XL/2 512² [32,1024,1152]": (32, 1024, 1152)},
    speed_af3_shape=("AF3 per-token [1,8192,768]", (1, 8192, 768)), speed_target_ms=100.0,
    copy_bytes=1 << 30, matmul_n=8192,
    dit=dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, num_classes=1000),
    dit_batch=64, af3=dict(c_token=768, c_single=384, c_pair=128, num_blocks=24, num_heads=16),
    af3_tokens=(256, 768, 1536), warmup=2, steps=10, job={}, sync={},
)  # fmt: skip

SMOKE = Sizes(
    tokens=(2, 5), dit_width=40, af3_width=24, widths=(1, 97, 8192), thin=True,
    determinism_shape=(1, 50, 40), module_dit=(24, 2, 9), module_af3=(16, 8, 4, 2, 8, 2),
    speed_dit_shapes={"DiT tiny [2,16,48]": (2, 16, 48)}, speed_af3_shape=("AF3 tiny [1,32,24]", (1, 32, 24)),
    speed_target_ms=0.0, copy_bytes=8 << 20, matmul_n=128,
    dit=dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10),
    dit_batch=2, af3=dict(c_token=16, c_single=8, c_pair=4, num_blocks=1, num_heads=2, super_block_size=1),
    af3_tokens=(8,), warmup=1, steps=1,
    job={"steps": 2, "batch_size": 16, "log_every": 1, "checkpoint_every": 2, "sample.per_class": 2,
         "sample.steps": 2},
    sync={"batch_size": 8, "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2},
)  # fmt: skip

DIGITS_ACCURACY_FLOOR = 0.9  # the digits preset reaches 0.999 at its CFG 1.5 (README); a broken path, ~0.1


@dataclass
class Context:
    """What the sections share: the device, the mode's sizes, the current slice and measured ceilings."""

    device: torch.device
    sizes: Sizes
    smoke: bool
    out: Path
    compile_backend: str
    deadline: Deadline = field(default_factory=lambda: Deadline.after(DEFAULT_BUDGET_S))
    kernels_reason: str | None = None  # why the fused kernels cannot run here (None: they can)
    copy_bw: float | None = None  # bytes / s
    interpreter: bool = False  # CPU tensors reach the kernels through Triton's interpreter
    facts: dict = field(default_factory=dict)  # the report's header, filled by device_facts

    def within(self, sec: Section, items: Iterable, what: str) -> Iterator:
        """``items`` while the slice lasts; a note says how many were left when it is spent."""
        items = list(items)
        for i, item in enumerate(items):
            if self.deadline.spent():
                sec.note(f"{len(items) - i} of {len(items)} {what} not run: the time slice was spent")
                return
            yield item


def _trace() -> str:
    return traceback.format_exc().rstrip()


# ----------------------------------------------------------------------------------------------------
# 1. Device facts
# ----------------------------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def device_facts(ctx: Context, sec: Section) -> None:
    """Versions, optional packages and the device's measured ceilings (into ``ctx.facts``, the report's
    header); also decides whether the kernels can run."""
    d, facts = ctx.device, ctx.facts
    cpu = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    facts.update({
        "device": torch.cuda.get_device_name(d) if d.type == "cuda" else cpu,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "triton": package_version("triton"), "diffusers": package_version("diffusers"),
    })  # fmt: skip
    if d.type == "cuda":
        p = torch.cuda.get_device_properties(d)
        facts.update(capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / GiB, 1),
                     multiprocessors=p.multi_processor_count, gpus=torch.cuda.device_count(),
                     cudnn=torch.backends.cudnn.version())
    try:
        import_module("triton")
    except Exception as e:  # not installed, or installed but unusable here
        ctx.kernels_reason = f"triton cannot be imported ({type(e).__name__}: {e})"
    if ctx.kernels_reason is None and not kernels.triton_runnable(torch.empty(1, 8, device=d)):
        ctx.kernels_reason = ("TRITON_INTERPRET=1 was not set before triton was imported" if d.type == "cpu"
                              else "adaln.kernels cannot run on this device")
    ctx.interpreter = d.type == "cpu" and ctx.kernels_reason is None
    facts["kernels"] = ctx.kernels_reason or ("Triton interpreter" if ctx.interpreter else "fused Triton kernels")
    s = ctx.sizes
    reps = 3 if ctx.smoke else 20
    ctx.copy_bw = timing.copy_bandwidth(d, s.copy_bytes, reps)
    flops = timing.matmul_flops(d, s.matmul_n, torch.bfloat16, reps)
    facts.update(copy_tb_s=ctx.copy_bw / 1e12, bf16_matmul_tflop_s=flops / 1e12)
    t = sec.table("device", ["fact", "value"])
    for k, v in facts.items():
        t.add(k, v)
    sec.note(f"copy: {s.copy_bytes / GiB:.3g} GiB device-to-device, bytes read + written; matmul: "
             f"{s.matmul_n}² bf16, 2n³ flop; medians of {reps}")
    if ctx.kernels_reason:
        sec.note(f"the fused kernels are not checked here: {ctx.kernels_reason}")


# ----------------------------------------------------------------------------------------------------
# 2. Correctness
# ----------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODULE_TOL = {False: 1e-4, True: 5e-2}
# fp32: the kernels reduce over C in another order than torch (~ sqrt(C) 2^-24 ~ 2e-6 at C = 1152), which
# attention and the MLP carry through the backward. bf16 autocast: those fp32 differences flip the bf16
# rounding of some matmul inputs, one bf16 step (2^-8) at each of a block's rounding points.


def op_matrix(s: Sizes) -> tuple[list, list]:
    """(case, dtype, C, layout) rows in two lists: every op config at its model width, contiguous, first;
    then the strided layouts and the width sweep."""
    first, rest = [], []
    for i, case in enumerate(cases.op_cases()):
        c = s.af3_width if case.op == "af3_adaptive_layernorm" else s.dit_width
        if not s.thin:
            first += [(case, dt, c, "contiguous") for dt in DTYPES]
            rest += [(case, dt, c, "strided") for dt in DTYPES]
        else:  # one dtype and layout per config, in rotation
            layout = cases.LAYOUTS[i // 3 % 2]
            (first if layout == "contiguous" else rest).append((case, DTYPES[i % 3], c, layout))
    for i, case in enumerate(cases.width_cases()):
        for j, c in enumerate(s.widths):
            dts = (DTYPES[(i + j) % 3],) if s.thin else DTYPES
            rest += [(case, dt, c, "contiguous") for dt in dts]
    return first, rest


def check_op(ctx: Context, sec: Section, case: cases.OpCase, dtype: torch.dtype, c: int, layout: str,
             gen: torch.Generator) -> None:
    b, n = ctx.sizes.tokens
    name = f"{case.name} {cases.DTYPE_NAMES[dtype]} C={c} {layout}"
    tol = cases.TOL[dtype]
    try:
        inputs = cases.make_inputs(case, (b, n, c), dtype, ctx.device, layout, gen)
        errors, compared, problems = cases.compare_to_float64(case, inputs)
    except Exception:
        sec.check(name, False, f"raised:\n{_trace()}", dtype=cases.DTYPE_NAMES[dtype], width=c, layout=layout)
        return
    worst = max(errors, key=errors.get)
    passed = all(e <= tol for e in errors.values()) and not problems and compared > 0
    detail = f"max rel. error {errors[worst]:.2e} ({worst}) {'<=' if errors[worst] <= tol else '>'} {tol:g}"
    detail += f" over {compared} values" + "".join(f"; {p}" for p in problems)
    sec.check(name, passed, detail, op=case.op, config=case.label, dtype=cases.DTYPE_NAMES[dtype], width=c,
              layout=layout, compared=compared, tol=tol, errors=errors)


def check_determinism(ctx: Context, sec: Section, gen: torch.Generator) -> None:
    shape = ctx.sizes.determinism_shape
    for case in cases.determinism_cases():
        for dtype in (torch.float32,) if ctx.sizes.thin else (torch.float32, torch.bfloat16):
            name = f"{case.name} {cases.DTYPE_NAMES[dtype]} {list(shape)}: gradients bitwise equal over two runs"
            try:
                inputs = cases.make_inputs(case, shape, dtype, ctx.device, "contiguous", gen)
                differ = cases.bitwise_repeatable(case, inputs)
            except Exception:
                sec.check(name, False, f"raised:\n{_trace()}")
                continue
            detail = "all gradients equal" if not differ else f"differ: {', '.join(differ)}"
            sec.check(name, not differ, detail, kind="determinism", compared=len(inputs))


def check_module(ctx: Context, sec: Section, mc: cases.ModuleCase, autocast: bool, table) -> None:
    precision = "bf16 autocast" if autocast else "fp32"
    name = f"{mc.name} {precision}: backend='auto' vs the forced reference"
    tol = MODULE_TOL[autocast]
    try:
        gen = torch.Generator(device=ctx.device).manual_seed(0)
        with torch.device(ctx.device):
            module = cases.randomize_(mc.build(), gen)
        inputs = mc.inputs(gen, ctx.device)
        with cases.auto_uses_interpreter(ctx.interpreter), cases.count_kernel_calls() as calls:
            auto = cases.run_module(module, inputs, mc.differentiable, autocast)
        with cases.forced_reference(), cases.count_kernel_calls() as forced_calls:
            ref = cases.run_module(module, inputs, mc.differentiable, autocast)
    except Exception:
        sec.check(name, False, f"raised:\n{_trace()}", kind="module")
        return
    errors = {k: cases.module_rel_err(auto[k], ref[k]) for k in ref}
    worst = max(errors, key=errors.get)
    used, leaked = sum(calls.values()), sum(forced_calls.values())
    passed = errors[worst] <= tol and used > 0 and leaked == 0 and set(auto) == set(ref)
    detail = (f"max rel. error {errors[worst]:.2e} ({worst}) {'<=' if errors[worst] <= tol else '>'} {tol:g} "
              f"over {len(errors)} tensors; {used} kernel calls with auto, {leaked} with the reference forced")
    sec.check(name, passed, detail, kind="module", compared=len(errors), tol=tol, worst=errors[worst])
    table.add(mc.name, precision, used, len(errors), errors[worst], worst, tol, "ok" if passed else "FAILED")


def kernel_correctness(ctx: Context, sec: Section) -> str | None:
    if ctx.kernels_reason:
        sec.note(f"skipped: {ctx.kernels_reason}")
        return "skipped"
    s = ctx.sizes
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    canonical, rest = op_matrix(s)
    for row in ctx.within(sec, canonical, "op checks"):
        check_op(ctx, sec, *row, gen)
    check_determinism(ctx, sec, gen)
    table = sec.table("modules: backend='auto' vs the forced reference (relative error, worst tensor)",
                      ["module", "precision", "kernel calls", "tensors", "max rel. error", "worst", "tol", ""])
    modules = cases.module_cases(s.module_dit, s.module_af3)
    module_runs = [(mc, ac) for mc in modules for ac in (False, True)]
    if s.thin:
        module_runs = [(mc, i % 2 == 1) for i, mc in enumerate(modules)]
    for mc, autocast in ctx.within(sec, module_runs, "module checks"):
        check_module(ctx, sec, mc, autocast, table)
    for row in ctx.within(sec, rest, "op checks (strided layouts, width sweep)"):
        check_op(ctx, sec, *row, gen)
    _summarise_ops(sec)
    if ctx.interpreter:
        sec.note("kernels ran in Triton's CPU interpreter; for the module checks backend='auto' was let "
                 "pick the kernels for CPU tensors")
    return None


def _summarise_ops(sec: Section) -> None:
    """One row per (op, dtype): checks, values compared and the worst relative error against float64."""
    t = sec.table("ops vs the float64 reference (every output and gradient)",
                  ["op", "dtype", "checks", "failed", "values compared", "widths", "max rel. error", "tol"])
    groups: dict[tuple[str, str], list] = {}
    for c in sec.checks:
        if "op" in c.values:
            groups.setdefault((c.values["op"], c.values["dtype"]), []).append(c)
    ops_order = [c.op for c in cases.op_cases()]
    dtype_order = [cases.DTYPE_NAMES[dt] for dt in DTYPES]
    for (op, dtype), checks in sorted(groups.items(), key=lambda kv: (ops_order.index(kv[0][0]),
                                                                        dtype_order.index(kv[0][1]))):
        worst = max((max(c.values["errors"].values()) for c in checks), default=float("nan"))
        widths = ",".join(str(w) for w in sorted({c.values["width"] for c in checks}))
        t.add(op, dtype, len(checks), sum(not c.passed for c in checks), sum(c.values["compared"] for c in checks),
              widths, worst, checks[0].values["tol"])
    ops = [c for c in sec.checks if "op" in c.values]
    sec.summary.update(op_checks=len(ops), values_compared=sum(c.values["compared"] for c in ops),
                       failed=sum(not c.passed for c in sec.checks))


# ----------------------------------------------------------------------------------------------------
# 3. Kernel speed
# ----------------------------------------------------------------------------------------------------


def _nbytes(ts: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def time_op(ctx: Context, case: cases.OpCase, shape: tuple[int, int, int]) -> dict[str, dict[str, float]]:
    """Median ms of forward and forward+backward for eager, compiled and ours; bytes each pass moves
    (each tensor once: inputs and outputs; backward adds the output gradients and the input gradients)."""
    d, s = ctx.device, ctx.sizes
    torch._dynamo.reset()  # every case compiles afresh (the lambdas below share one code object)
    gen = torch.Generator(device=d).manual_seed(0)
    inputs = cases.make_inputs(case, shape, torch.bfloat16, d, "contiguous", gen)
    impls = {
        "eager": lambda t: case.call(t, "torch"),
        "compiled": torch.compile(lambda t: case.call(t, "torch"), backend=ctx.compile_backend),
        "ours": lambda t: case.call(t, "triton"),
    }
    outs = impls["eager"](inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = tuple(torch.randn_like(o) for o in outs)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    fwd = _nbytes(inputs.values()) + _nbytes(outs)
    bwd = 2 * _nbytes(inputs.values()) + _nbytes(cots)  # reads inputs and cotangents, writes input gradients
    result: dict[str, dict[str, float]] = {"bytes": {"forward": fwd, "forward+backward": fwd + bwd}}
    for name, fn in impls.items():
        def forward(fn=fn) -> None:
            with torch.no_grad():
                fn(inputs)

        def train(fn=fn) -> None:
            out = fn(leaves)
            torch.autograd.grad(out if isinstance(out, tuple) else (out,), list(leaves.values()), cots)

        result[name] = {}
        for pas, call in (("forward", forward), ("forward+backward", train)):
            reps = timing.reps_for(call, d, s.speed_target_ms, low=10) if s.speed_target_ms else 1
            result[name][pas] = timing.time_ms(call, d, reps=reps, warmup=s.warmup)
    return result


def kernel_speed(ctx: Context, sec: Section) -> str | None:
    if ctx.kernels_reason:
        sec.note(f"skipped: {ctx.kernels_reason}")
        return "skipped"
    s = ctx.sizes
    if ctx.copy_bw is None:
        ctx.copy_bw = timing.copy_bandwidth(ctx.device, s.copy_bytes, 3 if ctx.smoke else 20)
    first_dit = next(iter(s.speed_dit_shapes.items()))
    work = [(first_dit, c) for c in cases.speed_cases()] + [(s.speed_af3_shape, cases.af3_case(True))]
    work += [(shape, c) for shape in list(s.speed_dit_shapes.items())[1:] for c in cases.speed_cases()]
    if s.thin:
        work = [work[0], work[len(cases.speed_cases())]]
    t = sec.table("bf16, median ms (L2 flushed before each call)",
                  ["op", "shape", "pass", "eager ms", "compiled ms", "ours ms", "ours TB/s", "of copy",
                   "vs eager", "vs compiled"])
    for (label, shape), case in ctx.within(sec, work, "op timings"):
        try:
            r = time_op(ctx, case, shape)
        except Exception:
            sec.error(f"{case.name} at {label}", _trace())
            continue
        for pas in ("forward", "forward+backward"):
            ms = {i: r[i][pas] for i in ("eager", "compiled", "ours")}
            tbs = r["bytes"][pas] / (ms["ours"] * 1e-3) / 1e12
            t.add(case.name, label, pas, ms["eager"], ms["compiled"], ms["ours"], tbs, tbs * 1e12 / ctx.copy_bw,
                  ms["eager"] / ms["ours"], ms["compiled"] / ms["ours"])
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    sec.note(f"compiled: torch.compile(backend={ctx.compile_backend!r}) of the reference path; ours: "
             "backend='triton'; 'of copy' divides ours' TB/s by the measured copy bandwidth; goals: >= 85 % "
             "of copy for norm+modulate, >= 3x compiled forward+backward")
    if ctx.interpreter:
        sec.note("smoke: CPU timings of the interpreter; they test this section's code, not the kernels")
    return None


# ----------------------------------------------------------------------------------------------------
# 4. Models
# ----------------------------------------------------------------------------------------------------


def compile_blocks(module: nn.Module, backend: str) -> int:
    """``torch.compile`` each transformer block (the members of ModuleLists named ``*blocks``: ours'
    ``blocks``, diffusers' ``transformer_blocks``); regional compilation: identical blocks share one
    compiled graph, so compile time does not grow with depth. Returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            for block in child:
                block.compile(backend=backend)
                count += 1
        else:
            count += compile_blocks(child, backend)
    return count


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel with our DiT's weights, behind ``(x, t, y) -> tensor``
    (as benchmarks/dit_throughput.py)."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.model = DiTTransformer2DModel(**ours.diffusers_config())
        self.model.load_state_dict(ours.to_diffusers_state_dict())

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.model(x, timestep=t, class_labels=y).sample


def dit_steps(model: nn.Module, inputs: tuple[Tensor, ...], device: torch.device) -> dict[str, Callable[[], None]]:
    """A training step (bf16 autocast forward, MSE, backward, fused AdamW) and a no-grad forward."""
    from adaln.checks import trusted_values

    x, t, y, target = inputs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

    def train() -> None:
        model.train()
        with trusted_values(), torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, t, y)
        nnf.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        with trusted_values(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x, t, y)

    return {"train": train, "forward": forward}


def time_dit(ctx: Context, make: Callable[[], nn.Module], inputs: tuple[Tensor, ...]) -> list:
    """[train img/s, forward img/s, train peak GiB, forward peak GiB, compiled blocks] of one variant."""
    d, s = ctx.device, ctx.sizes
    torch._dynamo.reset()
    timing.reset_peak(d)
    with torch.device(d):  # initialised on the device: DiT-XL/2's 675M parameters take seconds on a CPU
        model = make().to(d)
    blocks = compile_blocks(model, ctx.compile_backend)
    fns = dit_steps(model, inputs, d)
    row = []
    for kind in ("train", "forward"):
        timing.reset_peak(d)
        for _ in range(s.warmup):
            fns[kind]()
        row.append(timing.per_second(fns[kind], s.dit_batch, s.steps, d))
        row.append(timing.peak_memory_gib(d))
    del model, fns
    return [row[0], row[2], row[1], row[3], blocks]


def models_dit(ctx: Context, sec: Section) -> None:
    from adaln.models.dit import DiT

    s, d = ctx.sizes, ctx.device
    b, size = s.dit_batch, s.dit["input_size"]
    gen = torch.Generator(device=d).manual_seed(0)
    inputs = (
        torch.randn(b, s.dit["in_channels"], size, size, generator=gen, device=d),
        torch.rand(b, generator=gen, device=d) * 999,
        torch.randint(0, s.dit["num_classes"], (b,), generator=gen, device=d),
        torch.randn(b, 2 * s.dit["in_channels"], size, size, generator=gen, device=d),  # learn_sigma output
    )

    def ours() -> nn.Module:
        torch.manual_seed(0)
        return DiT(**s.dit)

    variants: list[tuple[str, Callable[[], nn.Module], Callable]] = [
        ("ours: fused kernels", ours, nullcontext),
        ("diffusers DiTTransformer2DModel", lambda: DiffusersDiT(ours()), nullcontext),
        ("ours: reference path", ours, cases.forced_reference),
    ]
    if ctx.kernels_reason:
        variants = variants[1:]
        sec.note(f"ours with the fused kernels not timed: {ctx.kernels_reason}")
    if s.thin:
        variants = variants[:2]
        sec.note("smoke: the reference-path variant (the same code as ours) is not run")
    t = sec.table(f"DiT {s.dit['hidden_size']}x{s.dit['depth']}, patch {s.dit['patch_size']}, latent "
                  f"{size}², batch {b}, bf16 autocast, fused AdamW, blocks compiled",
                  ["model", "train img/s", "forward img/s", "train peak GiB", "forward peak GiB", "compiled blocks"])
    results = {}
    for label, make, path in ctx.within(sec, variants, "DiT variants"):
        if label.startswith("diffusers") and package_version("diffusers") is None:
            sec.note("diffusers is not installed here: its DiT is not timed (see docs/gpu_report.md to carry it)")
            continue
        try:
            with path():
                results[label] = time_dit(ctx, make, inputs)
        except Exception:
            sec.error(f"DiT {label}", _trace())
            continue
        t.add(label, *results[label])
    ours_row = results.get("ours: fused kernels")
    for other in ("diffusers DiTTransformer2DModel", "ours: reference path"):
        if ours_row and other in results:
            sec.summary[f"train ours / {other}"] = round(ours_row[0] / results[other][0], 3)
            sec.summary[f"forward ours / {other}"] = round(ours_row[1] / results[other][1], 3)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def models_af3(ctx: Context, sec: Section) -> None:
    from adaln.checks import trusted_values
    from adaln.models.af3 import DiffusionTransformer

    s, d = ctx.sizes, ctx.device
    torch.manual_seed(0)
    with torch.device(d):
        model = DiffusionTransformer(**s.af3).eval()
    t = sec.table(f"AF3 DiffusionTransformer {s.af3['c_token']}/{s.af3['c_single']}/{s.af3['c_pair']}, "
                  f"{s.af3['num_blocks']} blocks, {s.af3['num_heads']} heads, batch 1, bf16 autocast, forward",
                  ["N", "mode", "ms", "tokens/s", "peak GiB"])
    compiled = None

    def inputs(n: int) -> tuple[Tensor, ...]:
        gen = torch.Generator(device=d).manual_seed(n)
        return (torch.randn(1, n, s.af3["c_token"], generator=gen, device=d),
                torch.randn(1, n, s.af3["c_single"], generator=gen, device=d),
                torch.randn(1, n, n, s.af3["c_pair"], generator=gen, device=d), torch.ones(1, n, device=d))

    def forward(net: nn.Module, args: tuple[Tensor, ...]) -> Callable[[], object]:
        @torch.no_grad()
        def call() -> object:
            with trusted_values(), torch.autocast(d.type, dtype=torch.bfloat16, cache_enabled=False):
                return net(*args)

        return call

    # the cheap modes at every N first, then compilation (the expensive one) at each N
    work = [(n, m) for m in ("eager", "CUDA graph") for n in s.af3_tokens] + [(n, "compiled") for n in s.af3_tokens]
    for n, mode in ctx.within(sec, work, "AF3 timings"):
        if mode == "CUDA graph" and d.type != "cuda":
            sec.note("CUDA graphs need CUDA: not timed")
            continue
        try:
            args = inputs(n)
            if mode == "compiled" and compiled is None:
                torch._dynamo.reset()
                compiled = compile_blocks(model, ctx.compile_backend)
            fn = forward(model, args)
            timing.reset_peak(d)
            fn = graphed(fn) if mode == "CUDA graph" else fn
            ms = timing.time_ms(fn, d, reps=s.steps, warmup=s.warmup)
            t.add(n, mode + (f" ({compiled} blocks)" if mode == "compiled" else ""), ms, n / (ms * 1e-3),
                  timing.peak_memory_gib(d))
        except Exception:
            sec.error(f"AF3 N={n} {mode}", _trace())
    sec.note("compiled = each block torch.compile'd (regional compilation), the same as for the DiTs")


def models(ctx: Context, sec: Section) -> str | None:
    d = ctx.device
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        for name, part in (("DiT", models_dit), ("AF3", models_af3)):
            if ctx.deadline.spent():
                sec.note(f"{name} not run: the time slice was spent")
                continue
            try:
                part(ctx, sec)
            except Exception:
                sec.error(f"{name} models", _trace())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if d.type != "cuda":
        sec.note("smoke: CPU throughput at tiny sizes tests this section's code, it measures nothing; on CPU "
                 "backend='auto' runs the reference path")
    return None


# ----------------------------------------------------------------------------------------------------
# 5. The real job
# ----------------------------------------------------------------------------------------------------


def job(ctx: Context, sec: Section) -> str | None:
    """``adaln train`` on the digits preset (the engine's ``fit``), then ``DigitsTask.score``."""
    from adaln.engine import fit
    from adaln.tasks import load_run, train_config
    from adaln.tasks.digits import DigitsTask

    d = ctx.device
    run_dir = ctx.out / "job" / "digits"
    shutil.rmtree(run_dir, ignore_errors=True)  # this report's own run of an earlier call
    overrides = {"device": str(d), **ctx.sizes.job}
    task, cfg, run_dir = train_config(str(run_dir), "digits", overrides, False)
    t0 = time.perf_counter()
    result = fit(task, cfg, run_dir, resume=False, progress=False)
    train_s = time.perf_counter() - t0
    run = load_run(run_dir, device=str(d))
    t0 = time.perf_counter()
    score = DigitsTask.score(run, {"cfg": run.cfg.sample.cfg})
    eval_s = time.perf_counter() - t0
    accuracy = score["generated"]["conditional_accuracy"]
    t = sec.table("digits preset", ["device", "steps", "batch", "final loss", "train s", "steps/s", "samples",
                                    "eval s", "cfg", "accuracy", "Frechet dist.", "held-out real accuracy"])
    t.add(str(d), result.step, cfg.batch_size, result.final_loss, train_s, result.step / train_s, score["samples"],
          eval_s, score["cfg"], accuracy, score["generated"]["frechet_distance"],
          score["real_heldout"]["conditional_accuracy"])
    sec.note(f"run directory {run_dir}; bf16 autocast is the engine's on CUDA" if d.type == "cuda"
             else f"run directory {run_dir}; smoke: {result.step} steps on CPU, the accuracy means nothing")
    if not ctx.smoke:
        sec.check(f"digits accuracy at cfg {score['cfg']:g} >= {DIGITS_ACCURACY_FLOOR}",
                  accuracy >= DIGITS_ACCURACY_FLOOR, f"{accuracy:.4f} over {score['samples']} samples",
                  accuracy=accuracy)
    ddp(ctx, sec)
    return None


def ddp(ctx: Context, sec: Section) -> None:
    """A 2-process NCCL DDP run of the digits preset through ``torchrun``, when there are 2 GPUs."""
    if ctx.smoke or ctx.device.type != "cuda" or torch.cuda.device_count() < 2:
        sec.note("2-process NCCL DDP: not run (needs 2 CUDA devices"
                 + (", and not in smoke mode)" if ctx.smoke else f"; {torch.cuda.device_count()} found)"))
        return
    run_dir = ctx.out / "job" / "digits-ddp"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adaln",
           "train", "--distributed", "ddp", "--out", str(run_dir), "--steps", str(ctx.sizes.ddp_steps),
           "--device", "cuda", "--quiet"]
    t0 = time.perf_counter()
    # its own process group, so that a timeout (or the slice's end) ends torchrun and its workers together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(10.0, ctx.deadline.left() - 5))
        rc, tail = proc.returncode, output[-2000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = None, f"timed out after {e.timeout:.0f} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    sec.check("2-process NCCL DDP digits run exits 0", rc == 0, f"exit {rc} after {time.perf_counter() - t0:.1f} s"
              + ("" if rc == 0 else f":\n{tail}"), seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# 6. Host syncs
# ----------------------------------------------------------------------------------------------------


def host_syncs(ctx: Context, sec: Section) -> str | None:
    """One compiled engine training step of the digits DiT under ``set_sync_debug_mode("error")``.

    The step is the body of ``adaln.engine.loop``'s loop: the batch's indices, the learning rate, the
    task's loss under bf16 autocast with trusted values, ``optimizer_step`` (backward, clipping, AdamW,
    EMA) and the device-side finiteness flag. Two steps run first (compilation, allocator warm-up).
    """
    from adaln.checks import trusted_values
    from adaln.engine import EMA, learning_rate
    from adaln.engine.loop import optimizer_step
    from adaln.tasks import load_config

    d = ctx.device
    task_cls, cfg = load_config("digits", {"device": str(d), **ctx.sizes.sync})
    task = task_cls(cfg, d, progress=False)
    torch.manual_seed(0)
    model = task.build_model().to(d)
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net = torch.compile(model, backend=ctx.compile_backend)
    finite = torch.ones((), dtype=torch.bool, device=d)

    def step(i: int) -> None:
        nonlocal finite
        indices = task.batch(i)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, i)
        with trusted_values():
            with torch.autocast(d.type, dtype=torch.bfloat16, enabled=d.type == "cuda"):
                loss = task.loss(net, i, indices, 0)
            optimizer_step(loss, net, optimizer, ema, cfg.grad_clip)
        finite = finite & torch.isfinite(loss.detach())

    for i in range(2):
        step(i)
    name = "one compiled digits-DiT training step makes no host sync"
    if d.type != "cuda":
        step(2)
        sec.note("skipped: set_sync_debug_mode needs CUDA; the compiled step ran here without the check")
        return "skipped"
    torch.cuda.synchronize(d)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(2)
        error = None
    except RuntimeError:
        error = _trace()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(d)
    sec.check(name, error is None, "no synchronising call" if error is None else f"synchronised:\n{error}")
    sec.note(f"compiled with torch.compile(backend={ctx.compile_backend!r}); model {cfg.model.hidden_size}x"
             f"{cfg.model.depth}, batch {cfg.batch_size}; finite flag {bool(finite)}")
    return None


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SectionSpec:
    key: str
    number: int
    title: str
    run: Callable[[Context, Section], str | None]  # None, or the status "skipped"
    weight: float  # share of the budget


SECTIONS = (
    SectionSpec("device_facts", 1, "1. Device facts", device_facts, 0.03),
    SectionSpec("kernel_correctness", 2, "2. Correctness on the device", kernel_correctness, 0.24),
    SectionSpec("host_syncs", 6, "6. Host syncs", host_syncs, 0.08),
    SectionSpec("job", 5, "5. The real job", job, 0.12),
    SectionSpec("kernel_speed", 3, "3. Kernel speed", kernel_speed, 0.18),
    SectionSpec("models", 4, "4. Models", models, 0.35),
)


def run_section(spec: SectionSpec, ctx: Context, sec: Section, seconds: float) -> None:
    sec.slice_s = seconds
    ctx.deadline = Deadline.after(SOFT_SHARE * seconds)  # the last item started still has time to finish
    t0 = time.monotonic()
    status = None
    try:
        with hard_limit(seconds):
            status = spec.run(ctx, sec)
    except SliceTimeout:
        sec.note(f"cut off when its {seconds:.0f} s slice was spent: the items after the last row did not finish")
        status = "timed_out"
    except Exception:
        sec.error(f"{spec.title} raised", _trace())
    finally:
        sec.seconds = time.monotonic() - t0
        torch._dynamo.reset()  # no compiled graph (nor the memory it holds) outlives its section
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    sec.finish(status)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [s.key for s in SECTIONS]
    parser = argparse.ArgumentParser(prog="gpu_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for report.json and report.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, on CPU without CUDA (tests the report)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--sections", default=",".join(keys), help=f"comma-separated subset of {','.join(keys)}")
    args = parser.parse_args(argv)
    args.sections = [k.strip() for k in args.sections.split(",") if k.strip()]
    unknown = sorted(set(args.sections) - set(keys))
    if unknown or not args.sections:
        parser.error(f"--sections must name some of {', '.join(keys)}; got {', '.join(unknown) or 'none'}")
    if not args.budget > WRITE_RESERVE_S:
        parser.error(f"--budget must be more than {WRITE_RESERVE_S:g} seconds, got {args.budget:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the report; 0 when every check that ran passed, 1 when one failed or an item raised, 2 on bad use."""
    args = parse_args(argv)
    start = time.monotonic()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_report: no CUDA device here; the full report needs one (--smoke runs it on CPU at tiny shapes)",
              file=sys.stderr)
        return 2
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before adaln.kernels first imports triton
    out = Path(args.out)
    ctx = Context(device=torch.device("cuda" if cuda else "cpu"), sizes=SMOKE if args.smoke else FULL,
                  smoke=args.smoke, out=out, compile_backend="inductor" if cuda else "eager")
    report = Report(mode="smoke" if args.smoke else "full", budget_s=args.budget,
                    started=datetime.now(timezone.utc).isoformat(timespec="seconds"), facts=ctx.facts)
    chosen = [s for s in SECTIONS if s.key in args.sections or s.key == "device_facts"]
    torch.manual_seed(0)
    for i, spec in enumerate(chosen):
        sec = Section(spec.key, spec.number, spec.title)
        report.sections.append(sec)
        left = args.budget - WRITE_RESERVE_S - (time.monotonic() - start)
        share = spec.weight / sum(s.weight for s in chosen[i:])
        run_section(spec, ctx, sec, max(left * share, 1.0))
        report.wall_s = time.monotonic() - start
        report.write(out)
        print(f"[{i + 1}/{len(chosen)}] {spec.title}: {sec.status} ({sec.seconds:.1f} s)", flush=True)
    failures = report.failures()
    print(f"report: {out / 'report.md'} ({len(failures)} failure{'s' * (len(failures) != 1)}, "
          f"{report.wall_s:.1f} s)", flush=True)
    return report.exit_code()
