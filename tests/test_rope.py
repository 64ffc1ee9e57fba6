"""adaln.nn.rope against a float64 re-derivation (numpy complex numbers) and diffusers' RoPE functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaln.nn.rope import RotaryEmbedding, apply_rope, rope_angles, rope_frequencies

embeddings = pytest.importorskip("diffusers.models.embeddings")

AXES = (4, 6, 6)  # a small Flux-like split of head_dim 16 over (t, h, w)


def reference_rope(x: np.ndarray, ids: np.ndarray, axes_dim, thetas) -> np.ndarray:
    """float64: pair i = channels (2i, 2i+1) as a complex number times exp(i * pos_a * theta_a^(-2j/d_a))."""
    angles = []
    for a, (d, th) in enumerate(zip(axes_dim, thetas)):
        j = np.arange(d // 2, dtype=np.float64)
        angles.append(ids[..., a : a + 1].astype(np.float64) * th ** (-2.0 * j / d))
    rot = np.exp(1j * np.concatenate(angles, axis=-1))  # (N | B, N, D/2)
    if rot.ndim == 3:
        rot = rot[:, None]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def flux_ids(h: int, w: int, text: int) -> torch.Tensor:
    """Text ids zeros, image ids (0, row, col) as FluxPipeline builds them."""
    img = torch.zeros(h, w, 3)
    img[..., 1] += torch.arange(h)[:, None]
    img[..., 2] += torch.arange(w)[None, :]
    return torch.cat([torch.zeros(text, 3), img.reshape(h * w, 3)])


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("theta", [10000.0, (10000.0, 256.0, 50.0)])
def test_matches_float64_rederivation(per_sample, theta):
    b, heads, n = 2, 3, 7
    ids = torch.randn(b, n, 3) * 20 if per_sample else torch.randint(0, 30, (n, 3)).double()
    x = torch.randn(b, heads, n, sum(AXES), dtype=torch.float64)
    out = apply_rope(x, rope_frequencies(ids, AXES, theta, dtype=torch.float64))
    thetas = (theta,) * 3 if isinstance(theta, float) else theta
    expected = reference_rope(x.numpy(), ids.double().numpy(), AXES, thetas)
    err = np.abs(out.numpy() - expected).max()
    assert err < 1e-12, err


def test_equals_diffusers_flux_pos_embed_and_apply_rotary_emb_exactly():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = flux_ids(4, 5, text=3)
    cos, sin = RotaryEmbedding(AXES, 10000)(ids)
    ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=list(AXES))(ids)
    # diffusers stores each pair's value twice (repeat_interleave); ours once per pair
    torch.testing.assert_close(cos.repeat_interleave(2, dim=-1), ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin.repeat_interleave(2, dim=-1), ref_sin, rtol=0, atol=0)
    q = torch.randn(2, 3, ids.shape[0], sum(AXES))
    expected = embeddings.apply_rotary_emb(q, (ref_cos, ref_sin), use_real=True, use_real_unbind_dim=-1)
    torch.testing.assert_close(apply_rope(q, (cos, sin)), expected, rtol=0, atol=0)


def test_equals_get_1d_rotary_pos_embed_per_axis():
    ids = torch.rand(9, 3) * 40  # float positions
    cos, sin = rope_frequencies(ids, AXES, (10000.0, 256.0, 50.0))
    start = 0
    for a, (d, th) in enumerate(zip(AXES, (10000.0, 256.0, 50.0))):
        ref_cos, ref_sin = embeddings.get_1d_rotary_pos_embed(
            d, ids[:, a], theta=th, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
        )
        torch.testing.assert_close(cos[:, start : start + d // 2], ref_cos[:, ::2], rtol=0, atol=0)
        torch.testing.assert_close(sin[:, start : start + d // 2], ref_sin[:, ::2], rtol=0, atol=0)
        start += d // 2


def test_equals_diffusers_complex_form_lumina_z_image():
    """The complex form (Lumina 2 / Z-Image: view_as_complex on consecutive pairs) is the same rotation."""
    ids = torch.randint(0, 50, (2, 6, 3))  # per-sample positions, as Lumina 2 gathers them

    def axis(a: int, d: int) -> torch.Tensor:  # (B, N, d/2) complex, one sample at a time
        one = embeddings.get_1d_rotary_pos_embed
        return torch.stack([one(d, p[:, a].double(), theta=256.0, freqs_dtype=torch.float64) for p in ids])

    freqs_cis = torch.cat([axis(a, d) for a, d in enumerate(AXES)], dim=-1)
    x = torch.randn(2, 6, 4, sum(AXES))  # (B, S, H, D): the complex form's layout
    expected = embeddings.apply_rotary_emb(x, freqs_cis, use_real=False)
    out = apply_rope(x.transpose(1, 2), rope_frequencies(ids, AXES, 256.0)).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_z_image_rounds_angles_to_float32():
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    ids = torch.randint(0, 16, (10, 3))
    table = RopeEmbedder(theta=256.0, axes_dims=list(AXES), axes_lens=[16, 16, 16])(ids)  # complex64
    cos, sin = rope_frequencies(ids, AXES, 256.0, angle_dtype=torch.float32)
    torch.testing.assert_close(cos, table.real, rtol=0, atol=2e-7)
    torch.testing.assert_close(sin, table.imag, rtol=0, atol=2e-7)


def test_relative_positions_only():
    """<R(p) q, R(p') k> depends on p - p' only, and each pair keeps its norm."""
    q, k = torch.randn(1, 2, 5, 16, dtype=torch.float64), torch.randn(1, 2, 5, 16, dtype=torch.float64)
    ids_q, ids_k = torch.randn(5, 3, dtype=torch.float64) * 10, torch.randn(5, 3, dtype=torch.float64) * 10
    shift = torch.tensor([3.0, -7.5, 11.0], dtype=torch.float64)

    def scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rq = apply_rope(q, rope_frequencies(a, AXES, dtype=torch.float64))
        rk = apply_rope(k, rope_frequencies(b, AXES, dtype=torch.float64))
        return rq @ rk.transpose(-1, -2)

    torch.testing.assert_close(scores(ids_q, ids_k), scores(ids_q + shift, ids_k + shift), rtol=1e-10, atol=1e-10)
    rq = apply_rope(q, rope_frequencies(ids_q, AXES, dtype=torch.float64))
    torch.testing.assert_close(rq.unflatten(-1, (8, 2)).norm(dim=-1), q.unflatten(-1, (8, 2)).norm(dim=-1))


def test_zero_positions_are_identity_and_half_inputs_keep_dtype():
    x = torch.randn(2, 2, 4, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(apply_rope(x, rope_frequencies(torch.zeros(4, 3), AXES)), x, rtol=0, atol=0)
    freqs = rope_frequencies(torch.randn(4, 3), AXES)
    out = apply_rope(x, freqs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, apply_rope(x.float(), freqs).bfloat16(), rtol=0, atol=0)


def test_angles_shape_and_per_sample_equals_shared():
    ids = torch.randint(0, 9, (2, 5, 3))
    assert rope_angles(ids, AXES).shape == (2, 5, 8) and rope_angles(ids, AXES).dtype == torch.float64
    x = torch.randn(2, 3, 5, 16)
    per_sample = apply_rope(x, rope_frequencies(ids, AXES))
    for i in range(2):
        torch.testing.assert_close(per_sample[i : i + 1], apply_rope(x[i : i + 1], rope_frequencies(ids[i], AXES)))


def test_compiles_without_graph_breaks():
    rope = RotaryEmbedding(AXES)

    def f(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, rope(ids))

    x, ids = torch.randn(2, 3, 5, 16), torch.randn(5, 3)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x, ids), f(x, ids))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: RotaryEmbedding((4, 5)), "axes_dim"),
        (lambda: RotaryEmbedding(()), "axes_dim"),
        (lambda: RotaryEmbedding((4, 4), theta=(1.0, 2.0, 3.0)), "theta"),
        (lambda: RotaryEmbedding((4, 4), theta=-1.0), "theta"),
        (lambda: rope_angles(torch.zeros(5, 2), AXES), r"ids must have shape \(N, 3\)"),
        (lambda: rope_angles(torch.zeros(5), AXES), "ids"),
        (lambda: rope_frequencies(torch.zeros(5, 3), AXES, angle_dtype=torch.float16), "angle_dtype"),
        (lambda: apply_rope(torch.randn(2, 5, 16), rope_frequencies(torch.zeros(5, 3), AXES)), "x must have shape"),
        (lambda: apply_rope(torch.randn(1, 2, 6, 16), rope_frequencies(torch.zeros(5, 3), AXES)), "freqs cos"),
    ],
)
def test_bad_inputs_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_id_types_raise_type_errors():
    with pytest.raises(TypeError, match="ids"):
        rope_angles(torch.zeros(5, 3, dtype=torch.bool), AXES)
    with pytest.raises(TypeError, match="ids"):
        rope_angles([[0, 0, 0]], AXES)
    with pytest.raises(TypeError, match="pair"):
        apply_rope(torch.randn(1, 2, 5, 16), torch.zeros(5, 8))
