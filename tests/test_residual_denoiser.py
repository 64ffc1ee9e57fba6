"""ResidualDenoiser against an independent float64 forward (DiT's embeddings and final layer, AdaLN-Zero
residual blocks), against DiT itself for the attention mixer, and inside the EDM training path."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaln.diffusion import denoising_loss
from adaln.models.dit import DiT, dit_edm_denoiser
from adaln.models.residual_denoiser import ResidualDenoiser

F64 = torch.float64
MIXERS = ("hyena", "attention")
SIZE, PATCH, CH, HIDDEN, DEPTH, HEADS, CLASSES = (8, 12), 2, 3, 32, 2, 4, 10


def make(mixer: str, **kw) -> ResidualDenoiser:
    return ResidualDenoiser(SIZE, PATCH, CH, HIDDEN, DEPTH, mixer=mixer, num_heads=HEADS, **kw)


def inputs(b: int = 3, dtype=torch.float32, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CH, *SIZE, generator=g, dtype=dtype)
    t = (torch.rand(b, generator=g, dtype=F64) * 999).to(dtype)
    y = torch.randint(0, CLASSES, (b,), generator=g)
    y[-1] = CLASSES  # the null class
    return x, t, y


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random non-zero values for every parameter, the zero-initialised ones included."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


# ---- independent float64 reference ----------------------------------------------------------------


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_pos_embed(dim: int, h: int, w: int) -> torch.Tensor:
    """MAE/DiT sin-cos on the (h, w) grid; token (i, j) -> [sin(j w_k), cos(j w_k), sin(i w_k), cos(i w_k)],
    w_k = 1e4^(-4k/D)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    a, b = j[..., None] * omega, i[..., None] * omega
    pe = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=-1)
    return torch.from_numpy(pe).float().double()[None]  # stored as float32, like DiT's


def ref_attention(h, sd, name, heads):
    b, gh, gw, d = h.shape
    n = gh * gw
    qkv = _lin(h.reshape(b, n, d), sd, f"{name}.qkv").reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d / heads)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return _lin((att @ v).transpose(1, 2).reshape(b, n, d), sd, f"{name}.proj").reshape(h.shape)


def ref_forward(model: ResidualDenoiser, x, t, y):
    """Eval-mode forward in float64 from the formulas. The Hyena mixer is called as a module (its own
    numerics are tested against a float64 reference in test_hyena.py); everything else is written out."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x, p, d = x.double(), PATCH, HIDDEN
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).permute(0, 2, 3, 1)
    gh, gw = tok.shape[1:3]
    if model.mixer == "attention":
        tok = tok + ref_pos_embed(d, gh, gw)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=F64) / 128)
    args = t.double()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = _lin(_silu(_lin(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    for i in range(DEPTH):
        mod = _lin(_silu(c), sd, f"blocks.{i}.condition_proj.1")
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None, None] for m in mod.chunk(6, dim=1))
        h = _ln(tok) * (1 + sc1) + sh1
        if model.mixer == "attention":
            a = ref_attention(h, sd, f"blocks.{i}.sequence_mixer", HEADS)
        else:
            a = model.blocks[i].sequence_mixer(h, conditioning=c)
        tok = tok + g1 * a
        h = _ln(tok) * (1 + sc2) + sh2
        tok = tok + g2 * _lin(_gelu_tanh(_lin(h, sd, f"blocks.{i}.mlp.fc1")), sd, f"blocks.{i}.mlp.fc2")
    mod = _lin(_silu(c), sd, "final_layer.adaLN_modulation.proj.1")
    shift, scale = (m[:, None, None] for m in mod.chunk(2, dim=1))
    out = _lin(_ln(tok) * (1 + scale) + shift, sd, "final_layer.linear")  # (B, h, w, p*p*C)
    # patch (i, j), pixel (a, b) of it -> image pixel (i*p + a, j*p + b)
    out = out.reshape(-1, gh, gw, p, p, CH).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(-1, CH, gh * p, gw * p)


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", MIXERS)
def test_matches_float64_reference(mixer):
    model = randomise(make(mixer)).double().eval()
    x, t, y = inputs(dtype=F64)
    with torch.no_grad():
        out, ref = model(x, t, y), ref_forward(model, x, t, y)
    assert out.shape == (3, CH, *SIZE) and out.dtype == F64
    assert ref.abs().max() > 0.1  # the random weights make every term contribute
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-11)


@pytest.mark.parametrize("mixer", MIXERS)
def test_float32_close_to_float64(mixer):
    model = randomise(make(mixer)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        ref = ref_forward(model.double(), x.double(), t.double(), y)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4 * ref.abs().max().item())


def test_attention_mixer_equals_dit():
    """With mixer="attention" the block is DiT's block: same weights, same function."""
    ours = randomise(make("attention")).double().eval()
    dit = DiT(SIZE, PATCH, CH, HIDDEN, DEPTH, HEADS, num_classes=CLASSES, learn_sigma=False).double().eval()
    renames = {"sequence_mixer.": "attn.", "condition_proj.": "adaLN_modulation.proj."}
    sd = {}
    for k, v in ours.state_dict().items():
        for a, b in renames.items():
            k = k.replace(a, b)
        sd[k] = v.reshape(1, -1, HIDDEN) if k == "pos_embed" else v
    dit.load_state_dict(sd)
    x, t, y = inputs(dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), dit(x, t, y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mixer", MIXERS)
def test_bfloat16(mixer):
    """bf16 weights and bf16 autocast: output in bf16, within a few bf16 roundings (eps 2^-8) of float32."""
    model = randomise(make(mixer)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x, t, y)
        half = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    for out in (autocast, half):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("mixer", MIXERS)
def test_zero_output_at_init(mixer):
    model = make(mixer)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))
    gates = [b.condition_proj[1] for b in model.blocks]
    assert all(torch.equal(g.weight, torch.zeros_like(g.weight)) for g in gates)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("size", [8, (4, 12), (12, 6)])
