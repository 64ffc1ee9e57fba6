"""adaln.data.ccd: CCD molecules, features, split, cache files and errors."""

import gc
import hashlib
import itertools
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("biotite")

from adaln.data import ccd  # noqa: E402


@pytest.fixture(scope="module")
def mols():
    return {c: ccd.load_component(c) for c in ("ALA", "ATP", "HEM", "BEN", "NPH")}


def biotite_heavy(comp_id):
    import biotite.structure.info as info

    res = info.residue(comp_id)
    heavy = ~np.isin(res.element, ["H", "D"])
    bonds = res.bonds.as_array()
    keep = heavy[bonds[:, 0]] & heavy[bonds[:, 1]]
    return res[heavy], bonds[keep], heavy


@pytest.mark.parametrize("comp_id", ["ALA", "ATP", "HEM"])
def test_graph_matches_biotite(mols, comp_id):
    mol = mols[comp_id]
    atoms, bonds, heavy = biotite_heavy(comp_id)
    assert mol.num_atoms == len(atoms)
    assert len(mol.bonds) == len(bonds)
    assert list(mol.atom_names) == atoms.atom_name.tolist()
    assert mol.element_symbols == atoms.element.tolist()
    np.testing.assert_allclose(mol.coords, atoms.coord, atol=1e-5)
    # biotite's BondList indexes all atoms; map its heavy-heavy bonds to heavy-atom indices
    index = np.cumsum(heavy) - 1
    theirs = {tuple(sorted((index[i], index[j]))) for i, j in bonds[:, :2]}
    assert {tuple(b) for b in mol.bonds.tolist()} == theirs
    # aromatic flags: biotite's AROMATIC_* bond types (5, 6, 7)
    arom = {tuple(sorted((index[i], index[j]))) for i, j, t in bonds if t in (5, 6, 7)}
    assert {tuple(b) for b, a in zip(mol.bonds.tolist(), mol.bond_aromatic) if a} == arom
    # every hydrogen is counted on its heavy atom
    import biotite.structure.info as info

    assert int(mol.num_h.sum()) == int((~heavy).sum())
    assert mol.charges.tolist() == info.residue(comp_id).charge[heavy].tolist()


def test_expected_counts(mols):
    # ALA: N CA C O CB OXT; ATP: 31 heavy atoms; HEM: 43 heavy atoms with Fe
    assert (mols["ALA"].num_atoms, len(mols["ALA"].bonds)) == (6, 5)
    assert mols["ATP"].num_atoms == 31
    assert mols["HEM"].num_atoms == 43 and "FE" in mols["HEM"].element_symbols
    assert mols["ALA"].num_h.tolist() == [2, 1, 0, 0, 3, 1]


def test_topological_distance_matches_scipy(mols):
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import shortest_path

    for mol in mols.values():
        n = mol.num_atoms
        adj = csr_matrix((np.ones(len(mol.bonds)), (mol.bonds[:, 0], mol.bonds[:, 1])), shape=(n, n))
        ref = shortest_path(adj, directed=False, unweighted=True)
        np.testing.assert_array_equal(mol.topo, ref.astype(np.int64))


def test_rings_on_fused_graph():
    # Two fused 6-rings (naphthalene skeleton) plus a methyl: atoms 0-5 ring A, 4,5,6-9 ring B, 10 methyl.
    bonds = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0], [4, 6], [6, 7], [7, 8], [8, 9], [9, 5], [0, 10]])
    rings = ccd.smallest_rings(bonds, 11)
    assert sorted(rings) == [(0, 1, 2, 3, 4, 5), (4, 5, 6, 7, 8, 9)]


def test_same_ring_and_ring_flags(mols):
    ben = mols["BEN"]  # benzamidine: a benzene ring and an amidine outside it
    feats = ccd.atom_features(ben)
    start = sum(v for k, v in ccd.ATOM_CHANNELS.items() if k in ("element", "charge", "aromatic", "hybridisation", "degree", "num_h"))
    in_ring = feats[:, start]
    assert in_ring.sum() == 6
    ring = np.flatnonzero(in_ring)
    assert ben.same_ring[np.ix_(ring, ring)].sum() == 30  # all ordered pairs of 6, diagonal excluded
    assert not ben.same_ring[np.flatnonzero(in_ring == 0)].any()


