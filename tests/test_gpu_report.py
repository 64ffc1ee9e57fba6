"""The GPU report's smoke mode: every section runs on CPU at tiny shapes (kernels in Triton's interpreter)
and writes report.json / report.md; a wrong kernel makes it fail with the failure listed first; the
time budget cuts a section off instead of overrunning.

The whole smoke run takes about a minute on two busy CPU cores, so the tests reading it are marked slow;
the correctness-only runs (a wrong kernel, a spent budget) are not.
"""

import dataclasses
import json
import math
import time

import pytest
import torch

from adaln import kernels
from adaln.bench import cases
from adaln.bench import gpu_report
from adaln.bench.gpu_report import SECTIONS, main

ALL = [s.key for s in SECTIONS]


def read(out):
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def section(report, key):
    return next(s for s in report["sections"] if s["key"] == key)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report")
    rc = main(["--out", str(out), "--smoke"])
    return (rc, *read(out))


@pytest.mark.slow
def test_smoke_writes_a_passing_report_with_every_section(smoke):
    rc, report, md = smoke
    assert rc == 0 and report["exit_code"] == 0 and report["failures"] == []
    assert [s["key"] for s in report["sections"]] == ALL
    expected = {k: "ok" for k in ALL}
    if not torch.cuda.is_available():
        expected["host_syncs"] = "skipped"  # set_sync_debug_mode needs CUDA; the compiled step still ran
    assert {s["key"]: s["status"] for s in report["sections"]} == expected
    assert all(s["errors"] == [] for s in report["sections"])
    assert md.startswith("# adaln GPU report")
    assert md.index("## Failures: none") < md.index("## 1. Device facts") < md.index("## 6. Host syncs")
    assert report["wall_s"] < report["budget_s"]


@pytest.mark.slow
def test_correctness_compared_every_op_config_within_tolerance(smoke):
    _, report, md = smoke
    sec = section(report, "kernel_correctness")
    ops = [c for c in sec["checks"] if "op" in c["values"]]
    assert {(c.op, c.label) for c in cases.op_cases()} <= {(c["values"]["op"], c["values"]["config"]) for c in ops}
    assert {c["values"]["dtype"] for c in ops} == {"fp32", "bf16", "fp16"}
    assert {c["values"]["layout"] for c in ops} == {"contiguous", "strided"}
    assert {1, 97, 8192} <= {c["values"]["width"] for c in ops}
    for c in ops:
        v = c["values"]
        assert c["passed"], c
        assert v["compared"] > 0 and v["errors"]
        assert all(isinstance(e, float) and math.isfinite(e) and e <= v["tol"] for e in v["errors"].values()), c
    assert sec["summary"]["values_compared"] == sum(c["values"]["compared"] for c in ops) > 10_000
    determinism = [c for c in sec["checks"] if c["values"].get("kind") == "determinism"]
    assert len(determinism) == len(cases.determinism_cases()) and all(c["passed"] for c in determinism)
    modules = [c for c in sec["checks"] if c["values"].get("kind") == "module"]
    assert len(modules) == 3 and all(c["passed"] for c in modules)
    for c in modules:
        assert 0 <= c["values"]["worst"] <= c["values"]["tol"] and c["values"]["compared"] > 10
        assert " 0 kernel calls with auto" not in c["detail"] and "0 with the reference forced" in c["detail"]
    assert "| norm_modulate | fp32 |" in md


