"""Classifier-free guidance, training noise levels and the weighted denoising loss."""

import math

import pytest
import torch

from adaln.diffusion import ClassifierFreeGuidance, denoising_loss, loss_weight, sample_training_sigmas

NUM_CLASSES = 10


class LabelDenoiser:
    """Per-sample, label-dependent toy denoiser ``(B, C, H, W)``; records every call."""

    def __init__(self):
        self.calls = []
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(NUM_CLASSES + 1, 4, generator=g)

    def __call__(self, x, sigma, y, mask=None, tag=None):
        self.calls.append(dict(batch=x.shape[0], sigma=sigma, y=y, mask=mask, tag=tag))
        w = self.table[y][:, :, None, None]
        return torch.tanh(x * w) + 0.1 * sigma.view(-1, 1, 1, 1) * w


def _inputs(b=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 3, 3, generator=g)
    return x, torch.tensor([0.3, 1.0, 5.0, 20.0])[:b], torch.tensor([1, 7, 3, 0])[:b]


def test_cfg_matches_float64_formula_in_one_batched_call():
    den = LabelDenoiser()
    x, sigma, y = _inputs()
    mask = torch.ones(4, 3, dtype=torch.bool)
    guided = ClassifierFreeGuidance(den, 2.5, null_cond={"y": NUM_CLASSES})
    out = guided(x, sigma, y=y, mask=mask, tag="keep")
    assert len(den.calls) == 1
    call = den.calls[0]
    assert call["batch"] == 8 and torch.equal(call["y"], torch.cat([y, torch.full((4,), NUM_CLASSES)]))
    assert torch.equal(call["mask"], torch.cat([mask, mask])) and call["tag"] == "keep"
    assert torch.equal(call["sigma"], torch.cat([sigma, sigma]))
    d_c = den(x, sigma, y).double()
    d_u = den(x, sigma, torch.full((4,), NUM_CLASSES)).double()
    ref = d_u + 2.5 * (d_c - d_u)
    assert out.dtype == x.dtype and (out.double() - ref).abs().max().item() < 1e-6 * ref.abs().max().item()


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    den = LabelDenoiser()
    x, sigma, y = _inputs()
    cond = ClassifierFreeGuidance(den, 1.0, null_cond={"y": NUM_CLASSES})(x, sigma, y=y)
    assert torch.equal(cond, den(x, sigma, y))
    den.calls.clear()
    uncond = ClassifierFreeGuidance(den, 0.0, null_cond={"y": NUM_CLASSES})(x, sigma, y=y)
    assert len(den.calls) == 1 and den.calls[0]["batch"] == 8
    assert torch.equal(uncond, den(x, sigma, torch.full((4,), NUM_CLASSES)))


def test_cfg_interval_is_per_sample():
    den = LabelDenoiser()
    x, sigma, y = _inputs()
    out = ClassifierFreeGuidance(den, 3.0, null_cond={"y": NUM_CLASSES}, interval=(0.5, 6.0))(x, sigma, y=y)
    full = ClassifierFreeGuidance(den, 3.0, null_cond={"y": NUM_CLASSES})(x, sigma, y=y)
    d_c = den(x, sigma, y)
    inside = [1, 2]  # sigma 1.0 and 5.0
    assert torch.equal(out[inside], full[inside])
    assert torch.allclose(out[[0, 3]], d_c[[0, 3]], rtol=0, atol=1e-7)
    assert not torch.allclose(full[[0, 3]], d_c[[0, 3]], atol=1e-3)  # guidance would have changed them


@pytest.mark.parametrize("channels", [slice(0, 3), [0, 2]])
def test_cfg_guided_channels(channels):
    den = LabelDenoiser()
    x, sigma, y = _inputs()
    guided = ClassifierFreeGuidance(den, 4.0, null_cond={"y": NUM_CLASSES}, guided_channels=channels)
    out = guided(x, sigma, y=y)
    full = ClassifierFreeGuidance(den, 4.0, null_cond={"y": NUM_CLASSES})(x, sigma, y=y)
    d_c = den(x, sigma, y)
    rest = [c for c in range(4) if c not in torch.arange(4)[channels].tolist()]
    assert torch.equal(out[:, channels], full[:, channels])
    assert torch.allclose(out[:, rest], d_c[:, rest], rtol=0, atol=1e-7)


