"""Padded batches of molecules for a conformer denoiser."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from adaln.data.ccd.features import ATOM_FEATURES_DIM, molecule_features
from adaln.data.ccd.molecule import Molecule


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
    """Pad ``mols`` to the largest one; see ``ConformerBatch``. Features come from ``molecule_features``
    (computed once per molecule)."""
    if not isinstance(mols, (list, tuple)) or not mols or not all(isinstance(m, Molecule) for m in mols):
        raise TypeError("mols must be a non-empty list of adaln.data.ccd.Molecule")
    b, n = len(mols), max(m.num_atoms for m in mols)
    coords = np.zeros((b, n, 3))
    atom = np.zeros((b, n, ATOM_FEATURES_DIM), dtype=np.float32)
    codes = np.zeros((b, n, n, 4), dtype=np.int64)
    mask = np.zeros((b, n), dtype=bool)
    for k, m in enumerate(mols):
        a, feats = m.num_atoms, molecule_features(m)
        coords[k, :a] = m.coords - m.coords.mean(0)
        atom[k, :a] = feats.atom
        codes[k, :a, :a] = feats.pair
        mask[k, :a] = True
    return ConformerBatch(
        torch.from_numpy(coords).to(dtype), torch.from_numpy(atom).to(dtype), torch.from_numpy(codes),
        torch.from_numpy(mask), [m.comp_id for m in mols],
    )
