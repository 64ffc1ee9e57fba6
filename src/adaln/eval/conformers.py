"""Conformer quality against the CCD ideal coordinates, and the RDKit ETKDG (v3) baseline.

All geometry runs in float64 numpy on heavy atoms.

- RMSD: after Kabsch superposition with a proper rotation (det +1, no reflection). ``rmsd_sym`` takes the
  minimum over graph automorphisms (atoms labelled by element and hydrogen count, bond orders ignored so
  that resonance-equivalent atoms such as carboxylate oxygens may swap), at most ``MAX_AUTOMORPHISMS`` of
  them (with the cap it is an upper bound of the exact symmetric RMSD).
- Bond-length error: mean |d_ij - d_ij^ref| over bonds (A). Bond-angle error: mean |angle - angle^ref|
  over every i-j-k with j bonded to both (degrees).
- Steric clash: a pair at least 3 bonds apart (1-2 and 1-3 pairs excluded) closer than
  ``CLASH_SCALE`` x the sum of the van der Waals radii (``VDW_RADII``); e.g. 2.21 A for C...C.
- Chirality preserved: at every stereocentre of the molecule (``Molecule.parity``, CCD R/S centres), the
  sign of the signed volume of the three lowest-index heavy neighbours equals the reference's; a local,
  label-free test, so no CIP ranking is needed.

The baseline builds an RDKit molecule from the same graph (elements, Kekule bond orders, formal charges,
each heavy atom's CCD hydrogen count), takes the stereo tags from the reference coordinates
(``AssignStereochemistryFrom3D``, i.e. what an isomeric SMILES would give), adds hydrogens and runs
``EmbedMultipleConfs`` with ETKDGv3 and fixed seeds (conformer i from ``seed + i``; retried with random initial coordinates if fewer
than ``k`` embed). rdkit is imported lazily: ``pip install 'adaln[ccd]'``.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np

from adaln.data.ccd import ELEMENTS, Molecule, neighbour_lists, signed_volume
from adaln.outputs import write_json, write_text

CLASH_SCALE = 0.65  # 0.4% of CCD reference conformers (3,000 train) have a pair below it; 1.6% at 0.7
MAX_AUTOMORPHISMS = 1000
# van der Waals radii (A): Bondi 1964, B/Si/Se/Fe as in biotite.structure.info.vdw_radius_single.
VDW_RADII = {
    "C": 1.70, "N": 1.55, "O": 1.52, "S": 1.80, "P": 1.80, "F": 1.47, "CL": 1.75, "BR": 1.83,
    "I": 1.98, "B": 1.92, "SE": 1.90, "SI": 2.10, "FE": 2.05,
}


# --------------------------------------------------------------------------------------------------
# Superposition and RMSD
# --------------------------------------------------------------------------------------------------


def _coords(x: object, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2 or a.shape[-1] != 3:
        raise ValueError(f"{name} must be (..., N, 3) coordinates, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return a


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Proper rotation ``R`` (..., 3, 3) and translation ``t`` (..., 3) minimising
    ``|mobile @ R + t - target|``; mobile, target (..., N, 3) broadcastable, float64.

    ``H = P^T Q = U S V^T`` for centred P, Q; ``R = U diag(1, 1, d) V^T`` with ``d = sign(det(U V^T))``
    so that ``det R = +1`` (Kabsch 1976; row-vector convention).
    """
    p, q = _coords(mobile, "mobile"), _coords(target, "target")
    if p.shape[-2] != q.shape[-2]:
        raise ValueError(f"mobile and target must have the same atoms, got {p.shape} and {q.shape}")
    mp, mq = p.mean(-2, keepdims=True), q.mean(-2, keepdims=True)
    h = np.swapaxes(p - mp, -1, -2) @ (q - mq)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(u @ vt))
    d = np.where(d == 0, 1.0, d)
    u = u.copy()
    u[..., :, 2] *= d[..., None]
    r = u @ vt
    return r, (mq - mp @ r)[..., 0, :]