def test_shapes(mixer, size):
    model = randomise(ResidualDenoiser(size, 2, 1, 16, 1, mixer=mixer, num_heads=2, num_classes=3))
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 1, h, w)
    out = model(x, torch.tensor([3.0, 500.0]), torch.tensor([0, 3]))
    assert out.shape == (2, 1, h, w) and torch.isfinite(out).all()
    assert (model.input_size, model.grid_size) == ((h, w), (h // 2, w // 2))
    assert (model.in_channels, model.out_channels, model.learn_sigma) == (1, 1, False)


def test_positions_only_for_attention():
    attn, hyena = make("attention"), make("hyena")
    torch.testing.assert_close(attn.pos_embed.double(), ref_pos_embed(HIDDEN, 4, 6), rtol=0, atol=0)
    assert hyena.pos_embed is None and "pos_embed" not in hyena.state_dict()
    assert "pos_embed" not in dict(attn.named_parameters())


def _bad_inputs():
    x, t, y = inputs(b=2)
    return {
        "channels": (torch.randn(2, CH + 1, *SIZE), t, y),
        "size": (torch.randn(2, CH, 8, 8), t, y),
        "x_int": (x.long(), t, y),
        "t_shape": (x, t[:1], y),
        "y_float": (x, t, y.float()),
        "y_high": (x, t, torch.tensor([0, CLASSES + 1])),
        "y_negative": (x, t, torch.tensor([-1, 0])),
    }


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("case", sorted(_bad_inputs()))
def test_input_errors_match_dit(mixer, case):
    x, t, y = _bad_inputs()[case]
    dit = DiT(SIZE, PATCH, CH, HIDDEN, 1, HEADS, num_classes=CLASSES, learn_sigma=False)
    with pytest.raises((TypeError, ValueError)) as expected:
        dit(x, t, y)
    with pytest.raises(expected.type, match=f"^{re.escape(str(expected.value))}$"):
        make(mixer)(x, t, y)


def test_constructor_errors():
    with pytest.raises(ValueError, match="mixer must be one of"):
        make("conv")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ResidualDenoiser(8, 2, 1, 30, 1, mixer="attention", num_heads=4)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ResidualDenoiser((8, 7), 2, 1, 16, 1)
    with pytest.raises(ValueError, match="dropout_prob"):
        ResidualDenoiser(8, 2, 1, 16, 1, class_dropout_prob=1.5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_label_dropout_uses_null_class(mixer):
    model = randomise(make(mixer, class_dropout_prob=1.0))
    x, t, y = inputs()
    model.train()
    dropped = model(x, t, y, generator=torch.Generator().manual_seed(0))
    model.eval()
    torch.testing.assert_close(dropped, model(x, t, torch.full_like(y, CLASSES)), rtol=0, atol=0)
    assert not torch.allclose(dropped, model(x, t, y))


@pytest.mark.parametrize("mixer", MIXERS)
def test_training_reaches_every_parameter(mixer):
    """Step 1 changes the output (only the zeroed output layer has a gradient then); after a few steps
    every parameter has received a gradient (nothing is dead behind the zero inits)."""
    model = make(mixer, class_dropout_prob=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, y = inputs(b=4)
    y[-1] = 0
    target = torch.randn_like(x)
    reached = set()
    for step in range(4):
        loss = F.mse_loss(model(x, t, y), target)
        opt.zero_grad()
        loss.backward()
        reached |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        if step == 0:
            with torch.no_grad():
                assert model(x, t, y).abs().max() > 0
    assert reached == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("mixer", MIXERS)
def test_inside_edm_denoiser_and_loss(mixer):
    """At init the network outputs 0, so D = c_skip x and the loss has a closed form."""
    model = make(mixer)
    denoiser = dit_edm_denoiser(model, sigma_data=0.5)
    x0, _, y = inputs(b=4)
    sigma, noise = torch.tensor([0.01, 0.3, 1.0, 20.0]), torch.randn_like(x0)
    loss = denoising_loss(denoiser, x0, sigma, sigma_data=0.5, noise=noise, y=y, reduction="none")
    s = sigma.double()
    c_skip = (0.25 / (s**2 + 0.25)).view(-1, 1, 1, 1)  # EDM Table 1, sigma_data = 0.5
    weight = (s**2 + 0.25) / (s * 0.5) ** 2  # EDM lambda(sigma)
    x_noisy = (x0 + sigma.view(-1, 1, 1, 1) * noise).double()  # formed in float32, as the loss does
    expected = weight * ((c_skip * x_noisy - x0.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    loss.mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_torch_compile_aot_eager(mixer):
    """Compiled forward and backward agree with eager (same weights, same inputs)."""
    model = randomise(make(mixer)).eval()
    compiled = torch.compile(model, backend="aot_eager")
    x, t, y = inputs()
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        out = fn(x, t, y)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_e, g_e), (out_c, g_c) = grads
    # aot_eager runs the eager kernels (bit-equal here); the margin allows only decomposition reordering.
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
