"""One molecule: the heavy-atom graph and ideal conformer of a CCD component, with derived topology."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaln.data.ccd.chirality import chirality_parity
from adaln.data.ccd.graph import neighbour_lists, smallest_rings, topological_distances

ELEMENTS = ("C", "N", "O", "S", "P", "F", "CL", "BR", "I", "B", "SE", "SI", "FE")


@dataclass(frozen=True, eq=False)
class Molecule:
    """Heavy-atom graph and ideal conformer of one CCD component (N atoms, E bonds, indices local).

    Compared and hashed by identity (array fields have no single truth value), which lets derived
    features be cached per molecule (``molecule_features``).
    """

    comp_id: str
    atom_names: tuple[str, ...]  # (N,)
    elements: np.ndarray  # (N,) int64 index into ELEMENTS
    charges: np.ndarray  # (N,) int64 formal charges
    num_h: np.ndarray  # (N,) int64 bonded hydrogens (H or D)
    coords: np.ndarray  # (N, 3) float64 CCD ideal coordinates, Angstrom
    bonds: np.ndarray  # (E, 2) int64, i < j
    bond_orders: np.ndarray  # (E,) int64 Kekule order 1/2/3 (CCD value_order)
    bond_aromatic: np.ndarray  # (E,) bool (CCD pdbx_aromatic_flag)
    stereo: np.ndarray  # (N,) int64 CCD pdbx_stereo_config: 0 none, 1 R, 2 S
    topo: np.ndarray  # (N, N) int64 bonds on the shortest path
    same_ring: np.ndarray  # (N, N) bool
    parity: np.ndarray  # (N,) int64: +1 / -1 at stereocentres (``chirality_parity``), 0 elsewhere

    @property
    def num_atoms(self) -> int:
        return len(self.atom_names)

    @property
    def element_symbols(self) -> list[str]:
        return [ELEMENTS[e] for e in self.elements]

    def chiral_neighbours(self) -> dict[int, tuple[int, int, int]]:
        """Stereocentre index -> its three lowest-index heavy neighbours (the parity's order)."""
        nbrs = neighbour_lists(self.bonds, self.num_atoms)
        return {int(i): tuple(nbrs[i][:3]) for i in np.flatnonzero(self.parity)}


def make_molecule(
    comp_id: str,
    atom_names: list[str],
    elements: list[str],
    charges: np.ndarray,
    coords: np.ndarray,
    stereo: np.ndarray,
    bonds: np.ndarray,
    bond_orders: np.ndarray,
    bond_aromatic: np.ndarray,
    num_h: np.ndarray,
) -> Molecule:
    """Validate a heavy-atom graph and derive topology, rings and chirality parity.

    elements: symbols in ``ELEMENTS`` (else ``ValueError`` naming element and component); coords (N, 3);
    bonds (E, 2); the other arrays per atom (N,) or per bond (E,) as in ``Molecule``.
    """
    for e in elements:
        if e not in ELEMENTS:
            raise ValueError(
                f"component {comp_id!r} contains unsupported element {e!r}; supported: {', '.join(ELEMENTS)}"
            )
    n = len(atom_names)
    bonds = np.sort(np.asarray(bonds, dtype=np.int64).reshape(-1, 2), axis=1)
    coords = np.asarray(coords, dtype=np.float64).reshape(n, 3)
    rings = smallest_rings(bonds, n)
    same_ring = np.zeros((n, n), dtype=bool)
    for ring in rings:
        same_ring[np.ix_(ring, ring)] = True
    np.fill_diagonal(same_ring, False)
    stereo = np.asarray(stereo, dtype=np.int64)
    return Molecule(
        comp_id=comp_id,
        atom_names=tuple(atom_names),
        elements=np.array([ELEMENTS.index(e) for e in elements], dtype=np.int64),
        charges=np.asarray(charges, dtype=np.int64),
        num_h=np.asarray(num_h, dtype=np.int64),
        coords=coords,
        bonds=bonds,
        bond_orders=np.asarray(bond_orders, dtype=np.int64),
        bond_aromatic=np.asarray(bond_aromatic, dtype=bool),
        stereo=stereo,
        topo=topological_distances(bonds, n),
        same_ring=same_ring,
        parity=chirality_parity(coords, bonds, stereo),
    )


def coordinate_rms(mols: list[Molecule]) -> float:
    """Per-coordinate RMS of each molecule's centred coordinates over all atoms (a sigma_data estimate)."""
    if not mols:
        return float("nan")
    sq = sum(float(((m.coords - m.coords.mean(0)) ** 2).sum()) for m in mols)
    return (sq / (3 * sum(m.num_atoms for m in mols))) ** 0.5