def superpose(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``mobile`` (..., N, 3) moved onto ``target`` by ``kabsch``."""
    r, t = kabsch(mobile, target)
    return np.asarray(mobile, dtype=np.float64) @ r + t[..., None, :]


def kabsch_rmsd(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RMSD (...) after optimal proper superposition; shapes as in ``kabsch``."""
    diff = superpose(mobile, target) - np.asarray(target, dtype=np.float64)
    return np.sqrt((diff**2).sum(-1).mean(-1))


def automorphisms(mol: Molecule, max_count: int = MAX_AUTOMORPHISMS) -> np.ndarray:
    """(P, N) atom permutations ``perm`` with ``x[perm]`` an equivalent labelling; row 0 is the identity.

    Graph automorphisms with atoms labelled by (element, hydrogen count), bond orders ignored; VF2 from
    networkx, stopping after ``max_count``.
    """
    import networkx as nx
    from networkx.algorithms.isomorphism import GraphMatcher

    g = nx.Graph()
    for i, (e, h) in enumerate(zip(mol.elements.tolist(), mol.num_h.tolist())):
        g.add_node(i, label=(e, h))
    g.add_edges_from(mol.bonds.tolist())
    matcher = GraphMatcher(g, g, node_match=lambda a, b: a["label"] == b["label"])
    n = mol.num_atoms
    perms = {tuple(range(n))}
    for mapping in itertools.islice(matcher.isomorphisms_iter(), max_count):
        perms.add(tuple(mapping[i] for i in range(n)))
    identity = tuple(range(n))
    return np.array([identity] + sorted(p for p in perms if p != identity), dtype=np.int64)


def symmetric_rmsd(samples: np.ndarray, ref: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """(K,) minimum over ``perms`` (P, N) of the Kabsch RMSD of ``samples[:, perm]`` (K, N, 3) to ``ref``."""
    x = _coords(samples, "samples")[:, perms]  # (K, P, N, 3)
    return kabsch_rmsd(x, ref[None, None]).min(-1)


# --------------------------------------------------------------------------------------------------
# Local geometry, clashes, chirality
# --------------------------------------------------------------------------------------------------


def bond_angles(mol: Molecule) -> np.ndarray:
    """(T, 3) triplets (i, j, k), i < k, with j bonded to both."""
    nbrs = neighbour_lists(mol.bonds, mol.num_atoms)
    out = [(i, j, k) for j in range(mol.num_atoms) for i, k in itertools.combinations(nbrs[j], 2)]
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def _angles(x: np.ndarray, triplets: np.ndarray) -> np.ndarray:
    a = x[..., triplets[:, 0], :] - x[..., triplets[:, 1], :]
    b = x[..., triplets[:, 2], :] - x[..., triplets[:, 1], :]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def bond_length_errors(x: np.ndarray, mol: Molecule) -> np.ndarray:
    """(..., E) |d_ij - d_ij^ref| in A for conformers x (..., N, 3)."""
    x = _coords(x, "x")
    i, j = mol.bonds[:, 0], mol.bonds[:, 1]
    d = np.linalg.norm(x[..., i, :] - x[..., j, :], axis=-1)
    return np.abs(d - np.linalg.norm(mol.coords[i] - mol.coords[j], axis=-1))


def bond_angle_errors(x: np.ndarray, mol: Molecule) -> np.ndarray:
    """(..., T) |angle - angle^ref| in degrees over ``bond_angles(mol)``."""
    t = bond_angles(mol)
    return np.abs(_angles(_coords(x, "x"), t) - _angles(mol.coords, t))


def clash_counts(x: np.ndarray, mol: Molecule, scale: float = CLASH_SCALE) -> np.ndarray:
    """(...) number of atom pairs >= 3 bonds apart closer than ``scale`` x the sum of vdW radii."""
    x = _coords(x, "x")
    radii = np.array([VDW_RADII[ELEMENTS[e]] for e in mol.elements])
    limit = scale * (radii[:, None] + radii[None, :])
    far = np.triu(mol.topo >= 3, 1)
    d = np.linalg.norm(x[..., :, None, :] - x[..., None, :, :], axis=-1)
    return ((d < limit) & far).sum((-1, -2))


def chirality_matches(x: np.ndarray, mol: Molecule) -> tuple[int, int]:
    """(preserved, total) stereocentres over conformers x (K, N, 3) (module docstring)."""
    x = _coords(x, "x").reshape(-1, mol.num_atoms, 3)
    centres = mol.chiral_neighbours()
    ok = sum(
        int(np.sign(signed_volume(conf, c, nb)) == mol.parity[c]) for conf in x for c, nb in centres.items()
    )
    return ok, len(centres) * len(x)


def conformer_metrics(samples: np.ndarray, mol: Molecule, perms: np.ndarray | None = None) -> dict:
    """Metrics of K conformers ``samples`` (K, N, 3) of ``mol`` against its reference (per molecule)."""
    x = _coords(samples, "samples")
    if x.ndim != 3 or x.shape[1] != mol.num_atoms:
        raise ValueError(f"samples must be (K, {mol.num_atoms}, 3) for {mol.comp_id}, got {x.shape}")
    perms = automorphisms(mol) if perms is None else perms
    rmsd = kabsch_rmsd(x, mol.coords[None])
    rmsd_sym = symmetric_rmsd(x, mol.coords, perms)
    ok, total = chirality_matches(x, mol)
    angles = bond_angle_errors(x, mol)
    return {
        "comp_id": mol.comp_id,
        "atoms": mol.num_atoms,
        "k": len(x),
        "rmsd": rmsd.tolist(),
        "rmsd_sym": rmsd_sym.tolist(),
        "bond_length_mae": float(bond_length_errors(x, mol).mean()) if len(mol.bonds) else 0.0,
        "bond_angle_mae": float(angles.mean()) if angles.size else 0.0,
        "clash_fraction": float((clash_counts(x, mol) > 0).mean()),
        "chiral_preserved": ok,
        "chiral_total": total,
    }


def summarize(records: list[dict]) -> dict:
    """Medians / means over molecules of per-molecule ``conformer_metrics`` records."""
    if not records:
        return {"molecules": 0}
    best = np.array([min(r["rmsd_sym"]) for r in records])
    mean = np.array([float(np.mean(r["rmsd_sym"])) for r in records])
    best_plain = np.array([min(r["rmsd"]) for r in records])
    ok, total = sum(r["chiral_preserved"] for r in records), sum(r["chiral_total"] for r in records)
    return {
        "molecules": len(records),
        "median_best_rmsd": float(np.median(best)),
        "mean_best_rmsd": float(best.mean()),
        "median_mean_rmsd": float(np.median(mean)),
        "mean_mean_rmsd": float(mean.mean()),
        "median_best_rmsd_plain": float(np.median(best_plain)),
        "best_rmsd_below_1A": float((best < 1.0).mean()),
        "best_rmsd_below_2A": float((best < 2.0).mean()),
        "bond_length_mae": float(np.mean([r["bond_length_mae"] for r in records])),
        "bond_angle_mae": float(np.mean([r["bond_angle_mae"] for r in records])),
        "clash_fraction": float(np.mean([r["clash_fraction"] for r in records])),
        "chirality_preserved": ok / total if total else float("nan"),
        "stereocentres": total,
    }


# --------------------------------------------------------------------------------------------------
# RDKit ETKDG baseline
# --------------------------------------------------------------------------------------------------


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import AllChem
    except ImportError as err:
        raise ImportError("the RDKit baseline needs rdkit: pip install 'adaln[ccd]' (biotite and rdkit)") from err
    RDLogger.DisableLog("rdApp.*")
    return Chem, AllChem


def rdkit_mol(mol: Molecule, stereo_from_reference: bool = True):
    """An RDKit molecule (heavy atoms in ``mol``'s order, hydrogens implicit) from the CCD graph.

    Raises ``ValueError`` when RDKit cannot sanitise it (e.g. a valence it does not accept).
    """
    Chem, _ = _rdkit()
    orders = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    rw = Chem.RWMol()
    for e, q, h in zip(mol.element_symbols, mol.charges.tolist(), mol.num_h.tolist()):
        atom = Chem.Atom(e.capitalize())
        atom.SetFormalCharge(q)
        atom.SetNumExplicitHs(h)
        atom.SetNoImplicit(True)  # the CCD's hydrogen count, not RDKit's valence model
        rw.AddAtom(atom)
    for (i, j), order in zip(mol.bonds.tolist(), mol.bond_orders.tolist()):
        rw.AddBond(i, j, orders[order])
    m = rw.GetMol()
    try:
        Chem.SanitizeMol(m)
    except Exception as err:  # RDKit raises several exception types for chemistry errors
        raise ValueError(f"RDKit cannot sanitise {mol.comp_id}: {err}") from err
    if stereo_from_reference:
        conf = Chem.Conformer(mol.num_atoms)
        for i, p in enumerate(mol.coords.tolist()):
            conf.SetAtomPosition(i, p)
        m.AddConformer(conf, assignId=True)
        Chem.AssignStereochemistryFrom3D(m)
        m.RemoveAllConformers()
    return m


def etkdg_conformers(mol: Molecule, k: int = 5, seed: int = 0, timeout: int = 30) -> np.ndarray:
    """(k', N, 3) float64 ETKDGv3 conformers (k' <= k, heavy atoms); ``ValueError`` when none embeds."""
    Chem, AllChem = _rdkit()
    mh = Chem.AddHs(rdkit_mol(mol))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    # Conformer i from seed + i: with one shared seed 0, RDKit 2026.09 returns k identical conformers.
    params.enableSequentialRandomSeeds = True
    params.numThreads = 1
    params.timeout = timeout
    ids = list(AllChem.EmbedMultipleConfs(mh, numConfs=k, params=params))
    if len(ids) < k:
        params.useRandomCoords = True
        ids = list(AllChem.EmbedMultipleConfs(mh, numConfs=k, params=params))
    if not ids:
        raise ValueError(f"ETKDG embedded no conformer of {mol.comp_id}")
    n = mol.num_atoms
    return np.stack([mh.GetConformer(c).GetPositions()[:n] for c in ids]).astype(np.float64)


def evaluate_rdkit(mols: list[Molecule], k: int = 5, seed: int = 0, progress: bool = True) -> dict:
    """ETKDG on every molecule: ``{"records": [...], "failures": {comp_id: reason}, "seconds": s}``."""
    from tqdm.auto import tqdm

    records, failures = [], {}
    t0 = time.perf_counter()
    for mol in tqdm(mols, desc="RDKit ETKDG", disable=not progress):
        try:
            records.append(conformer_metrics(etkdg_conformers(mol, k, seed), mol))
        except ValueError as err:
            failures[mol.comp_id] = str(err)
    return {"records": records, "failures": failures, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

REPORT_ROWS = (
    ("molecules", "molecules", "{:d}"),
    ("median_best_rmsd", "median best-of-k RMSD (A, symmetry-corrected)", "{:.3f}"),
    ("mean_best_rmsd", "mean best-of-k RMSD (A)", "{:.3f}"),
    ("median_mean_rmsd", "median mean-over-k RMSD (A)", "{:.3f}"),
    ("median_best_rmsd_plain", "median best-of-k RMSD (A, no symmetry)", "{:.3f}"),
    ("best_rmsd_below_1A", "best-of-k RMSD < 1 A (fraction)", "{:.3f}"),
    ("best_rmsd_below_2A", "best-of-k RMSD < 2 A (fraction)", "{:.3f}"),
    ("bond_length_mae", "bond-length error (A)", "{:.4f}"),
    ("bond_angle_mae", "bond-angle error (deg)", "{:.2f}"),
    ("clash_fraction", f"conformers with a clash (< {CLASH_SCALE} x vdW sum)", "{:.3f}"),
    ("chirality_preserved", "stereocentres preserved", "{:.3f}"),
)


def write_report(result: dict, json_path: str | Path, md_path: str | Path) -> None:
    """Write ``result`` (with ``result["methods"]``: name -> ``summarize`` dict) as JSON and a Markdown
    table, each atomically."""
    write_json(json_path, result)
    write_text(md_path, report_markdown(result))


def report_markdown(result: dict) -> str:
    """The Markdown report: one row per metric, one column per method, then the notes."""
    methods = result["methods"]
    names = list(methods)
    lines = [
        f"# Conformers: {result.get('title', 'CCD test split')}",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label, fmt in REPORT_ROWS:
        cells = []
        for name in names:
            v = methods[name].get(key)
            ok = v is not None and not (isinstance(v, float) and math.isnan(v))
            cells.append(fmt.format(v) if ok else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = result.get("notes", [])
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