def test_atom_features_are_one_hot_groups(mols):
    for mol in mols.values():
        feats = ccd.atom_features(mol)
        assert feats.shape == (mol.num_atoms, ccd.ATOM_FEATURES_DIM)
        col = 0
        for name, size in ccd.ATOM_CHANNELS.items():
            group = feats[:, col : col + size]
            if name in ("element", "charge", "hybridisation", "degree", "num_h"):
                np.testing.assert_array_equal(group.sum(1), 1.0)
            col += size
        np.testing.assert_array_equal(feats[:, : len(ccd.ELEMENTS)].argmax(1), mol.elements)
    hem = ccd.atom_features(mols["HEM"])
    assert hem[:, ccd.ELEMENTS.index("FE")].sum() == 1


def test_pair_features(mols):
    mol = mols["ATP"]
    feats = ccd.pair_features(mol)
    assert feats.shape == (mol.num_atoms, mol.num_atoms, ccd.PAIR_FEATURES_DIM)
    np.testing.assert_array_equal(feats[..., :5], feats[..., :5].transpose(1, 0, 2))
    np.testing.assert_array_equal(feats[..., :5].sum(-1), 1.0)
    bonded = feats[..., 1:5].sum(-1)
    assert bonded.sum() == 2 * len(mol.bonds)
    topo = feats[..., 5 : 5 + ccd.TOPO_CAP + 1].argmax(-1)
    np.testing.assert_array_equal(topo, np.minimum(mol.topo, ccd.TOPO_CAP))
    # aromatic bonds of the adenine are coded aromatic whatever their Kekule order
    i, j = mol.bonds[mol.bond_aromatic][0]
    assert feats[i, j, ccd.BOND_AROMATIC] == 1


def test_chirality_parity_matches_signed_volume(mols):
    ala = mols["ALA"]
    ca = ala.atom_names.index("CA")
    nbrs = sorted(j for b in ala.bonds.tolist() for j in b if ca in b and j != ca)
    v = ala.coords[nbrs] - ala.coords[ca]
    expected = np.sign(v[0] @ np.cross(v[1], v[2]))  # triple product, independent of np.linalg.det
    assert ala.parity[ca] == expected != 0
    assert (ala.parity != 0).sum() == 1
    mirrored = ccd.chirality_parity(ala.coords * np.array([1, 1, -1]), ala.bonds, ala.stereo)
    np.testing.assert_array_equal(mirrored, -ala.parity)


def test_chiral_rank_codes(mols):
    mol = mols["ATP"]
    codes = ccd.pair_codes(mol)
    for centre, nbrs in mol.chiral_neighbours().items():
        assert codes[centre, list(nbrs), 3].tolist() == [1, 2, 3]
    assert (codes[..., 3] > 0).sum() == 3 * (mol.parity != 0).sum()


def test_split_is_hash_of_id():
    for cid in ("ATP", "HEM", "ALA", "A1BJA", "73N"):
        bucket = int.from_bytes(hashlib.sha256(cid.encode()).digest()[:8], "big") % 100
        expected = "train" if bucket < 80 else "validation" if bucket < 90 else "test"
        assert ccd.split_of(cid) == expected
    ids = [f"{a}{b}{c}" for a, b, c in itertools.product("ABCDEFGHIJ", repeat=3)]
    counts = {s: 0 for s in ccd.SPLITS}
    for cid in ids:
        counts[ccd.split_of(cid)] += 1
    assert 0.75 < counts["train"] / len(ids) < 0.85
    assert 0.07 < counts["test"] / len(ids) < 0.13


def test_errors():
    with pytest.raises(ValueError, match="unknown CCD component id 'NOT_A_COMPONENT'"):
        ccd.load_component("NOT_A_COMPONENT")
    with pytest.raises(ValueError, match="component 'CLA' contains unsupported element 'MG'"):
        ccd.load_component("CLA")
    with pytest.raises(TypeError, match="comp_id must be a string"):
        ccd.load_component(42)
    with pytest.raises(ValueError, match="split must be one of"):
        ccd.load_ccd("training")
    with pytest.raises(ValueError, match="limit must be a positive int"):
        ccd.load_ccd("train", limit=0)
    with pytest.raises(TypeError, match="non-empty list"):
        ccd.collate_molecules([])


