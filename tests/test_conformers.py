"""Conformer metrics, the RDKit baseline, the conformer denoiser, mmCIF output and a tiny training run."""

import itertools
import json

import numpy as np
import pytest
import torch

pytest.importorskip("biotite")

from adaln.data import ccd  # noqa: E402
from adaln.eval import conformers as cf  # noqa: E402


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Training and loading set torch's CPU thread count from the config; restore it for other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mols():
    return {c: ccd.load_component(c) for c in ("ALA", "ATP", "IMD", "BEN", "SER", "GLY", "THR", "PRO")}


def rotation_about(axis, angle):
    """Rodrigues' formula, float64 (column-vector convention)."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def horn_rmsd(p, q):
    """Optimal-superposition RMSD by Horn's quaternion method (1987): an eigenvalue, not an SVD."""
    p = p - p.mean(0)
    q = q - q.mean(0)
    s = p.T @ q
    sxx, sxy, sxz, syx, syy, syz, szx, szy, szz = s.ravel()
    n = np.array([
        [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
        [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
        [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
        [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
    ])
    lam = np.linalg.eigvalsh(n)[-1]
    return np.sqrt(max((p**2).sum() + (q**2).sum() - 2 * lam, 0.0) / len(p))


# --------------------------------------------------------------------------------------------------
# Superposition
# --------------------------------------------------------------------------------------------------


def test_kabsch_recovers_known_rotation():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(12, 3)) * 3
    rot = rotation_about([1.0, -2.0, 0.5], 2.1)
    mobile = target @ rot + np.array([4.0, -1.0, 7.5])
    r, t = cf.kabsch(mobile, target)
    np.testing.assert_allclose(r, rot.T, atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
    assert cf.kabsch_rmsd(mobile, target) < 1e-12


def test_kabsch_hand_computed():
    # collinear: +-1 vs +-2 on a line -> each atom 1 A off after the best rotation
    target = np.array([[1.0, 0, 0], [-1.0, 0, 0]])
    mobile = np.array([[0, 2.0, 0], [0, -2.0, 0]])
    assert cf.kabsch_rmsd(mobile, target) == pytest.approx(1.0, abs=1e-12)
    # one atom of four displaced by d along z, the rest exact: the optimum is not the naive sqrt(d^2/4)
    square = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    moved = square.copy()
    moved[0, 2] = 0.8
    assert cf.kabsch_rmsd(moved, square) == pytest.approx(horn_rmsd(moved, square), abs=1e-12)
    assert cf.kabsch_rmsd(moved, square) < 0.8 / 2


def test_kabsch_matches_horn_and_never_reflects():
    rng = np.random.default_rng(1)
    errors = []
    for _ in range(20):
        p, q = rng.normal(size=(2, 9, 3))
        errors.append(abs(cf.kabsch_rmsd(p, q) - horn_rmsd(p, q)))
    assert max(errors) < 1e-12
    # a mirror image cannot be superposed by a proper rotation
    x = rng.normal(size=(7, 3))
    mirror = x * np.array([1.0, 1.0, -1.0])
    r, _ = cf.kabsch(mirror, x)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
    assert cf.kabsch_rmsd(mirror, x) > 0.1
    assert cf.kabsch_rmsd(mirror, x) == pytest.approx(horn_rmsd(mirror, x), abs=1e-12)


def test_kabsch_batched():
    rng = np.random.default_rng(2)
    p = rng.normal(size=(4, 6, 3))
    q = rng.normal(size=(6, 3))
    np.testing.assert_allclose(cf.kabsch_rmsd(p, q[None]), [horn_rmsd(a, q) for a in p], atol=1e-12)
    with pytest.raises(ValueError, match="mobile must be"):
        cf.kabsch_rmsd(np.zeros((5, 2)), np.zeros((5, 3)))


def test_automorphisms_by_brute_force(mols):
    mol = mols["SER"]  # 7 heavy atoms: 5040 permutations to check
    adj = np.zeros((mol.num_atoms,) * 2, dtype=bool)
    adj[mol.bonds[:, 0], mol.bonds[:, 1]] = adj[mol.bonds[:, 1], mol.bonds[:, 0]] = True
    label = list(zip(mol.elements.tolist(), mol.num_h.tolist()))
    brute = {
        p for p in itertools.permutations(range(mol.num_atoms))
        if all(label[p[i]] == label[i] for i in range(mol.num_atoms)) and (adj[np.ix_(p, p)] == adj).all()
    }
    assert {tuple(p) for p in cf.automorphisms(mol).tolist()} == brute


def test_symmetric_rmsd_forgives_equivalent_atoms(mols):
    atp = mols["ATP"]
    perms = cf.automorphisms(atp)
    assert len(perms) > 1
    swapped = atp.coords[perms[1]][None]
    assert cf.kabsch_rmsd(swapped, atp.coords[None])[0] > 0.5
    assert cf.symmetric_rmsd(swapped, atp.coords, perms)[0] < 1e-9


# --------------------------------------------------------------------------------------------------
# Geometry, clashes, chirality
# --------------------------------------------------------------------------------------------------


def test_bond_and_angle_errors(mols):
    ala = mols["ALA"]
    assert cf.bond_length_errors(ala.coords, ala).max() < 1e-12
    cb = ala.atom_names.index("CB")
    ca = ala.atom_names.index("CA")
    x = ala.coords.copy()
    u = (x[cb] - x[ca]) / np.linalg.norm(x[cb] - x[ca])
    x[cb] += 0.1 * u  # stretch CA-CB by 0.1 A; no angle at CA changes
    err = cf.bond_length_errors(x, ala)
    which = [tuple(b) for b in ala.bonds.tolist()].index(tuple(sorted((ca, cb))))
    assert err[which] == pytest.approx(0.1, abs=1e-12)
    assert np.delete(err, which).max() < 1e-12
    assert cf.bond_angle_errors(x, ala).max() < 1e-9
    # rotate CB about the CA-N axis by 10 degrees: the N-CA-CB angle is unchanged, C-CA-CB is not
    n = ala.atom_names.index("N")
    rot = rotation_about(x[n] - x[ca], np.radians(10))
    y = ala.coords.copy()
    y[cb] = (y[cb] - y[ca]) @ rot.T + y[ca]
    triplets = cf.bond_angles(ala).tolist()
    errs = cf.bond_angle_errors(y, ala)
    assert errs[triplets.index([min(n, cb), ca, max(n, cb)])] < 1e-9
    assert errs.max() > 1.0


def test_clashes(mols):
    atp = mols["ATP"]
    assert cf.clash_counts(atp.coords, atp) == 0
    i, j = np.argwhere(np.triu(atp.topo >= 3))[0]
    x = atp.coords.copy()
    x[j] = x[i] + np.array([1.5, 0, 0])  # 1.5 A < 0.65 * (sum of radii) for every element pair here
    assert cf.clash_counts(x, atp) >= 1
    # a bonded pair at 1.0 A is never a clash (1-2 excluded)
    a, b = atp.bonds[0]
    y = atp.coords.copy()
    y[b] = y[a] + np.array([1.0, 0, 0])
    near = np.linalg.norm(y[:, None] - y[None], axis=-1) < 1.8
    assert cf.clash_counts(y, atp) == (np.triu(near & (atp.topo >= 3), 1)).sum()


def test_chirality_preserved(mols):
    atp = mols["ATP"]
    total = int((atp.parity != 0).sum())
    assert total >= 4
    assert cf.chirality_matches(atp.coords[None], atp) == (total, total)
    mirror = atp.coords * np.array([-1.0, 1.0, 1.0])
    assert cf.chirality_matches(mirror[None], atp) == (0, total)


def test_metrics_and_report(tmp_path, mols):
    ala = mols["ALA"]
    rec = cf.conformer_metrics(np.stack([ala.coords, ala.coords + 0.05]), ala)
    assert max(rec["rmsd"]) < 1e-9 and rec["chiral_preserved"] == rec["chiral_total"] == 2
    summary = cf.summarize([rec])
    assert summary["median_best_rmsd"] < 1e-9 and summary["clash_fraction"] == 0.0
    result = {"title": "t", "methods": {"ours": summary, "RDKit ETKDGv3": summary}, "notes": ["n1"]}
    cf.write_report(result, tmp_path / "e.json", tmp_path / "e.md")
    assert json.loads((tmp_path / "e.json").read_text())["methods"]["ours"]["molecules"] == 1
    md = (tmp_path / "e.md").read_text()
    assert "| metric | ours | RDKit ETKDGv3 |" in md and "- n1" in md
    with pytest.raises(ValueError, match=r"samples must be \(K, 6, 3\)"):
        cf.conformer_metrics(np.zeros((2, 5, 3)), ala)


# --------------------------------------------------------------------------------------------------
# RDKit baseline
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("comp_id", ["IMD", "BEN", "ALA"])
def test_rdkit_baseline_small_molecules(mols, comp_id):
    pytest.importorskip("rdkit")
    mol = mols[comp_id]
    x = cf.etkdg_conformers(mol, k=5, seed=0)
    assert x.shape == (5, mol.num_atoms, 3)
    assert np.abs(x[1:] - x[0]).max() > 1e-3  # distinct embeddings (seed + i), not k copies
    rec = cf.conformer_metrics(x, mol)
    assert min(rec["rmsd_sym"]) < 1.0
    assert rec["chiral_preserved"] == rec["chiral_total"]
    again = cf.etkdg_conformers(mol, k=5, seed=0)
    np.testing.assert_array_equal(x, again)


def test_rdkit_mol_graph(mols):
    pytest.importorskip("rdkit")
    atp = mols["ATP"]
    m = cf.rdkit_mol(atp)
    assert m.GetNumAtoms() == atp.num_atoms and m.GetNumBonds() == len(atp.bonds)
    assert [a.GetTotalNumHs() for a in m.GetAtoms()] == atp.num_h.tolist()
    assert sum(a.GetIsAromatic() for a in m.GetAtoms()) == 9  # adenine


# --------------------------------------------------------------------------------------------------
# Model, mmCIF, training
# --------------------------------------------------------------------------------------------------


def tiny_config(**kw):
    from adaln.train.conformers import ConformerConfig

    cfg = ConformerConfig(steps=400, batch_size=4, warmup_steps=10, log_every=100, checkpoint_every=200, lr=3e-3,
                          ema_decay=0.9, **kw)
    cfg.model.c_atom, cfg.model.num_blocks, cfg.model.num_heads, cfg.model.c_pair = 32, 2, 2, 8
    cfg.sample.steps = 8
    return cfg


def test_pair_embedding_is_linear_in_pair_features(mols):
    from adaln.train.conformers import ConformerDenoiser

    torch.manual_seed(0)
    model = ConformerDenoiser(c_atom=16, c_pair=8, num_blocks=2, num_heads=2).double()
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
    from adaln.train.conformers import ConformerDenoiser, batch_cond

    torch.manual_seed(0)
    model = ConformerDenoiser(c_atom=16, c_pair=8, num_blocks=2, num_heads=2).double()
    for p in model.parameters():  # re-randomise: zero-initialised output and gates hide errors
        torch.nn.init.normal_(p, std=0.3)
    batch = ccd.collate_molecules([mols["SER"], mols["ALA"]], dtype=torch.float64)
    x = torch.randn(2, 7, 3, dtype=torch.float64) * batch.mask[..., None]
    level = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = model(x, level, **batch_cond(batch))
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
    from adaln.train.conformers import EquivariantHead

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
    from adaln.train.conformers import ChiralityHead

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


def test_distance_loss_against_numpy(mols):
    from adaln.diffusion import loss_weight
    from adaln.train.conformers import distance_loss, local_pairs

    batch_mols = [mols["SER"], mols["BEN"]]
    batch = ccd.collate_molecules(batch_mols, dtype=torch.float64)
    rng = np.random.default_rng(0)
    pred = batch.coords + torch.from_numpy(rng.normal(scale=0.2, size=batch.coords.shape))
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    for distance in (1, 2):
        pairs = local_pairs(batch_mols, distance, torch.device("cpu"))
        got = distance_loss(pred, batch.coords, pairs, sigma, 2.5).item()
        per = []
        for k, m in enumerate(batch_mols):
            ij = [(i, j) for i in range(m.num_atoms) for j in range(i + 1, m.num_atoms) if m.topo[i, j] == distance]
            p, q = pred[k].numpy(), batch.coords[k].numpy()
            err = [(np.linalg.norm(p[i] - p[j]) - np.linalg.norm(q[i] - q[j])) ** 2 for i, j in ij]
            w = (sigma[k].item() ** 2 + 2.5**2) / (sigma[k].item() * 2.5) ** 2
            per.append(w * np.mean(err))
        assert got == pytest.approx(np.mean(per), rel=1e-12)
        assert loss_weight(sigma, 2.5)[0].item() == pytest.approx((0.3**2 + 2.5**2) / (0.3 * 2.5) ** 2)


def test_fix_mirror_images(mols):
    from adaln.train.conformers import fix_mirror_images

    atp = mols["ATP"]
    samples = [np.stack([atp.coords, -atp.coords])]
    fixed, flipped = fix_mirror_images(samples, [atp])
    assert flipped == 1
    ok, total = cf.chirality_matches(fixed[0], atp)
    assert ok == total > 0
    np.testing.assert_array_equal(fixed[0][0], atp.coords)
    np.testing.assert_array_equal(samples[0][1], -atp.coords)  # the input is not modified


def test_mmcif_round_trip(tmp_path, mols):
    import biotite.structure.io.pdbx as pdbx

    from adaln.train.conformers import write_mmcif

    atp = mols["ATP"]
    rng = np.random.default_rng(0)
    confs = atp.coords[None] + rng.normal(scale=0.3, size=(3, atp.num_atoms, 3))
    path = write_mmcif(atp, confs, tmp_path / "atp.cif")
    stack = pdbx.get_structure(pdbx.CIFFile.read(str(path)), model=None, include_bonds=True)
    assert stack.stack_depth() == 3
    np.testing.assert_allclose(stack.coord, confs, atol=1e-4)
    assert stack.atom_name.tolist() == list(atp.atom_names)
    assert stack.element.tolist() == atp.element_symbols
    assert set(stack.res_name.tolist()) == {"ATP"}
    bonds = stack.bonds.as_array()
    assert {tuple(sorted(b)) for b in bonds[:, :2].tolist()} == {tuple(b) for b in atp.bonds.tolist()}
    with pytest.raises(ValueError, match=r"conformers must be \(n, 31, 3\)"):
        write_mmcif(atp, confs[:, :5], tmp_path / "bad.cif")


def test_tiny_training_reduces_loss_then_samples(tmp_path, mols):
    from adaln.diffusion import EDMPrecond, centre_random_augmentation, denoising_loss
    from adaln.train.conformers import (
        batch_cond, build_model, load_conformer_run, sample_component, train_conformers,
    )
    from adaln.train.config import ConfigError

    train = [mols[c] for c in ("ALA", "IMD", "BEN", "SER", "GLY", "THR", "PRO", "ATP")]
    cfg = tiny_config()
    sd = ccd.coordinate_rms(train)

    def fixed_loss(model):
        batch = ccd.collate_molecules(train)
        g = torch.Generator().manual_seed(123)
        x0 = centre_random_augmentation(batch.coords, batch.mask, 1.0, g)
        sigma = sd * torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.1, 0.2, 0.3])  # fixed levels: less noisy
        with torch.no_grad():
            return denoising_loss(EDMPrecond(model, sd, noise_input="af3"), x0, sigma, sigma_data=sd,
                                  mask=batch.mask, generator=g, **batch_cond(batch)).item()

    torch.manual_seed(cfg.seed)
    before = fixed_loss(build_model(cfg))
    result = train_conformers(cfg, tmp_path / "run", molecules=train, progress=False)
    assert result.step == 400 and result.sigma_data == pytest.approx(sd, abs=1e-4)
    after = fixed_loss(load_conformer_run(tmp_path / "run", use_ema=False).denoiser.net)
    assert after < 0.8 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200, 300, 400]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_conformers(cfg, tmp_path / "run", molecules=train, progress=False)
    again = train_conformers(cfg, tmp_path / "run", molecules=train, progress=False, resume=True)
    assert again.step == 400

    out = sample_component(tmp_path / "run", "ala", n=2, seed=0, out=tmp_path / "ala.cif")
    assert len(out["rmsd"]) == 2 and (tmp_path / "ala.png").stat().st_size > 0
    assert sample_component(tmp_path / "run", "ALA", n=2, seed=0, out=tmp_path / "b.cif")["rmsd"] == out["rmsd"]
    with pytest.raises(ValueError, match="unknown CCD component id"):
        sample_component(tmp_path / "run", "NOT_A_COMPONENT", out=tmp_path / "x.cif")


def test_cli_train_sample_eval(tmp_path, mols, capsys):
    """`adaln train --config FILE.yaml` / `sample --component` / `eval` on a small cache the test writes."""
    import yaml

    from adaln import cli

    cache = tmp_path / "cache"
    cache.mkdir()
    train_ids, test_ids = ["ALA", "IMD", "BEN", "SER", "GLY", "THR"], ["PRO", "ATP"]
    ccd.write_molecules(cache / ccd._cache_stem(), [mols[c] for c in train_ids + test_ids],
                        {"splits": ["train"] * len(train_ids) + ["test"] * len(test_ids)})
    cfg = tiny_config(cache_dir=str(cache), eval_limit=2, eval_k=2).to_dict()
    cfg.update(steps=10, checkpoint_every=10, log_every=5)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"

    assert cli.main(["train", "--config", str(path), "--out", str(run), "--steps", "6", "--quiet"]) == 0
    assert "to step 6" in capsys.readouterr().out
    state = json.loads(next((run / "checkpoints").iterdir()).joinpath("state.json").read_text())
    assert state["step"] == 6 and state["config"]["task"] == "conformers"

    out = tmp_path / "pro.cif"
    assert cli.main(["sample", str(run), "--component", "PRO", "--n", "2", "-o", str(out)]) == 0
    assert "2 models" in capsys.readouterr().out and out.with_suffix(".png").stat().st_size > 0
    import biotite.structure.io.pdbx as pdbx

    assert pdbx.get_structure(pdbx.CIFFile.read(str(out))).stack_depth() == 2

    assert cli.main(["eval", str(run), "--step-scale", "2", "--steps", "4"]) == 0
    assert "median best-of-2 RMSD ratio" in capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert result["sampler"]["step_scale"] == 2.0 and result["sampler"]["steps"] == 4
    assert {r["comp_id"] for r in result["records"]["ours"]} == set(test_ids)
    assert (run / "eval.md").read_text().count("RDKit ETKDGv3") >= 1

    assert cli.main(["sample", str(run)]) == 2
    assert "give --component ID" in capsys.readouterr().err
    assert cli.main(["sample", str(run), "--component", "NOT_A_COMPONENT", "-o", str(tmp_path / "x.cif")]) == 2
    assert "unknown CCD component id" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "r2"), "--mixer", "hyena"]) == 2
    assert "--mixer does not apply" in capsys.readouterr().err