def test_cfg_null_cond_broadcast_to_embeddings_and_float_sigma():
    seen = {}

    def den(x, sigma, emb):
        seen["emb"], seen["sigma"] = emb, sigma
        return x * emb.mean((1, 2)).view(-1, 1, 1) + sigma.view(-1, 1, 1)

    null_emb = torch.randn(5, 6)  # (L, D), broadcast over the batch
    emb = torch.randn(3, 5, 6)
    x = torch.randn(3, 2, 2)
    ClassifierFreeGuidance(den, 2.0, null_cond={"emb": null_emb})(x, 0.8, emb=emb)
    assert torch.equal(seen["emb"][3:], null_emb.expand(3, 5, 6)) and torch.equal(seen["emb"][:3], emb)
    assert torch.equal(seen["sigma"], torch.full((6,), 0.8))


def test_cfg_bad_inputs():
    den = LabelDenoiser()
    x, sigma, y = _inputs()
    with pytest.raises(ValueError, match="scale"):
        ClassifierFreeGuidance(den, -1.0, null_cond={"y": NUM_CLASSES})
    with pytest.raises(ValueError, match="null_cond"):
        ClassifierFreeGuidance(den, 2.0, null_cond={})
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(den, 2.0, null_cond={"y": 1}, interval=(5.0, 1.0))
    with pytest.raises(TypeError, match="guided_channels"):
        ClassifierFreeGuidance(den, 2.0, null_cond={"y": 1}, guided_channels="rgb")
    guided = ClassifierFreeGuidance(den, 2.0, null_cond={"y": NUM_CLASSES})
    with pytest.raises(ValueError, match="missing"):
        guided(x, sigma)
    with pytest.raises(ValueError, match="broadcast"):
        ClassifierFreeGuidance(den, 2.0, null_cond={"y": torch.zeros(3, dtype=torch.long)})(x, sigma, y=y)
    with pytest.raises(ValueError, match="sigma"):
        guided(x, torch.ones(3), y=y)


# ----------------------------------------------------------------------------- training sigmas


