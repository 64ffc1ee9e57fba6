"""Chirality parity of CCD stereocentres, from the reference coordinates.

A CCD stereocentre (``pdbx_stereo_config`` R/S) with at least three heavy neighbours gets
``parity = sign(det[n1 - c, n2 - c, n3 - c])`` from the ideal coordinates, with ``n1 < n2 < n3`` its
three lowest-index heavy neighbours. Parity plus the neighbour ranks (``pair_codes``) tell a model the
handedness, which the graph alone does not determine; the sign test is local and label-free, so no CIP
ranking is needed.
"""

from __future__ import annotations

import numpy as np

from adaln.data.ccd.graph import neighbour_lists

CHIRAL_MIN_VOLUME = 0.1  # A^3: below this the reference centre is too flat to have a defined parity


def chirality_parity(coords: np.ndarray, bonds: np.ndarray, stereo: np.ndarray) -> np.ndarray:
    """(N,) +1 / -1 at R/S centres with >= 3 heavy neighbours and a non-flat reference, 0 elsewhere.

    coords (N, 3); bonds (E, 2); stereo (N,) CCD codes (0 none, 1 R, 2 S).
    """
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
