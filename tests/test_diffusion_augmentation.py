"""Uniform random rotations and AF3 Algorithm 19 (CentreRandomAugmentation)."""

import numpy as np
import pytest
import torch

from adaln.diffusion import centre_random_augmentation, random_rotation


def _gens(idx, base=0):
    return [torch.Generator().manual_seed(base + i) for i in idx]


def test_rotations_orthonormal_det_one():
    r = random_rotation(2000, torch.Generator().manual_seed(0), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    assert (r @ r.transpose(1, 2) - eye).abs().max().item() < 1e-13
    assert (torch.linalg.det(r) - 1).abs().max().item() < 1e-13
    r32 = random_rotation(10, dtype=torch.float32)
    assert r32.dtype == torch.float32 and (torch.linalg.det(r32.double()) - 1).abs().max().item() < 1e-6


def test_rotations_are_haar_uniform():
    n = 40_000
    r = random_rotation(n, torch.Generator().manual_seed(1), dtype=torch.float64)
    e = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    e = e / e.norm()
    v = r @ e
    # A uniform direction: mean 0 (std of each coordinate 1/sqrt(3)), second moment I/3.
    assert v.mean(0).abs().max().item() < 5 / np.sqrt(3 * n)
    second = v.T @ v / n
    assert (second - torch.eye(3, dtype=torch.float64) / 3).abs().max().item() < 0.01
    # Haar on SO(3): entries have mean 0 and E[R_ij^2] = 1/3; trace = 1 + 2 cos(angle) with
    # angle density (1 - cos)/pi gives E[tr] = 0 and E[tr^2] = 1. A QR without sign correction fails these.
    assert r.mean(0).abs().max().item() < 5 / np.sqrt(3 * n)
    assert ((r**2).mean(0) - 1 / 3).abs().max().item() < 0.01
    tr = r.diagonal(dim1=1, dim2=2).sum(-1)
    assert abs(tr.mean().item()) < 5 / np.sqrt(n) and abs((tr**2).mean().item() - 1) < 0.05


def test_rotation_generator_list_is_per_sample():
    r = random_rotation(7, _gens(range(7)))
    for i in range(7):
        assert torch.equal(random_rotation(1, _gens([i]))[0], r[i])
    with pytest.raises(ValueError, match="generator"):
        random_rotation(3, _gens(range(2)))
    with pytest.raises(ValueError, match="n"):
        random_rotation(0)


def test_centre_random_augmentation_matches_float64_reference():
    b, n = 4, 9
    x = torch.randn(b, n, 3, dtype=torch.float64) * 5 + 2
    mask = torch.rand(b, n) > 0.3
    mask[:, 0] = True
    out = centre_random_augmentation(x, mask, s_trans=0.7, generator=_gens(range(b), 10))
    for i, g in enumerate(_gens(range(b), 10)):
        # Documented draw order per sample: rotation (from 9 float64 normals), then the translation.
        a = torch.randn((3, 3), generator=g, dtype=torch.float64).numpy()
        q, r = np.linalg.qr(a)
        q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
        if np.linalg.det(q) < 0:
            q[:, 2] *= -1
        t = 0.7 * torch.randn(3, generator=g, dtype=torch.float64)
        m = mask[i].double()[:, None]
        centre = (x[i] * m).sum(0) / m.sum()
        ref = ((x[i] - centre) @ torch.from_numpy(q) + t) * m
        assert (out[i] - ref).abs().max().item() < 1e-12


def test_centre_random_augmentation_properties():
    b, n = 5, 12
    x = torch.randn(b, n, 3, dtype=torch.float64) * 4 + 10
    mask = torch.rand(b, n) > 0.4
    mask[:, :2] = True
    out = centre_random_augmentation(x, mask, s_trans=0.0, generator=_gens([3])[0])
    m = mask.double()[..., None]
    # s_trans = 0: masked centroid at the origin; masked atoms zeroed; valid pairwise distances kept.
    assert ((out * m).sum(1) / m.sum(1)).abs().max().item() < 1e-12
    assert bool((out[~mask] == 0).all())
    for i in range(b):
        v = mask[i]
        assert (torch.cdist(out[i][v], out[i][v]) - torch.cdist(x[i][v], x[i][v])).abs().max().item() < 1e-11
    # Values at masked atoms cannot leak into valid ones.
    x_junk = x.clone()
    x_junk[~mask] = 1e6
    out_junk = centre_random_augmentation(x_junk, mask, s_trans=0.0, generator=_gens([3])[0])
    assert torch.equal(out, out_junk)
    # Unbatched mask (atoms,) equals the same mask expanded; nested atom axes (B, tokens, atoms, 3) work.
    shared = mask[0]
    a = centre_random_augmentation(x, shared, generator=torch.Generator().manual_seed(4))
    c = centre_random_augmentation(x, shared.expand(b, n), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, c)
    nested = centre_random_augmentation(x.view(b, 3, 4, 3), mask.view(b, 3, 4))
    assert nested.shape == (b, 3, 4, 3)


def test_centre_random_augmentation_no_mask_and_batch_invariance():
    x = torch.randn(6, 8, 3)
    out = centre_random_augmentation(x, generator=_gens(range(6)), s_trans=0.0)
    assert out.mean(1).abs().max().item() < 1e-5
    for i in (0, 4):
        one = centre_random_augmentation(x[i : i + 1], generator=_gens([i]), s_trans=0.0)
        assert torch.equal(one[0], out[i])


def test_centre_random_augmentation_bad_inputs():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="mask"):
        centre_random_augmentation(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask"):
        centre_random_augmentation(x, torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"\(B, \*atoms, 3\)"):
        centre_random_augmentation(torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match="s_trans"):
        centre_random_augmentation(x, s_trans=-1.0)
    with pytest.raises(TypeError, match="x"):
        centre_random_augmentation(x.long())
