"""Small molecules from the PDB Chemical Component Dictionary (CCD) bundled with biotite, for conformers.

Source: ``biotite.structure.info.get_ccd()`` (categories ``chem_comp``, ``chem_comp_atom``,
``chem_comp_bond``); the reference conformer of a component is its CCD *ideal* coordinates
(``pdbx_model_Cartn_*_ideal``). Hydrogens (H and D) are removed; each heavy atom keeps its hydrogen count.

Filter (``build_ccd_cache``): released components (not ``OBS``) with ``MIN_ATOMS``-``MAX_ATOMS`` heavy
atoms, every element in ``ELEMENTS``, ideal coordinates present for every heavy atom (and not flagged
missing), and a connected heavy-atom graph (a conformer RMSD of disconnected fragments is undefined).

Split: by component id only, ``sha256(id) % 100`` -> train ``[0, 80)``, validation ``[80, 90)``, test
``[90, 100)``; it does not depend on the filter, the biotite version or any random state. Subsets (``limit``)
take the first ids of a split in hash order, so a small subset is a deterministic sample of the split.

Reading the tables column-wise takes about a second; ``biotite.structure.info.residue`` per component
takes about 21 ms, i.e. ~17 minutes for all 49k components, so the build works on the columns. The
result is cached (safetensors + JSON, no pickle) in ``$ADALN_CACHE`` or ``~/.cache/adaln``.

Features (``atom_features`` / ``pair_features``, channel layouts in ``ATOM_CHANNELS`` / ``PAIR_CHANNELS``):

- atom: element one-hot; formal charge (<= -2, -1, 0, +1, >= +2); aromatic (has a bond flagged aromatic
  in the CCD); hybridisation from Kekule bond orders (sp: a triple or two double bonds; sp2: a double or
  aromatic bond; sp3: otherwise; a heuristic, e.g. amide N counts as sp3); heavy degree 0..5+; hydrogen
  count 0..3+; in ring; tetrahedral stereocentre flag and its parity (below).
- pair: bond type (none, single, double, triple, aromatic; aromatic overrides the Kekule order);
  topological distance one-hot 0..``TOPO_CAP`` (the last bin is ">= cap"); same ring (both atoms on a
  smallest cycle through some bond); rank (0, 1, 2) of ``j`` among stereocentre ``i``'s neighbours.

Chirality: a CCD stereocentre (``pdbx_stereo_config`` R/S) with at least three heavy neighbours gets
``parity = sign(det[n1 - c, n2 - c, n3 - c])`` from the ideal coordinates, with ``n1 < n2 < n3`` its
three lowest-index heavy neighbours. Parity plus the neighbour ranks tell the model the handedness,
which the graph alone does not determine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ELEMENTS = ("C", "N", "O", "S", "P", "F", "CL", "BR", "I", "B", "SE", "SI", "FE")
HYDROGENS = ("H", "D")
MIN_ATOMS, MAX_ATOMS = 5, 48
TOPO_CAP = 8
SPLITS = ("train", "validation", "test")
SPLIT_BOUNDS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}  # sha256(id) % 100
CACHE_VERSION = 1
CHIRAL_MIN_VOLUME = 0.1  # A^3: below this the reference centre is too flat to have a defined parity

BOND_NONE, BOND_SINGLE, BOND_DOUBLE, BOND_TRIPLE, BOND_AROMATIC = range(5)
CCD_BOND_ORDERS = {"SING": 1, "DOUB": 2, "TRIP": 3}
STEREO_CODES = {"N": 0, "R": 1, "S": 2}

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


# --------------------------------------------------------------------------------------------------
# One molecule
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Molecule:
    """Heavy-atom graph and ideal conformer of one CCD component (N atoms, E bonds, indices local)."""

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
    parity: np.ndarray  # (N,) int64: +1 / -1 at stereocentres (module docstring), 0 elsewhere

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


def neighbour_lists(bonds: np.ndarray, n: int) -> list[list[int]]:
    """Sorted heavy-atom neighbours of each atom."""
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for i, j in bonds.tolist():
        nbrs[i].append(j)
        nbrs[j].append(i)
    return [sorted(x) for x in nbrs]


def topological_distances(bonds: np.ndarray, n: int) -> np.ndarray:
    """(N, N) number of bonds on the shortest path; -1 between disconnected atoms (BFS per atom)."""
    nbrs = neighbour_lists(bonds, n)
    dist = np.full((n, n), -1, dtype=np.int64)
    for s in range(n):
        row = dist[s]
        row[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for v in nbrs[u]:
                if row[v] < 0:
                    row[v] = row[u] + 1
                    queue.append(v)
    return dist


def smallest_rings(bonds: np.ndarray, n: int) -> list[tuple[int, ...]]:
    """For every bond on a cycle, the atoms of the smallest cycle through it (duplicates removed).

    The shortest path between the bond's ends with the bond removed closes that cycle; a bridge has none.
    """
    nbrs = neighbour_lists(bonds, n)
    rings = set()
    for a, b in bonds.tolist():
        prev = {a: -1}
        queue = deque([a])
        while queue and b not in prev:
            u = queue.popleft()
            for v in nbrs[u]:
                if v not in prev and not (u == a and v == b):
                    prev[v] = u
                    queue.append(v)
        if b in prev:
            path, u = [], b
            while u != -1:
                path.append(u)
                u = prev[u]
            rings.add(tuple(sorted(path)))
    return sorted(rings)


def chirality_parity(coords: np.ndarray, bonds: np.ndarray, stereo: np.ndarray) -> np.ndarray:
    """(N,) +1 / -1 at R/S centres with >= 3 heavy neighbours and a non-flat reference, 0 elsewhere."""
    nbrs = neighbour_lists(bonds, len(stereo))
    parity = np.zeros(len(stereo), dtype=np.int64)
    for i in np.flatnonzero(stereo):
        if len(nbrs[i]) >= 3:
            vol = signed_volume(coords, i, nbrs[i][:3])
            if abs(vol) >= CHIRAL_MIN_VOLUME:
                parity[i] = 1 if vol > 0 else -1
    return parity


def signed_volume(coords: np.ndarray, centre: int, nbrs: list[int] | tuple[int, ...]) -> float:
    """``det[n1 - c, n2 - c, n3 - c]`` in A^3 (float64); coords (N, 3)."""
    c = np.asarray(coords, dtype=np.float64)
    return float(np.linalg.det(c[list(nbrs)] - c[centre]))


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
    """Validate a heavy-atom graph and derive topology, rings and chirality parity."""
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


# --------------------------------------------------------------------------------------------------
# Reading the bundled CCD column-wise
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The cached data set
# --------------------------------------------------------------------------------------------------


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$ADALN_CACHE``, else ``~/.cache/adaln``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("ADALN_CACHE") or Path.home() / ".cache" / "adaln")


def _cache_stem() -> str:
    import biotite

    key = json.dumps([CACHE_VERSION, biotite.__version__, ELEMENTS, MIN_ATOMS, MAX_ATOMS, SPLIT_BOUNDS])
    return f"ccd-conformers-v{CACHE_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build_ccd_cache(path: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Filter and featurise the bundled CCD once; returns the JSON path (safetensors beside it).

    Molecules are stored in hash order (see ``split_of``); the JSON records the filter counts, the build
    time and the RMS of centred coordinates per split.
    """
    from tqdm.auto import tqdm

    root = cache_dir(path)
    root.mkdir(parents=True, exist_ok=True)
    stem = _cache_stem()
    t0 = time.perf_counter()
    tables = _tables()
    ids, removed = tables.candidates()
    ids.sort(key=_hash_key)
    removed["disconnected"] = 0
    mols = []
    for cid in tqdm(ids, desc="CCD molecules", disable=not progress, mininterval=1.0):
        mol = tables.molecule(cid)
        if (mol.topo < 0).any():
            removed["disconnected"] += 1
            continue
        mols.append(mol)
    splits = [split_of(m.comp_id) for m in mols]
    meta = {
        "version": CACHE_VERSION,
        "elements": list(ELEMENTS),
        "min_atoms": MIN_ATOMS,
        "max_atoms": MAX_ATOMS,
        "splits": splits,
        "components_in_ccd": len(tables.ids),
        "removed": removed,
        "counts": {s: splits.count(s) for s in SPLITS},
        "coordinate_rms": {s: coordinate_rms([m for m, t in zip(mols, splits) if t == s]) for s in SPLITS},
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    return write_molecules(root / stem, mols, meta)


def write_molecules(stem: str | os.PathLike, mols: list[Molecule], meta: dict | None = None) -> Path:
    """Write ``stem.safetensors`` (the arrays, concatenated) and ``stem.json`` (ids, atom names, ``meta``)
    atomically; returns the JSON path, which is written last and so marks a complete pair."""
    from safetensors.numpy import save_file

    if not mols:
        raise ValueError("mols must hold at least one Molecule")
    stem = Path(stem)
    info = {**(meta or {}), "ids": [m.comp_id for m in mols], "atom_names": [" ".join(m.atom_names) for m in mols]}
    tmp = stem.with_name(f".{stem.name}.{os.getpid()}")
    save_file(_pack(mols), f"{tmp}.safetensors")
    Path(f"{tmp}.json").write_text(json.dumps(info))
    os.replace(f"{tmp}.safetensors", f"{stem}.safetensors")
    os.replace(f"{tmp}.json", f"{stem}.json")
    return Path(f"{stem}.json")


def read_molecules(stem: str | os.PathLike, keep: list[int] | None = None) -> list[Molecule]:
    """Molecules written by ``write_molecules`` (all, or the indices in ``keep``)."""
    from safetensors.numpy import load_file

    meta = json.loads(Path(f"{stem}.json").read_text())
    arrays = load_file(f"{stem}.safetensors")
    return [_unpack(arrays, meta, k) for k in (range(len(meta["ids"])) if keep is None else keep)]


def _pack(mols: list[Molecule]) -> dict[str, np.ndarray]:
    n = np.array([m.num_atoms for m in mols])
    e = np.array([len(m.bonds) for m in mols])
    cat = np.concatenate
    return {
        "atom_ptr": np.r_[0, np.cumsum(n)].astype(np.int64),
        "bond_ptr": np.r_[0, np.cumsum(e)].astype(np.int64),
        "pair_ptr": np.r_[0, np.cumsum(n**2)].astype(np.int64),
        "elements": cat([m.elements for m in mols]).astype(np.uint8),
        "charges": cat([m.charges for m in mols]).astype(np.int8),
        "num_h": cat([m.num_h for m in mols]).astype(np.uint8),
        # float64: the values biotite reads, unchanged (the CCD prints 3 decimals).
        "coords": cat([m.coords for m in mols]).astype(np.float64),
        "stereo": cat([m.stereo for m in mols]).astype(np.uint8),
        "parity": cat([m.parity for m in mols]).astype(np.int8),
        "bonds": cat([m.bonds for m in mols]).astype(np.int16),
        "bond_orders": cat([m.bond_orders for m in mols]).astype(np.uint8),
        "bond_aromatic": cat([m.bond_aromatic for m in mols]),
        "topo": cat([m.topo.ravel() for m in mols]).astype(np.uint8),  # connected, < MAX_ATOMS bonds
        "same_ring": cat([m.same_ring.ravel() for m in mols]),
    }


def _unpack(arrays: dict[str, np.ndarray], meta: dict, k: int) -> Molecule:
    a0, a1 = arrays["atom_ptr"][k : k + 2]
    b0, b1 = arrays["bond_ptr"][k : k + 2]
    p0, p1 = arrays["pair_ptr"][k : k + 2]
    n = int(a1 - a0)
    i64 = np.int64
    return Molecule(
        comp_id=meta["ids"][k],
        atom_names=tuple(meta["atom_names"][k].split(" ")),
        elements=arrays["elements"][a0:a1].astype(i64),
        charges=arrays["charges"][a0:a1].astype(i64),
        num_h=arrays["num_h"][a0:a1].astype(i64),
        coords=arrays["coords"][a0:a1],
        bonds=arrays["bonds"][b0:b1].astype(i64),
        bond_orders=arrays["bond_orders"][b0:b1].astype(i64),
        bond_aromatic=arrays["bond_aromatic"][b0:b1],
        stereo=arrays["stereo"][a0:a1].astype(i64),
        topo=arrays["topo"][p0:p1].astype(i64).reshape(n, n),
        same_ring=arrays["same_ring"][p0:p1].reshape(n, n),
        parity=arrays["parity"][a0:a1].astype(i64),
    )


def ccd_metadata(path: str | os.PathLike | None = None, *, progress: bool = True) -> dict:
    """The cache's JSON (ids, splits, filter counts, coordinate RMS per split), building it if needed."""
    json_path = cache_dir(path) / f"{_cache_stem()}.json"
    if not json_path.exists():
        build_ccd_cache(path, progress=progress)
    return json.loads(json_path.read_text())


def load_ccd(
    split: str = "train",
    *,
    limit: int | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[Molecule]:
    """Molecules of ``split`` ("train", "validation", "test" or "all") in hash order, building the cache
    on first use; ``limit`` keeps the first ``limit`` of them (a deterministic subset)."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    meta = ccd_metadata(cache, progress=progress)
    keep = [k for k, s in enumerate(meta["splits"]) if split in ("all", s)][:limit]
    return read_molecules(cache_dir(cache) / _cache_stem(), keep)


def coordinate_rms(mols: list[Molecule]) -> float:
    """Per-coordinate RMS of each molecule's centred coordinates over all atoms (a sigma_data estimate)."""
    if not mols:
        return float("nan")
    sq = sum(float(((m.coords - m.coords.mean(0)) ** 2).sum()) for m in mols)
    return (sq / (3 * sum(m.num_atoms for m in mols))) ** 0.5


# --------------------------------------------------------------------------------------------------
# Features and batches
# --------------------------------------------------------------------------------------------------


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


PAIR_CODE_SIZES = (5, TOPO_CAP + 1, 2, 4)  # categories of each pair_codes channel


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


@dataclass
class ConformerBatch:
    """Molecules padded to the batch's largest (padding is zero everywhere).

    ``coords`` centred ideal conformers (B, N, 3); ``atom_feats`` (B, N, ATOM_FEATURES_DIM) float;
    ``pair_codes`` (B, N, N, 4) int64 (``pair_codes``; a model embeds each channel, which equals a Linear
    on the one-hot ``pair_features`` without materialising them); ``mask`` (B, N) bool.
    """

    coords: Tensor
    atom_feats: Tensor
    pair_codes: Tensor
    mask: Tensor
    comp_ids: list[str]

    def to(self, device: torch.device | str) -> ConformerBatch:
        return ConformerBatch(
            self.coords.to(device), self.atom_feats.to(device), self.pair_codes.to(device),
            self.mask.to(device), self.comp_ids,
        )


def collate_molecules(mols: list[Molecule], dtype: torch.dtype = torch.float32) -> ConformerBatch:
    """Pad ``mols`` to the largest one; see ``ConformerBatch``."""
    if not isinstance(mols, (list, tuple)) or not mols or not all(isinstance(m, Molecule) for m in mols):
        raise TypeError("mols must be a non-empty list of adaln.data.ccd.Molecule")
    b, n = len(mols), max(m.num_atoms for m in mols)
    coords = np.zeros((b, n, 3))
    atom = np.zeros((b, n, ATOM_FEATURES_DIM), dtype=np.float32)
    codes = np.zeros((b, n, n, 4), dtype=np.int64)
    mask = np.zeros((b, n), dtype=bool)
    for k, m in enumerate(mols):
        a = m.num_atoms
        coords[k, :a] = m.coords - m.coords.mean(0)
        atom[k, :a] = atom_features(m)
        codes[k, :a, :a] = pair_codes(m)
        mask[k, :a] = True
    return ConformerBatch(
        torch.from_numpy(coords).to(dtype), torch.from_numpy(atom).to(dtype), torch.from_numpy(codes),
        torch.from_numpy(mask), [m.comp_id for m in mols],
    )
