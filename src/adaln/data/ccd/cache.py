"""The cached data set: the filtered CCD molecules as safetensors + JSON (no pickle).

Filter (``build_ccd_cache``): released components (not ``OBS``) with ``MIN_ATOMS``-``MAX_ATOMS`` heavy
atoms, every element in ``ELEMENTS``, ideal coordinates present for every heavy atom (and not flagged
missing), and a connected heavy-atom graph (a conformer RMSD of disconnected fragments is undefined).

Molecules are stored in hash order (``split_of``), so a subset (``limit``) takes the first ids of a split
and is a deterministic sample of it. The files live in ``$ADALN_CACHE`` or ``~/.cache/adaln``, named by
a hash of the cache version, the biotite version and the filter.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from adaln.data.ccd.dictionary import MAX_ATOMS, MIN_ATOMS, SPLIT_BOUNDS, SPLITS, _hash_key, _tables, split_of
from adaln.data.ccd.molecule import ELEMENTS, Molecule, coordinate_rms

CACHE_VERSION = 1


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
    """Filter the bundled CCD once; returns the JSON path (safetensors beside it).

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
