"""Small molecules from the PDB Chemical Component Dictionary (CCD) bundled with biotite, for conformers.

Read top to bottom, the modules follow the data:

- ``graph``: neighbour lists, topological distances and smallest rings of a bond list.
- ``chirality``: the parity of CCD stereocentres from the reference coordinates.
- ``molecule``: ``Molecule`` (heavy-atom graph and CCD ideal conformer) and ``make_molecule``.
- ``features``: atom features and pair codes, computed once per molecule (``molecule_features``).
- ``dictionary``: the biotite CCD tables read column-wise, ``load_component`` and the hash split.
- ``cache``: the filtered data set on disk (safetensors + JSON), ``load_ccd`` and ``ccd_metadata``.
- ``batch``: ``ConformerBatch`` and ``collate_molecules``.
"""

from adaln.data.ccd.batch import ConformerBatch, collate_molecules
from adaln.data.ccd.cache import (
    CACHE_VERSION,
    _cache_stem,
    build_ccd_cache,
    cache_dir,
    ccd_metadata,
    load_ccd,
    read_molecules,
    write_molecules,
)
from adaln.data.ccd.chirality import CHIRAL_MIN_VOLUME, chirality_parity, signed_volume
from adaln.data.ccd.dictionary import (
    CCD_BOND_ORDERS,
    HYDROGENS,
    MAX_ATOMS,
    MIN_ATOMS,
    SPLIT_BOUNDS,
    SPLITS,
    STEREO_CODES,
    load_component,
    split_of,
)
from adaln.data.ccd.features import (
    ATOM_CHANNELS,
    ATOM_FEATURES_DIM,
    BOND_AROMATIC,
    BOND_DOUBLE,
    BOND_NONE,
    BOND_SINGLE,
    BOND_TRIPLE,
    PAIR_CHANNELS,
    PAIR_CODE_SIZES,
    PAIR_FEATURES_DIM,
    PARITY_CHANNEL,
    TOPO_CAP,
    MoleculeFeatures,
    atom_features,
    hybridisation,
    molecule_features,
    pair_codes,
    pair_features,
)
from adaln.data.ccd.graph import neighbour_lists, smallest_rings, topological_distances
from adaln.data.ccd.molecule import ELEMENTS, Molecule, coordinate_rms, make_molecule

__all__ = [
    "ATOM_CHANNELS", "ATOM_FEATURES_DIM", "BOND_AROMATIC", "BOND_DOUBLE", "BOND_NONE", "BOND_SINGLE",
    "BOND_TRIPLE", "CACHE_VERSION", "CCD_BOND_ORDERS", "CHIRAL_MIN_VOLUME", "ELEMENTS", "HYDROGENS",
    "MAX_ATOMS", "MIN_ATOMS", "PAIR_CHANNELS", "PAIR_CODE_SIZES", "PAIR_FEATURES_DIM", "PARITY_CHANNEL",
    "SPLITS", "SPLIT_BOUNDS", "STEREO_CODES", "TOPO_CAP", "ConformerBatch", "Molecule", "MoleculeFeatures",
    "atom_features", "build_ccd_cache", "cache_dir", "ccd_metadata", "chirality_parity", "collate_molecules",
    "coordinate_rms", "hybridisation", "load_ccd", "load_component", "make_molecule", "molecule_features",
    "neighbour_lists", "pair_codes", "pair_features", "read_molecules", "signed_volume", "smallest_rings",
    "split_of", "topological_distances", "write_molecules",
]
