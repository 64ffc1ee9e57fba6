"""Fused AdaLN kernels against the PyTorch reference, eager and under ``torch.compile``, on one GPU.

For each op and shape: forward, and forward + backward, timed with ``triton.testing.do_bench`` (median,
after warm-up) for three implementations run in this process on the same random inputs: the eager
reference (``backend="torch"``), ``torch.compile`` of that reference, and ours (``backend="triton"``).
Achieved bandwidth counts each tensor once: forward reads the inputs and writes the outputs; backward
reads the inputs and the output gradients and writes the input gradients. It is printed in TB/s and as
a fraction of a device-to-device copy measured here (bytes read + written), with ratios ours / eager and
ours / compiled.

Shapes: DiT-XL/2 at 256² (x = [B, 256, 1152], global conditions), at 512² ([32, 1024, 1152]), and the
AlphaFold3 token track ([1, 8192, 768] with per-token conditions: the elementwise part after the 384 ->
768 projections of the single conditioning).

    python benchmarks/kernels.py [--dtype bf16] [--batch-256 64] [--ops norm_modulate,gate_residual] \
        [--no-compile] [--rep-ms 100]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from adaln import functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    """One op on one shape: ``make`` builds the inputs, ``call(inputs, backend)`` runs the op."""

    op: str
    shape: str
    make: Callable[[], dict[str, Tensor | None]]
    call: Callable[[dict[str, Tensor | None], str], Tensor | tuple[Tensor, ...]]


def randn(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype)


def dit_inputs(shape: tuple[int, ...], dtype: torch.dtype, names: str) -> Callable[[], dict]:
    """The named tensors among x, y ``shape`` and global (B, C) gate, shift, scale (scale small)."""
    b, c = shape[0], shape[-1]
    sizes = {"x": shape, "y": shape, "gate": (b, c), "shift": (b, c), "scale": (b, c)}

    def make() -> dict[str, Tensor | None]:
        inputs = {name: randn(*sizes[name], dtype=dtype) for name in names.split()}
        if "scale" in inputs:
            inputs["scale"] *= 0.1
        return inputs

    return make


def af3_inputs(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[], dict]:
    def make() -> dict[str, Tensor | None]:
        return {name: randn(*shape, dtype=dtype) for name in ("x", "scale_logits", "bias")}

    return make


def cases(args: argparse.Namespace) -> list[Case]:
    dtype = DTYPES[args.dtype]
    dit_shapes = {
        f"DiT-XL/2 256² [{args.batch_256},256,1152]": (args.batch_256, 256, 1152),
        "DiT-XL/2 512² [32,1024,1152]": (32, 1024, 1152),
    }
    out = []
    for name, shape in dit_shapes.items():
        plain = dit_inputs(shape, dtype, "x shift scale")
        out += [
            Case("modulate", name, plain, lambda t, be: F.modulate(t["x"], t["shift"], t["scale"], backend=be)),
            Case("norm_modulate layer", name, plain,
                 lambda t, be: F.norm_modulate(t["x"], t["shift"], t["scale"], backend=be)),
            Case("norm_modulate rms, no shift", name, dit_inputs(shape, dtype, "x scale"),
                 lambda t, be: F.norm_modulate(t["x"], None, t["scale"], norm="rms", backend=be)),
            Case("gate_residual linear", name, dit_inputs(shape, dtype, "x y gate"),
                 lambda t, be: F.gate_residual(t["x"], t["y"], t["gate"], backend=be)),
            Case("gate_residual_norm_modulate", name, dit_inputs(shape, dtype, "x y gate shift scale"),
                 lambda t, be: F.gate_residual_norm_modulate(
                     t["x"], t["y"], t["gate"], t["shift"], t["scale"], backend=be)),
        ]  # fmt: skip
    af3 = (1, 8192, 768)
    out.append(
        Case("af3_adaptive_layernorm", "AF3 per-token [1,8192,768]", af3_inputs(af3, dtype),
             lambda t, be: F.af3_adaptive_layernorm(t["x"], t["scale_logits"], t["bias"], backend=be))
    )  # fmt: skip
    wanted = None if args.ops is None else set(args.ops.split(","))
    return [c for c in out if wanted is None or c.op.split(" ")[0] in wanted]


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def copy_bandwidth(rep_ms: int) -> float:
    """Device-to-device copy of 1 GiB, in bytes (read + written) per second."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), rep=rep_ms, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def time_case(case: Case, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median ms of forward and forward+backward for each implementation, and their byte counts."""
    from triton.testing import do_bench

    torch._dynamo.reset()  # every case compiles afresh (the lambdas below share one code object)
    inputs = case.make()
    impls = {"eager": lambda t: case.call(t, "torch"), "ours": lambda t: case.call(t, "triton")}
    if not args.no_compile:
        impls["compiled"] = torch.compile(lambda t: case.call(t, "torch"))
    outs = as_tuple(impls["eager"](inputs))
    cots = tuple(torch.randn_like(o) for o in outs)
    leaves = {k: None if v is None else v.detach().requires_grad_() for k, v in inputs.items()}
    grad_inputs = [v for v in leaves.values() if v is not None]
    fwd_bytes = nbytes(inputs.values()) + nbytes(outs)
    bwd_bytes = nbytes(inputs.values()) + nbytes(cots) + nbytes(grad_inputs)
    bytes_ = {"forward": fwd_bytes, "forward+backward": fwd_bytes + bwd_bytes}
    result = {}
    for name, fn in impls.items():
        with torch.no_grad():
            fwd = do_bench(lambda: fn(inputs), rep=args.rep_ms, return_mode="median")

        def train() -> None:
            torch.autograd.grad(as_tuple(fn(leaves)), grad_inputs, cots)

        both = do_bench(train, rep=args.rep_ms, return_mode="median")
        result[name] = {"forward": fwd, "forward+backward": both}
    ours = as_tuple(impls["ours"](inputs))
    result["max |ours - eager|"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, outs))
    result["bytes"] = bytes_
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch-256", type=int, default=64, help="batch of the DiT-XL/2 256² shape")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per timing, ms")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py measures GPU kernels and needs a CUDA device; none is available here.")

    torch.manual_seed(0)
    copy_bw = copy_bandwidth(args.rep_ms)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + written)\n")
    impls = ["eager"] + ([] if args.no_compile else ["compiled"]) + ["ours"]
    header = f"{'op':30s} {'shape':34s} {'pass':17s} " + " ".join(f"{i + ' ms':>12s}" for i in impls)
    header += f" {'ours TB/s':>10s} {'of copy':>8s} {'vs eager':>9s}"
    header += "" if args.no_compile else f" {'vs comp.':>9s}"
    print(header + f" {'max diff':>9s}")
    for case in cases(args):
        r = time_case(case, args)
        for pas in ("forward", "forward+backward"):
            ms = {i: r[i][pas] for i in impls}
            tbs = r["bytes"][pas] / (ms["ours"] * 1e-3) / 1e12
            line = f"{case.op:30s} {case.shape:34s} {pas:17s} " + " ".join(f"{ms[i]:12.3f}" for i in impls)
            line += f" {tbs:10.2f} {tbs * 1e12 / copy_bw:8.0%} {ms['eager'] / ms['ours']:8.2f}x"
            line += "" if args.no_compile else f" {ms['compiled'] / ms['ours']:8.2f}x"
            print(line + f" {r['max |ours - eager|']:9.2e}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
