"""AlphaFold3's diffusion module in PyTorch, numerically matching the official JAX code.

Modules follow google-deepmind/alphafold3 (``diffusion_transformer.py``, ``diffusion_head.py``,
``atom_cross_attention.py``); :func:`load_alphafold3_params` reads the official parameter layout,
:mod:`adaln.models.af3.ports` the Protenix and alphafold3-pytorch state dicts.
Differences from the paper, Protenix and alphafold3-pytorch: ``docs/af3_differences.md``.
"""

from adaln.models.af3.atom_attention import (
    ATOM_FEATURES,
    AtomAttentionDecoder,
    AtomAttentionEncoder,
    AtomEncoderOutput,
    check_atom_features,
    key_windows,
)
from adaln.models.af3.conditioning import DiffusionConditioning, relative_encoding, relative_encoding_dim
from adaln.models.af3.diffusion_module import SIGMA_DATA, DiffusionModule
from adaln.models.af3.params import export_alphafold3_params, load_alphafold3_params
from adaln.models.af3.ports import (
    alphafold3_pytorch_state_dict,
    load_alphafold3_pytorch_state_dict,
    load_protenix_state_dict,
    protenix_state_dict,
)
from adaln.models.af3.transformer import (
    AF3LayerNorm,
    AttentionPairBias,
    ConditionedTransition,
    CrossAttention,
    CrossAttTransformer,
    DiffusionTransformer,
    DiffusionTransformerBlock,
    af3_init_,
    af3_linear,
)

__all__ = [
    "ATOM_FEATURES",
    "AF3LayerNorm",
    "AtomAttentionDecoder",
    "AtomAttentionEncoder",
    "AtomEncoderOutput",
    "AttentionPairBias",
    "ConditionedTransition",
    "CrossAttention",
    "CrossAttTransformer",
    "DiffusionConditioning",
    "DiffusionModule",
    "DiffusionTransformer",
    "DiffusionTransformerBlock",
    "SIGMA_DATA",
    "af3_init_",
    "af3_linear",
    "alphafold3_pytorch_state_dict",
    "check_atom_features",
    "export_alphafold3_params",
    "key_windows",
    "load_alphafold3_params",
    "load_alphafold3_pytorch_state_dict",
    "load_protenix_state_dict",
    "protenix_state_dict",
    "relative_encoding",
    "relative_encoding_dim",
]