def test_training_sigmas_distributions_and_exact_values():
    n = 40_000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    edm = sample_training_sigmas(n, "edm", generator=g, dtype=torch.float64)
    assert (edm - torch.exp(-1.2 + 1.2 * z)).abs().max().item() < 1e-12
    af3 = sample_training_sigmas(n, "af3", generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (af3 - 16.0 * torch.exp(-1.2 + 1.5 * z)).abs().max().item() < 1e-11
    for s, (m, sd) in ((edm.log(), (-1.2, 1.2)), ((af3 / 16).log(), (-1.2, 1.5))):
        assert abs(s.mean().item() - m) < 5 * sd / math.sqrt(n)
        assert abs(s.std().item() - sd) < 5 * sd / math.sqrt(2 * n)
    custom = sample_training_sigmas(4, "af3", sigma_data=0.5, af3_p_mean=0.0, af3_p_std=0.0)
    assert torch.allclose(custom, torch.full((4,), 0.5))
    assert sample_training_sigmas(3).dtype == torch.float32


def test_training_sigmas_generator_list_batch_invariant():
    gens = lambda idx: [torch.Generator().manual_seed(50 + i) for i in idx]  # noqa: E731
    full = sample_training_sigmas(6, "af3", generator=gens(range(6)))
    for i in range(6):
        assert torch.equal(sample_training_sigmas(1, "af3", generator=gens([i]))[0], full[i])


def test_training_sigmas_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        sample_training_sigmas(4, "vp")
    with pytest.raises(ValueError, match="n"):
        sample_training_sigmas(0)
    with pytest.raises(ValueError, match="generator"):
        sample_training_sigmas(4, generator=[torch.Generator()])


# ----------------------------------------------------------------------------- loss


def test_loss_weight_values():
    s = torch.tensor([0.01, 0.5, 1.0, 16.0, 160.0], dtype=torch.float64)
    for sd in (0.5, 16.0):
        edm_ref = (s**2 + sd**2) / (s * sd) ** 2
        af3_ref = (s**2 + sd**2) / (s + sd) ** 2
        assert (loss_weight(s, sd, "edm") - edm_ref).abs().max().item() == 0
        assert (loss_weight(s, sd, "af3_paper") - af3_ref).abs().max().item() == 0
    # sigma = sd: EDM weight 2/sd^2, AF3 paper weight 1/2.
    assert loss_weight(torch.tensor(16.0), 16.0, "edm").item() == pytest.approx(2 / 256)
    assert loss_weight(torch.tensor(16.0), 16.0, "af3_paper").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(s, 1.0, "snr")


def test_perfect_denoiser_gives_zero_loss():
    x0 = torch.randn(4, 6, 3)

    def perfect(x, sigma):
        return x0

    assert denoising_loss(perfect, x0, torch.rand(4) + 0.1, sigma_data=16.0).item() == 0.0


@pytest.mark.parametrize("weighting", ["edm", "af3_paper"])
def test_denoising_loss_matches_float64_reference(weighting):
    g = torch.Generator().manual_seed(2)
    b, sd = 5, 16.0
    x0 = torch.randn(b, 7, 3, generator=g) * sd
    noise = torch.randn(b, 7, 3, generator=g)
    sigma = torch.tensor([0.1, 1.0, 8.0, 16.0, 100.0])
    w = torch.randn(3, generator=g)
    seen = {}

    def den(x, s, scale):
        seen["x"], seen["s"] = x, s
        return x * scale + w

    kw = dict(weighting=weighting, sigma_data=sd, noise=noise, scale=0.9)
    losses = denoising_loss(den, x0, sigma, reduction="none", **kw)
    x_noisy = x0.double() + sigma.double()[:, None, None] * noise.double()
    assert (seen["x"].double() - x_noisy).abs().max().item() < 1e-4 and torch.equal(seen["s"], sigma)
    err = ((x_noisy * 0.9 + w.double()) - x0.double()) ** 2
    lam = loss_weight(sigma.double(), sd, weighting)
    ref = lam * err.mean((1, 2))
    assert losses.shape == (b,) and ((losses.double() - ref).abs() / ref).max().item() < 1e-5
    mean = denoising_loss(den, x0, sigma, **kw)
    total = denoising_loss(den, x0, sigma, reduction="sum", **kw)
    assert mean.item() == pytest.approx(ref.mean().item(), rel=1e-5)
    assert total.item() == pytest.approx(ref.sum().item(), rel=1e-5)


def test_masked_loss_ignores_masked_elements():
    g = torch.Generator().manual_seed(3)
    b, n = 3, 10
    x0 = torch.randn(b, n, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(b, n, generator=g) > 0.4
    mask[:, 0] = True
    target_err = torch.randn(b, n, 3, generator=g, dtype=torch.float64)

    def den(x, s):  # exact on... nothing: a known error, and a huge one at masked atoms
        return x0 + target_err + 1e6 * (~mask)[..., None]

    losses = denoising_loss(den, x0, 2.0, sigma_data=1.0, mask=mask, reduction="none")
    m = mask.double()[..., None]
    lam = loss_weight(torch.tensor(2.0, dtype=torch.float64), 1.0)
    ref = lam * (target_err**2 * m).sum((1, 2)) / (3 * m.sum((1, 2)))
    assert (losses - ref).abs().max().item() < 1e-12
    # A full-shape mask and an all-masked sample (contributes 0).
    empty = torch.zeros(b, n, 3, dtype=torch.bool)
    assert denoising_loss(den, x0, 2.0, sigma_data=1.0, mask=empty, reduction="none").abs().max().item() == 0


def test_loss_generator_list_batch_invariant():
    gens = lambda idx: [torch.Generator().manual_seed(70 + i) for i in idx]  # noqa: E731
    x0 = torch.randn(5, 4, 3)

    def den(x, s):
        return 0.5 * x

    full = denoising_loss(den, x0, 1.5, sigma_data=1.0, generator=gens(range(5)), reduction="none")
    for i in (0, 4):
        one = denoising_loss(den, x0[i : i + 1], 1.5, sigma_data=1.0, generator=gens([i]), reduction="none")
        assert torch.equal(one[0], full[i])


def test_loss_bad_inputs():
    x0 = torch.randn(3, 4, 3)
    den = lambda x, s: x  # noqa: E731
    with pytest.raises(ValueError, match="sigma"):
        denoising_loss(den, x0, -1.0, sigma_data=1.0)
    with pytest.raises(ValueError, match="sigma"):
        denoising_loss(den, x0, torch.tensor([1.0, -1.0, 1.0]), sigma_data=1.0)
    with pytest.raises(ValueError, match="mask"):
        denoising_loss(den, x0, 1.0, sigma_data=1.0, mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="mask"):
        denoising_loss(den, x0, 1.0, sigma_data=1.0, mask=torch.ones(3))
    with pytest.raises(ValueError, match="noise"):
        denoising_loss(den, x0, 1.0, sigma_data=1.0, noise=torch.randn(3, 4))
    with pytest.raises(ValueError, match="reduction"):
        denoising_loss(den, x0, 1.0, sigma_data=1.0, reduction="max")
    with pytest.raises(ValueError, match="weighting"):
        denoising_loss(den, x0, 1.0, sigma_data=1.0, weighting="karras")
    with pytest.raises(ValueError, match="generator"):
        denoising_loss(den, x0, 1.0, sigma_data=1.0, generator=[torch.Generator()])
    with pytest.raises(TypeError, match="sigma_data"):
        denoising_loss(den, x0, 1.0)
