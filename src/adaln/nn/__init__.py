"""adaln.nn: the AdaLN family, embeddings, rotary position embedding, attention, MLPs and the residual blocks
built from them."""

from adaln.nn.adaln import (
    AdaLN,
    AdaLNContinuous,
    AdaLNSingle,
    AdaLNSingleTable,
    AdaLNZero,
    AdaptiveZeroInit,
    AF3AdaptiveLayerNorm,
    adaln_continuous_from_diffusers,
    adaln_continuous_to_diffusers,
)
from adaln.nn.attention import Attention, CrossAttention, StreamAttention
from adaln.nn.blocks import AdaLNZeroResidualBlock, DiTBlock, FinalLayer
from adaln.nn.ckconv import (
    CKConvND,
    HyenaND,
    KernelFiLMGenerator,
    QKVSequenceMixer,
    RandomFourierKernelND,
    SIRENKernelND,
    hyena_mixer,
)
from adaln.nn.embeddings import (
    FourierEmbedding,
    LabelEmbedder,
    LabelEmbedding,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    timestep_embedding,
)
from adaln.nn.hyena import Hyena, fft_long_conv
from adaln.nn.mlp import DropPath, Mlp, SwiGLU
from adaln.nn.rope import RotaryEmbedding, apply_rope, rope_angles, rope_frequencies

__all__ = [
    "Hyena",
    "fft_long_conv",
    "CKConvND",
    "HyenaND",
    "KernelFiLMGenerator",
    "QKVSequenceMixer",
    "RandomFourierKernelND",
    "SIRENKernelND",
    "hyena_mixer",
    "AF3AdaptiveLayerNorm",
    "AdaLN",
    "AdaLNContinuous",
    "AdaLNSingle",
    "AdaLNSingleTable",
    "AdaLNZero",
    "AdaLNZeroResidualBlock",
    "AdaptiveZeroInit",
    "Attention",
    "CrossAttention",
    "DiTBlock",
    "DropPath",
    "FinalLayer",
    "FourierEmbedding",
    "LabelEmbedder",
    "LabelEmbedding",
    "Mlp",
    "PatchEmbed",
    "RotaryEmbedding",
    "StreamAttention",
    "SwiGLU",
    "TimestepEmbedder",
    "adaln_continuous_from_diffusers",
    "adaln_continuous_to_diffusers",
    "apply_rope",
    "get_2d_sincos_pos_embed",
    "rope_angles",
    "rope_frequencies",
    "timestep_embedding",
]