@pytest.mark.slow
def test_timing_sections_measured_positive_figures(smoke):
    _, report, _ = smoke
    facts = report["facts"]
    assert facts["copy_tb_s"] > 0 and facts["bf16_matmul_tflop_s"] > 0 and facts["triton"]
    speed = section(report, "kernel_speed")["tables"][0]
    assert len(speed["rows"]) == 4  # smoke: one DiT op and the AF3 op, forward and forward+backward
    assert all(v > 0 for row in speed["rows"] for v in row[3:6])
    dit, af3 = section(report, "models")["tables"]
    assert [r[0] for r in dit["rows"]] == ["ours: fused kernels", "diffusers DiTTransformer2DModel"]
    assert all(r[1] > 0 and r[2] > 0 and r[5] == 1 for r in dit["rows"])  # img/s; one compiled block
    assert {r[1].split(" ")[0] for r in af3["rows"]} == {"eager", "compiled"} and all(r[2] > 0 for r in af3["rows"])
    job = section(report, "job")["tables"][0]["rows"][0]
    assert job[1] == 2 and math.isfinite(job[3]) and 0 <= job[9] <= 1  # steps, final loss, accuracy


def test_a_wrong_kernel_fails_the_report_and_is_listed_first(tmp_path, monkeypatch):
    real = kernels.norm_modulate
    monkeypatch.setattr(kernels, "norm_modulate", lambda *args: real(*args) * 1.1)  # 10 %: above every tolerance
    rc = main(["--out", str(tmp_path), "--smoke", "--sections", "kernel_correctness"])
    report, md = read(tmp_path)
    assert rc == 1 and report["exit_code"] == 1
    checks = section(report, "kernel_correctness")["checks"]
    failed = [c for c in checks if not c["passed"]]
    norm_modulate_ops = [c for c in checks if c["values"].get("op") == "norm_modulate"]
    assert norm_modulate_ops and all(not c["passed"] for c in norm_modulate_ops)
    assert all(c["passed"] for c in checks if c["values"].get("op") in ("gate_residual", "modulate"))
    assert any(c["name"].startswith("DiTBlock") for c in failed)  # the module check sees it through auto
    assert len(report["failures"]) == len(failed) and report["failures"][0]["what"].startswith("norm_modulate")
    assert md.index(f"## Failures ({len(failed)})") < md.index("## 1. Device facts")
    first = md.split(f"## Failures ({len(failed)})", 1)[1].lstrip().splitlines()[0]
    assert first.startswith("- **2. Correctness on the device** · norm_modulate")


def test_a_spent_budget_cuts_the_section_off(tmp_path, monkeypatch):
    """Two sections that cannot finish in their slices, whatever the machine's speed: one loops over
    slow items through ``Context.within`` (it stops and says how many were left), one blocks past its
    slice (the hard limit cuts it off). The run still ends within the budget and writes the report."""

    def slow_items(ctx, sec):
        for _ in ctx.within(sec, range(1000), "items"):
            time.sleep(0.25)

    def stuck(ctx, sec):
        time.sleep(600)

    runs = {"kernel_correctness": slow_items, "host_syncs": stuck}
    specs = tuple(dataclasses.replace(s, run=runs[s.key]) if s.key in runs else s for s in gpu_report.SECTIONS)
    monkeypatch.setattr(gpu_report, "SECTIONS", specs)
    rc = main(["--out", str(tmp_path), "--smoke", "--sections", "kernel_correctness,host_syncs", "--budget", "8"])
    report, md = read(tmp_path)
    cut, blocked = section(report, "kernel_correctness"), section(report, "host_syncs")
    assert rc == 0
    assert any(n.startswith("of 1000 items not run", n.index(" ") + 1) for n in cut["notes"]), cut["notes"]
    assert blocked["status"] == "timed_out" and any("cut off" in n for n in blocked["notes"]), blocked
    for sec in (cut, blocked):
        assert sec["seconds"] <= sec["slice_s"] + 1.0
    assert report["wall_s"] < 8 + 2.0
    assert "## 2. Correctness on the device" in md and "## 6. Host syncs" in md


def test_bad_usage():
    with pytest.raises(SystemExit):
        main(["--out", "x", "--sections", "kernel_speed,nonsense"])
    with pytest.raises(SystemExit):
        main(["--out", "x", "--budget", "1"])
    if not torch.cuda.is_available():
        assert main(["--out", "x"]) == 2  # the full report needs CUDA
