"""The PDB Chemical Component Dictionary (CCD) bundled with biotite, read column-wise, and the split.

Source: ``biotite.structure.info.get_ccd()`` (categories ``chem_comp``, ``chem_comp_atom``,
``chem_comp_bond``); the reference conformer of a component is its CCD *ideal* coordinates
(``pdbx_model_Cartn_*_ideal``). Hydrogens (H and D) are removed; each heavy atom keeps its hydrogen count.

Reading the tables column-wise takes about a second; ``biotite.structure.info.residue`` per component
takes about 21 ms, i.e. ~17 minutes for all 49k components, so everything here works on the columns.

Split: by component id only, ``sha256(id) % 100`` -> train ``[0, 80)``, validation ``[80, 90)``, test
``[90, 100)``; it does not depend on the filter, the biotite version or any random state.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from adaln.data.ccd.molecule import ELEMENTS, Molecule, make_molecule

HYDROGENS = ("H", "D")
MIN_ATOMS, MAX_ATOMS = 5, 48
SPLITS = ("train", "validation", "test")
SPLIT_BOUNDS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}  # sha256(id) % 100
CCD_BOND_ORDERS = {"SING": 1, "DOUB": 2, "TRIP": 3}
STEREO_CODES = {"N": 0, "R": 1, "S": 2}


class _Tables:
    """The CCD columns we use, with each component's atom and bond row ranges."""

    def __init__(self) -> None:
        try:
            from biotite.structure.info import get_ccd
        except ImportError as err:
            raise ImportError(
                "the CCD data set needs biotite: pip install 'adaln[ccd]' (biotite and rdkit)"
            ) from err
        ccd = get_ccd()
        atom, bond, comp = ccd["chem_comp_atom"], ccd["chem_comp_bond"], ccd["chem_comp"]
        self.atom_comp = atom["comp_id"].as_array()
        self.atom_name = atom["atom_id"].as_array()
        self.element = np.char.upper(atom["type_symbol"].as_array())
        self.charge = atom["charge"].as_array(np.int64)
        self.stereo = atom["pdbx_stereo_config"].as_array()
        self.xyz = np.stack([atom[f"pdbx_model_Cartn_{a}_ideal"].as_array(np.float64) for a in "xyz"], 1)
        # biotite's masks: 0 = value present, otherwise '.' or '?' (the value array then holds a filler).
        self.xyz_ok = np.ones(len(self.xyz), dtype=bool)
        for a in "xyz":
            mask = atom[f"pdbx_model_Cartn_{a}_ideal"].mask
            if mask is not None:
                self.xyz_ok &= mask.array == 0
        self.xyz_ok &= np.isfinite(self.xyz).all(1)
        self.bond_comp = bond["comp_id"].as_array()
        self.bond_a = bond["atom_id_1"].as_array()
        self.bond_b = bond["atom_id_2"].as_array()
        self.bond_order = bond["value_order"].as_array()
        self.bond_arom = bond["pdbx_aromatic_flag"].as_array() == "Y"
        ids = comp["id"].as_array()
        self.status = dict(zip(ids.tolist(), comp["pdbx_release_status"].as_array().tolist()))
        self.ideal_missing = dict(zip(ids.tolist(), comp["pdbx_ideal_coordinates_missing_flag"].as_array().tolist()))
        starts = np.r_[0, np.flatnonzero(self.atom_comp[1:] != self.atom_comp[:-1]) + 1]
        self.ids = self.atom_comp[starts].tolist()
        self.atom_ranges = np.stack([starts, np.r_[starts[1:], len(self.atom_comp)]], 1)
        self.index = {c: i for i, c in enumerate(self.ids)}
        lo = np.searchsorted(self.bond_comp, self.atom_comp[starts], side="left")
        hi = np.searchsorted(self.bond_comp, self.atom_comp[starts], side="right")
        self.bond_ranges = np.stack([lo, hi], 1)

    def molecule(self, comp_id: str) -> Molecule:
        """The heavy-atom Molecule of one component; ValueError naming what is wrong with it."""
        if comp_id not in self.index:
            raise ValueError(f"unknown CCD component id {comp_id!r} (not in biotite's bundled CCD)")
        k = self.index[comp_id]
        s, e = self.atom_ranges[k]
        names = self.atom_name[s:e].tolist()
        elements = self.element[s:e].tolist()
        heavy = np.array([el not in HYDROGENS for el in elements])
        if not heavy.any():
            raise ValueError(f"component {comp_id!r} has no heavy atoms")
        if self.ideal_missing.get(comp_id) == "Y" or not self.xyz_ok[s:e][heavy].all():
            raise ValueError(f"component {comp_id!r} has no complete ideal coordinates in the CCD")
        local = {name: i for i, name in enumerate(names)}
        heavy_index = np.cumsum(heavy) - 1
        num_h = np.zeros(int(heavy.sum()), dtype=np.int64)
        bonds, orders, arom = [], [], []
        bs, be = self.bond_ranges[k]
        for a, b, order, aromatic in zip(
            self.bond_a[bs:be].tolist(), self.bond_b[bs:be].tolist(),
            self.bond_order[bs:be].tolist(), self.bond_arom[bs:be].tolist(),
        ):
            i, j = local[a], local[b]
            if heavy[i] and heavy[j]:
                if order not in CCD_BOND_ORDERS:
                    raise ValueError(f"component {comp_id!r} has a bond of unsupported order {order!r}")
                bonds.append((heavy_index[i], heavy_index[j]))
                orders.append(CCD_BOND_ORDERS[order])
                arom.append(aromatic)
            elif heavy[i] != heavy[j]:
                num_h[heavy_index[i] if heavy[i] else heavy_index[j]] += 1
        idx = np.flatnonzero(heavy)
        return make_molecule(
            comp_id,
            [names[i] for i in idx],
            [elements[i] for i in idx],
            self.charge[s:e][idx],
            self.xyz[s:e][idx],
            np.array([STEREO_CODES.get(c, 0) for c in self.stereo[s:e][idx].tolist()]),
            np.array(bonds, dtype=np.int64).reshape(-1, 2),
            np.array(orders, dtype=np.int64),
            np.array(arom, dtype=bool),
            num_h,
        )

    def candidates(self) -> tuple[list[str], dict[str, int]]:
        """Ids passing the cheap column-wise filters (status, size, elements, coordinates), and the
        number removed by each."""
        heavy = ~np.isin(self.element, HYDROGENS)
        starts = self.atom_ranges[:, 0]
        n_heavy = np.add.reduceat(heavy.astype(np.int64), starts)
        bad_element = np.add.reduceat((heavy & ~np.isin(self.element, ELEMENTS)).astype(np.int64), starts) > 0
        bad_xyz = np.add.reduceat((heavy & ~self.xyz_ok).astype(np.int64), starts) > 0
        removed = dict(obsolete=0, size=0, unsupported_element=0, missing_ideal_coordinates=0)
        keep = []
        for k, cid in enumerate(self.ids):
            if self.status.get(cid) == "OBS":
                removed["obsolete"] += 1
            elif not MIN_ATOMS <= n_heavy[k] <= MAX_ATOMS:
                removed["size"] += 1
            elif bad_element[k]:
                removed["unsupported_element"] += 1
            elif bad_xyz[k] or self.ideal_missing.get(cid) == "Y":
                removed["missing_ideal_coordinates"] += 1
            else:
                keep.append(cid)
        return keep, removed


@functools.cache
def _tables() -> _Tables:
    return _Tables()


def load_component(comp_id: str) -> Molecule:
    """One CCD component by id (e.g. ``"ATP"``), hydrogens removed; no size filter.

    Raises ``ValueError`` for an unknown id, an element outside ``ELEMENTS`` (naming element and
    component) or missing ideal coordinates; ``TypeError`` if ``comp_id`` is not a string.
    """
    if not isinstance(comp_id, str):
        raise TypeError(f"comp_id must be a string such as 'ATP', got {type(comp_id).__name__}")
    return _tables().molecule(comp_id.strip().upper())


def split_of(comp_id: str) -> str:
    """The split of a component id: ``sha256(id) % 100`` in [0, 80) train, [80, 90) validation, else test."""
    bucket = _hash_key(comp_id) % 100
    return next(name for name, (lo, hi) in SPLIT_BOUNDS.items() if lo <= bucket < hi)


def _hash_key(comp_id: str) -> int:
    return int.from_bytes(hashlib.sha256(comp_id.encode()).digest()[:8], "big")
