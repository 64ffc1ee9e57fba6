"""Model inputs of a molecule: atom features, pair codes and their one-hot pair features.

Channel layouts in ``ATOM_CHANNELS`` / ``PAIR_CHANNELS``:

- atom: element one-hot; formal charge (<= -2, -1, 0, +1, >= +2); aromatic (has a bond flagged aromatic
  in the CCD); hybridisation from Kekule bond orders (sp: a triple or two double bonds; sp2: a double or
  aromatic bond; sp3: otherwise; a heuristic, e.g. amide N counts as sp3); heavy degree 0..5+; hydrogen
  count 0..3+; in ring; tetrahedral stereocentre flag and its parity (``chirality_parity``).
- pair: bond type (none, single, double, triple, aromatic; aromatic overrides the Kekule order);
  topological distance one-hot 0..``TOPO_CAP`` (the last bin is ">= cap"); same ring (both atoms on a
  smallest cycle through some bond); rank (0, 1, 2) of ``j`` among stereocentre ``i``'s neighbours.

``molecule_features`` computes a molecule's atom features and pair codes once and keeps them (as int8,
exact) while the molecule lives, so a training loop does not recompute them every step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from adaln.data.ccd.molecule import ELEMENTS, Molecule

TOPO_CAP = 8
BOND_NONE, BOND_SINGLE, BOND_DOUBLE, BOND_TRIPLE, BOND_AROMATIC = range(5)

ATOM_CHANNELS = {
    "element": len(ELEMENTS),
    "charge": 5,
    "aromatic": 1,
    "hybridisation": 3,
    "degree": 6,
    "num_h": 4,
    "in_ring": 1,
    "stereocentre": 1,
    "parity": 1,
}
PAIR_CHANNELS = {"bond": 5, "topo_distance": TOPO_CAP + 1, "same_ring": 1, "chiral_rank": 3}
ATOM_FEATURES_DIM = sum(ATOM_CHANNELS.values())
PARITY_CHANNEL = ATOM_FEATURES_DIM - 1  # "parity" is the last atom channel
PAIR_FEATURES_DIM = sum(PAIR_CHANNELS.values())
PAIR_CODE_SIZES = (5, TOPO_CAP + 1, 2, 4)  # categories of each pair_codes channel


def hybridisation(mol: Molecule) -> np.ndarray:
    """(N,) 0 sp, 1 sp2, 2 sp3 from Kekule bond orders (a triple or two doubles: sp; a double or
    aromatic bond: sp2; else sp3)."""
    n = mol.num_atoms
    doubles, triples, arom = np.zeros(n, int), np.zeros(n, int), np.zeros(n, bool)
    for (i, j), order, aromatic in zip(mol.bonds, mol.bond_orders, mol.bond_aromatic):
        for a in (i, j):
            doubles[a] += order == 2
            triples[a] += order == 3
            arom[a] |= aromatic
    sp = (triples > 0) | (doubles > 1)
    sp2 = ~sp & ((doubles > 0) | arom)
    return np.where(sp, 0, np.where(sp2, 1, 2))


def _one_hot(index: np.ndarray, size: int) -> np.ndarray:
    return np.eye(size, dtype=np.float32)[index]


def atom_features(mol: Molecule) -> np.ndarray:
    """(N, ATOM_FEATURES_DIM) float32; channel groups in ``ATOM_CHANNELS`` order."""
    n = mol.num_atoms
    degree = np.bincount(mol.bonds.ravel(), minlength=n)
    aromatic = np.zeros(n, dtype=np.float32)
    aromatic[mol.bonds[mol.bond_aromatic].ravel()] = 1.0
    in_ring = mol.same_ring.any(1).astype(np.float32)
    parts = [
        _one_hot(mol.elements, len(ELEMENTS)),
        _one_hot(np.clip(mol.charges, -2, 2) + 2, 5),
        aromatic[:, None],
        _one_hot(hybridisation(mol), 3),
        _one_hot(np.minimum(degree, 5), 6),
        _one_hot(np.minimum(mol.num_h, 3), 4),
        in_ring[:, None],
        (mol.parity != 0).astype(np.float32)[:, None],
        mol.parity.astype(np.float32)[:, None],
    ]
    return np.concatenate(parts, axis=1)


def pair_codes(mol: Molecule) -> np.ndarray:
    """(N, N, 4) int64 categories: bond type (``BOND_*``), topological distance capped at ``TOPO_CAP``,
    same ring (0/1), chiral rank + 1 of ``j`` around stereocentre ``i`` (0: none)."""
    n = mol.num_atoms
    bond = np.zeros((n, n), dtype=np.int64)
    kind = np.where(mol.bond_aromatic, BOND_AROMATIC, mol.bond_orders)
    bond[mol.bonds[:, 0], mol.bonds[:, 1]] = kind
    bond[mol.bonds[:, 1], mol.bonds[:, 0]] = kind
    rank = np.zeros((n, n), dtype=np.int64)
    for centre, nbrs in mol.chiral_neighbours().items():
        rank[centre, list(nbrs)] = (1, 2, 3)
    topo = np.where(mol.topo < 0, TOPO_CAP, np.minimum(mol.topo, TOPO_CAP))
    return np.stack([bond, topo, mol.same_ring.astype(np.int64), rank], axis=-1)


def pair_features(mol: Molecule) -> np.ndarray:
    """(N, N, PAIR_FEATURES_DIM) float32 one-hots of ``pair_codes`` in ``PAIR_CHANNELS`` order (same ring
    as one 0/1 channel, chiral rank without its "none" category)."""
    codes = pair_codes(mol)
    bond, topo, ring, rank = (codes[..., g] for g in range(4))
    eye = np.eye(max(PAIR_CODE_SIZES), dtype=np.float32)
    return np.concatenate(
        [eye[bond, :5], eye[topo, : TOPO_CAP + 1], ring[..., None].astype(np.float32), eye[rank, 1:4]], axis=-1
    )


@dataclass(frozen=True)
class MoleculeFeatures:
    """``atom_features`` and ``pair_codes`` of one molecule as read-only int8 arrays (every value is a
    small integer, so the conversion back is exact): ``atom`` (N, ATOM_FEATURES_DIM), ``pair`` (N, N, 4)."""

    atom: np.ndarray
    pair: np.ndarray


_FEATURES: weakref.WeakKeyDictionary[Molecule, MoleculeFeatures] = weakref.WeakKeyDictionary()


def molecule_features(mol: Molecule) -> MoleculeFeatures:
    """The features of ``mol``, computed on first use and kept while ``mol`` lives.

    As int8 the full train split's features take about 140 MB (as float32 and int64: about 930 MB).
    """
    feats = _FEATURES.get(mol)
    if feats is None:
        feats = MoleculeFeatures(
            _read_only(atom_features(mol).astype(np.int8)), _read_only(pair_codes(mol).astype(np.int8))
        )
        _FEATURES[mol] = feats
    return feats


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