def test_molecule_file_round_trip(tmp_path, mols):
    originals = [mols["ALA"], mols["HEM"], mols["ATP"]]
    ccd.write_molecules(tmp_path / "m", originals, {"note": "test"})
    back = ccd.read_molecules(tmp_path / "m")
    assert [m.comp_id for m in back] == ["ALA", "HEM", "ATP"]
    for a, b in zip(originals, back):
        assert a.atom_names == b.atom_names
        for name in ("elements", "charges", "num_h", "coords", "bonds", "bond_orders", "bond_aromatic",
                     "stereo", "topo", "same_ring", "parity"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert [m.comp_id for m in ccd.read_molecules(tmp_path / "m", keep=[2])] == ["ATP"]


def test_collate_pads_and_centres(mols):
    batch = ccd.collate_molecules([mols["ALA"], mols["ATP"]])
    assert batch.coords.shape == (2, 31, 3) and batch.pair_codes.shape == (2, 31, 31, 4)
    assert batch.mask.sum(1).tolist() == [6, 31]
    assert batch.pair_codes.dtype == torch.int64
    torch.testing.assert_close(batch.coords[0, :6].double().mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert batch.coords[0, 6:].abs().sum() == 0 and batch.atom_feats[0, 6:].abs().sum() == 0
    assert batch.pair_codes[0, 6:].abs().sum() == 0 and batch.pair_codes[0, :, 6:].abs().sum() == 0
    np.testing.assert_array_equal(batch.pair_codes[1].numpy(), ccd.pair_codes(mols["ATP"]))


def uncached_collate(mols, dtype):
    """``collate_molecules`` as it was before the per-molecule feature cache."""
    b, n = len(mols), max(m.num_atoms for m in mols)
    coords = np.zeros((b, n, 3))
    atom = np.zeros((b, n, ccd.ATOM_FEATURES_DIM), dtype=np.float32)
    codes = np.zeros((b, n, n, 4), dtype=np.int64)
    mask = np.zeros((b, n), dtype=bool)
    for k, m in enumerate(mols):
        a = m.num_atoms
        coords[k, :a] = m.coords - m.coords.mean(0)
        atom[k, :a] = ccd.atom_features(m)
        codes[k, :a, :a] = ccd.pair_codes(m)
        mask[k, :a] = True
    return [torch.from_numpy(coords).to(dtype), torch.from_numpy(atom).to(dtype), torch.from_numpy(codes),
            torch.from_numpy(mask)]


def test_collate_with_cached_features_is_bitwise_uncached(tmp_path, mols):
    ccd.write_molecules(tmp_path / "m", [mols["HEM"], mols["NPH"]])
    batch_mols = [mols["ATP"], mols["ALA"], *ccd.read_molecules(tmp_path / "m"), mols["BEN"], mols["ALA"]]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        ref = uncached_collate(batch_mols, dtype)
        for _ in range(2):  # computes the features, then reads them back
            batch = ccd.collate_molecules(batch_mols, dtype)
            got = [batch.coords, batch.atom_feats, batch.pair_codes, batch.mask]
            for g, r in zip(got, ref):
                assert g.dtype == r.dtype and g.shape == r.shape
                assert g.view(torch.uint8).numpy().tobytes() == r.view(torch.uint8).numpy().tobytes()
    feats = ccd.molecule_features(mols["ATP"])
    assert feats is ccd.molecule_features(mols["ATP"])
    assert feats.atom.dtype == feats.pair.dtype == np.int8 and not feats.pair.flags.writeable


def test_feature_cache_does_not_keep_molecules_alive():
    mol = ccd.load_component("SER")
    ccd.molecule_features(mol)
    ref = weakref.ref(mol)
    del mol
    gc.collect()
    assert ref() is None

def test_coordinate_rms_by_hand(mols):
    ala = mols["ALA"]
    c = ala.coords - ala.coords.mean(0)
    assert ccd.coordinate_rms([ala]) == pytest.approx(np.sqrt((c**2).sum() / (3 * ala.num_atoms)), rel=1e-12)


@pytest.mark.slow
def test_full_cache_build(tmp_path):
    meta = ccd.ccd_metadata(tmp_path, progress=False)
    assert sum(meta["counts"].values()) == len(meta["ids"]) > 40000
    assert 2.0 < meta["coordinate_rms"]["train"] < 3.5
    test = ccd.load_ccd("test", limit=5, cache=tmp_path, progress=False)
    assert [ccd.split_of(m.comp_id) for m in test] == ["test"] * 5
    assert all(ccd.MIN_ATOMS <= m.num_atoms <= ccd.MAX_ATOMS for m in test)
