"""Conformer metrics, the RDKit baseline, the conformers task's losses, mmCIF output and a tiny training run
(the denoiser itself: test_conformer_model.py)."""

import itertools
import json
from dataclasses import asdict

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
# Losses, mmCIF, training
# --------------------------------------------------------------------------------------------------


def tiny_config(**kw):
    from adaln.tasks.conformers import ConformerConfig

    cfg = ConformerConfig(steps=400, batch_size=4, warmup_steps=10, log_every=100, checkpoint_every=200, lr=3e-3,
                          ema_decay=0.9, **kw)
    cfg.model.c_atom, cfg.model.num_blocks, cfg.model.num_heads, cfg.model.c_pair = 32, 2, 2, 8
    cfg.sample.steps = 8
    return cfg


def test_distance_loss_against_numpy(mols):
    from adaln.diffusion import loss_weight
    from adaln.tasks.conformers import distance_loss, local_pairs

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
    from adaln.tasks.conformers import fix_mirror_images

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

    from adaln.outputs import write_mmcif

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
    from functools import partial

    from adaln.diffusion import EDMPrecond, centre_random_augmentation, denoising_loss
    from adaln.engine import fit
    from adaln.engine.seeding import Stream, stream_seed
    from adaln.errors import ConfigError, RunError
    from adaln.tasks import load_run
    from adaln.tasks.conformers import ConformerTask, batch_cond, sample_component

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

    torch.manual_seed(stream_seed(cfg.seed, Stream.INIT))  # the engine's initial weights
    before = fixed_loss(ConformerTask.model_from(cfg, {"sigma_data": sd}))
    task = partial(ConformerTask, molecules=train)
    result = fit(task, cfg, tmp_path / "run", resume=False, progress=False)
    assert result.step == 400 and result.info["sigma_data"] == pytest.approx(sd, abs=1e-4)
    after = fixed_loss(load_run(tmp_path / "run", device="cpu", use_ema=False).model)
    assert after < 0.8 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200, 300, 400]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    with pytest.raises(RunError, match="already holds checkpoints"):
        fit(task, cfg, tmp_path / "run", resume=False, progress=False)
    again = fit(task, cfg, tmp_path / "run", resume=True, progress=False)
    assert again.step == 400

    run = load_run(tmp_path / "run", device="cpu")
    assert run.task is ConformerTask and run.step == 400
    out = sample_component(run, "ala", n=2, seed=0, out=tmp_path / "ala.cif")
    assert len(out["rmsd"]) == 2 and (tmp_path / "ala.png").stat().st_size > 0
    assert sample_component(run, "ALA", n=2, seed=0, out=tmp_path / "b.cif")["rmsd"] == out["rmsd"]
    with pytest.raises(ConfigError, match="unknown CCD component id"):
        sample_component(run, "NOT_A_COMPONENT", out=tmp_path / "x.cif")


def test_cli_train_sample_eval(tmp_path, mols, capsys):
    """`adaln train --config FILE.yaml` / `sample --component` / `eval` on a small cache the test writes."""
    import yaml

    from adaln import cli

    cache = tmp_path / "cache"
    cache.mkdir()
    train_ids, test_ids = ["ALA", "IMD", "BEN", "SER", "GLY", "THR"], ["PRO", "ATP"]
    ccd.write_molecules(cache / ccd._cache_stem(), [mols[c] for c in train_ids + test_ids],
                        {"splits": ["train"] * len(train_ids) + ["test"] * len(test_ids)})
    cfg = asdict(tiny_config(cache_dir=str(cache), eval_limit=2, eval_k=2))
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
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "r2"), "--set", "model.mixer=hyena"]) == 2
    assert "unknown key 'model.mixer'" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    assert cli.main(["sample", str(run), "--component", "PRO", "--prompt", "a seven"]) == 2
    assert "--prompt does not apply to a conformers run" in capsys.readouterr().err
