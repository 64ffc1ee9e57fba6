"""adaln.models.conformer: the conformer denoiser's pair embedding, equivariance, input checks and heads."""

import numpy as np
import pytest
import torch

pytest.importorskip("biotite")

from adaln.data import ccd  # noqa: E402
from adaln.models.conformer import ChiralityHead, ConformerDenoiser, EquivariantHead  # noqa: E402


@pytest.fixture(scope="module")
def mols():
    return {c: ccd.load_component(c) for c in ("ATP", "SER", "ALA")}


def rotation_about(axis, angle):
    """Rodrigues' formula, float64 (column-vector convention)."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def test_pair_embedding_is_linear_in_pair_features(mols):
    torch.manual_seed(0)
    model = ConformerDenoiser(c_atom=16, c_pair=8, num_blocks=2, num_heads=2, atom_dim=ccd.ATOM_FEATURES_DIM,
                              pair_code_sizes=ccd.PAIR_CODE_SIZES).double()
    atp = mols["ATP"]
    codes = torch.from_numpy(ccd.pair_codes(atp))
    z = model.pair.code_embedding(codes).detach().numpy()
    # Independent affine form: bias = every group's category 0; one-hot columns add (E[k] - E[0]).
    e = [emb.weight.detach().numpy().astype(np.float64) for emb in model.pair.embed]
    bias = sum(w[0] for w in e)
    w = np.concatenate([e[0] - e[0][0], e[1] - e[1][0], e[2][1:] - e[2][0], e[3][1:] - e[3][0]])
    ref = bias + ccd.pair_features(atp).astype(np.float64) @ w
    assert np.abs(z - ref).max() < 1e-12


def test_denoiser_is_permutation_equivariant_and_checks_inputs(mols):
    torch.manual_seed(0)
    model = ConformerDenoiser(c_atom=16, c_pair=8, num_blocks=2, num_heads=2, atom_dim=ccd.ATOM_FEATURES_DIM,
                              pair_code_sizes=ccd.PAIR_CODE_SIZES).double()
    for p in model.parameters():  # re-randomise: zero-initialised output and gates hide errors
        torch.nn.init.normal_(p, std=0.3)
    batch = ccd.collate_molecules([mols["SER"], mols["ALA"]], dtype=torch.float64)
    x = torch.randn(2, 7, 3, dtype=torch.float64) * batch.mask[..., None]
    level = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = model(x, level, atom_feats=batch.atom_feats, pair_codes=batch.pair_codes, atom_mask=batch.mask)
    assert out.dtype == torch.float64 and out.abs()[0].sum() > 0
    assert out[1, 6:].abs().sum() == 0  # padding stays zero
    perm = torch.randperm(7)
    permuted = model(
        x[:, perm], level, atom_feats=batch.atom_feats[:, perm],
        pair_codes=batch.pair_codes[:, perm][:, :, perm], atom_mask=batch.mask[:, perm],
    )
    assert (permuted[0] - out[0, perm]).abs().max() < 1e-10
    with pytest.raises(ValueError, match=r"pair_codes must have shape \(2, 7, 7, 4\)"):
        model(x, level, atom_feats=batch.atom_feats, pair_codes=batch.pair_codes[:, :6], atom_mask=batch.mask)
    with pytest.raises(TypeError, match="pair_codes must be int64"):
        model(x, level, atom_feats=batch.atom_feats, pair_codes=batch.pair_codes.float(), atom_mask=batch.mask)


def test_equivariant_head_rotates_with_input():
    torch.manual_seed(0)
    head = EquivariantHead(8, 4).double()
    for p in head.parameters():  # the weight layer is zero-initialised: re-randomise
        torch.nn.init.normal_(p, std=0.5)
    a, z = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 5, 4, dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float64)
    rot = torch.from_numpy(rotation_about([0.3, 1.0, -0.7], 1.3))
    out, rotated = head(a, z, x, mask), head(a, z, x @ rot.T + 2.0, mask)
    assert (rotated - out @ rot.T).abs().max() < 1e-12
    # independent sum for one atom: dx_0 = sum_j w_0j (x_0 - x_j) / (valid atoms)
    h = head.pair(z) + head.row(a)[:, :, None] + head.col(a)[:, None, :]
    w = head.weight(torch.nn.functional.silu(h))[..., 0]
    ref = sum(w[1, 0, j] * (x[1, 0] - x[1, j]) for j in range(3)) / 3
    assert (out[1, 0] - ref).abs().max() < 1e-12


def test_chirality_direction_moves_volume_towards_parity(mols):
    atp = mols["ATP"]
    batch = ccd.collate_molecules([atp], dtype=torch.float64)
    rng = np.random.default_rng(0)
    x = atp.coords + rng.normal(scale=0.3, size=atp.coords.shape)
    d = ChiralityHead.chirality_direction(torch.from_numpy(x)[None], batch.atom_feats, batch.pair_codes)[0].numpy()
    centres = atp.chiral_neighbours()
    assert np.abs(np.delete(d, list(centres), axis=0)).max() == 0
    for c, (n1, n2, n3) in centres.items():
        vol = lambda y: np.linalg.det(np.stack([y[n1] - y[c], y[n2] - y[c], y[n3] - y[c]]))  # noqa: E731
        moved = x.copy()
        moved[c] += 0.1 * d[c]
        u = np.cross(x[n2] - x[n1], x[n3] - x[n1])
        # the volume is affine in the centre: parity * dV = 0.1 |u| exactly
        assert atp.parity[c] * (vol(moved) - vol(x)) == pytest.approx(0.1 * np.linalg.norm(u), rel=1e-5)


def test_model_imports_no_training_code():
    import subprocess
    import sys

    code = "import sys, adaln.models.conformer; print(sorted(m for m in sys.modules if m.startswith('adaln.train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_model_reads_parity_from_the_last_atom_channel_where_the_data_puts_it():
    assert ccd.PARITY_CHANNEL == ccd.ATOM_FEATURES_DIM - 1 and list(ccd.ATOM_CHANNELS)[-1] == "parity"
