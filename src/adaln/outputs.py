"""Every file the command writes for a user: sample grids, arrays, JSON and Markdown reports, mmCIF
files and molecule drawings.

Each is written to a temporary file beside its destination, flushed to disk, then renamed over it
(``atomic_output``): a kill, a full disk or a second process never leaves a cut or mixed file, and the
previous version stays intact until the new one is complete. Outputs never go inside a checkpoint
directory (pruning old checkpoints would delete them).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from adaln.errors import ConfigError, RunError

if TYPE_CHECKING:
    from adaln.data.ccd import Molecule

TEMP_PREFIX = ".tmp-"
_CHECKPOINT_DIR = re.compile(r"^step_\d{8,}$")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, fsync and rename it to
    ``path``. On any failure the temporary file is removed and ``path`` is left as it was; an ``OSError``
    (full disk, no permission) becomes a ``RunError`` naming ``path``."""
    path = Path(path)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"could not write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_path(path: str | os.PathLike, flag: str = "-o") -> Path:
    """``path`` as a file destination: not a directory, not inside a checkpoint directory."""
    path = Path(path)
    if not str(path).strip():
        raise ConfigError(f"{flag} must name a file, got an empty path")
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: give a file name inside it")
    for parent in path.resolve().parents:
        if _CHECKPOINT_DIR.match(parent.name) and parent.parent.name == "checkpoints":
            raise ConfigError(f"{flag} {path} is inside the checkpoint {parent}, which pruning deletes: "
                              "write outputs into the run directory or elsewhere")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_array(path: str | os.PathLike, array: np.ndarray | Tensor) -> Path:
    """A ``.npy`` file (no pickle: object arrays are refused)."""
    a = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, a, allow_pickle=False)
    return Path(path)


def save_grid(images: Tensor, rows: int, path: str | os.PathLike, *, scale: int = 4) -> Path:
    """A PNG with ``rows`` rows (one per condition) of images (N, C, H, W) in [-1, 1], 1-pixel gutters."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = n // rows
    arr = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = arr[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """A matplotlib figure as PNG (closed afterwards)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_loss_curve(rows: list[dict[str, Any]], path: str | os.PathLike, ylabel: str = "training loss") -> Path | None:
    """Loss against step (log scale) from metrics rows; nothing when there are no rows."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _bond_types(mol: Molecule) -> np.ndarray:
    """biotite BondType codes: 1/2/3 Kekule single/double/triple, 5/6/7 the aromatic ones."""
    return np.where(mol.bond_aromatic, mol.bond_orders + 4, mol.bond_orders)


def write_mmcif(mol: Molecule, conformers: np.ndarray, out: str | Path) -> Path:
    """Write conformers (n, N, 3) as one mmCIF file with n models (``pdbx_PDB_model_num`` 1..n) and the
    component's bonds in ``chem_comp_bond``."""
    import biotite.structure as struc
    import biotite.structure.io.pdbx as pdbx

    x = np.asarray(conformers, dtype=np.float64)
    if x.ndim != 3 or x.shape[1:] != (mol.num_atoms, 3):
        raise ValueError(f"conformers must be (n, {mol.num_atoms}, 3) for {mol.comp_id}, got {x.shape}")
    stack = struc.AtomArrayStack(len(x), mol.num_atoms)
    stack.coord = x.astype(np.float32)
    stack.chain_id[:] = "A"
    stack.res_id[:] = 1
    stack.res_name[:] = mol.comp_id
    stack.hetero[:] = True
    stack.atom_name = np.array(mol.atom_names)
    stack.element = np.array(mol.element_symbols)
    stack.set_annotation("charge", mol.charges.astype(np.int32))
    stack.bonds = struc.BondList(mol.num_atoms, np.column_stack([mol.bonds, _bond_types(mol)]))
    cif = pdbx.CIFFile()
    pdbx.set_structure(cif, stack, data_block=mol.comp_id)
    with atomic_output(out) as tmp:
        cif.write(str(tmp))
    return Path(out)


ELEMENT_COLOURS = {
    "C": "#404040", "N": "#3050f8", "O": "#ff0d0d", "S": "#e0c030", "P": "#ff8000", "F": "#90e050",
    "CL": "#1ff01f", "BR": "#a62929", "I": "#940094", "B": "#ffb5b5", "SE": "#ffa100", "SI": "#daa520",
    "FE": "#e06633",
}  # Jmol CPK colours (carbon darkened to show on white)


def draw_conformers(mol: Molecule, conformers: np.ndarray, out: str | Path, titles: list[str]) -> Path:
    """Ball-and-stick panels (matplotlib 3-D): the reference, then each conformer; element colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [mol.coords, *conformers]
    fig = plt.figure(figsize=(2.6 * len(panels), 3.0), dpi=100)
    colours = [ELEMENT_COLOURS[e] for e in mol.element_symbols]
    lim = np.abs(np.concatenate(panels) - mol.coords.mean(0)).max()
    for p, (xyz, title) in enumerate(zip(panels, ["reference (CCD ideal)", *titles])):
        ax = fig.add_subplot(1, len(panels), p + 1, projection="3d")
        xyz = xyz - mol.coords.mean(0)
        for i, j in mol.bonds:
            ax.plot(*xyz[[i, j]].T, color="#9a9a9a", lw=2)
        ax.scatter(*xyz.T, c=colours, s=60, depthshade=True, edgecolors="black", linewidths=0.3)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_zlim(-lim, lim)
        ax.set_box_aspect(None, zoom=1.5)
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
    fig.suptitle(mol.comp_id)
    fig.tight_layout()
    return save_figure(fig, out)
