"""AlphaFold3 diffusion conditioning (Algorithm 21 as implemented) and the relative encoding.

Matches ``DiffusionHead._conditioning`` of the official ``diffusion_head.py`` and
``featurization.create_relative_encoding``. The pair part does not depend on the noise level, so it is
exposed separately (:meth:`DiffusionConditioning.pair`) to be computed once per sampling run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.models.af3.params import Entry, linear_entries, norm_entries
from adaln.models.af3.transformer import AF3LayerNorm, ConditionedTransition, af3_linear, check_features
from adaln.nn.embeddings import FourierEmbedding

TOKEN_FEATURES = ("token_index", "residue_index", "asym_id", "entity_id", "sym_id")


def relative_encoding_dim(max_relative_idx: int = 32, max_relative_chain: int = 2) -> int:
    """Channels of :func:`relative_encoding`: 2 (2 r_max + 2) + 1 + (2 s_max + 2) = 139 for AF3."""
    return 2 * (2 * max_relative_idx + 2) + 1 + 2 * max_relative_chain + 2


def relative_encoding(
    features: Mapping[str, Tensor], max_relative_idx: int = 32, max_relative_chain: int = 2
) -> Tensor:
    """Algorithm 3 as implemented (``create_relative_encoding``): one-hot relative positions.

    features: integer tensors ``token_index, residue_index, asym_id, entity_id, sym_id`` of shape
    (..., N). Returns float (..., N, N, 139): relative residue index (clipped to ±32, "other chain" bin),
    relative token index (same residue only), same-entity flag, relative sym_id (same entity only).
    """
    t = {}
    for key in TOKEN_FEATURES:
        if key not in features:
            raise ValueError(f"features must contain {key!r} (integer (..., N)) for the relative encoding")
        t[key] = torch.as_tensor(features[key])
        if t[key].is_floating_point():
            raise TypeError(f"features[{key!r}] must be an integer tensor, got {t[key].dtype}")
    shape = t["token_index"].shape
    if any(v.shape != shape for v in t.values()):
        shapes = {k: tuple(v.shape) for k, v in t.items()}
        raise ValueError(f"token features must share one shape, got {shapes}")

    def pairwise(v: Tensor) -> Tensor:
        return v[..., :, None] - v[..., None, :]

    r, s = max_relative_idx, max_relative_chain
    same_chain = pairwise(t["asym_id"]) == 0
    same_residue = same_chain & (pairwise(t["residue_index"]) == 0)
    same_entity = pairwise(t["entity_id"]) == 0
    far = torch.full_like(pairwise(t["token_index"]), 2 * r + 1)
    rel_pos = torch.where(same_chain, (pairwise(t["residue_index"]) + r).clamp(0, 2 * r), far)
    rel_token = torch.where(same_residue, (pairwise(t["token_index"]) + r).clamp(0, 2 * r), far)
    other_entity = torch.full_like(far, 2 * s + 1)
    rel_chain = torch.where(same_entity, (pairwise(t["sym_id"]) + s).clamp(0, 2 * s), other_entity)
    return torch.cat(
        [
            F.one_hot(rel_pos, 2 * r + 2),
            F.one_hot(rel_token, 2 * r + 2),
            same_entity[..., None],
            F.one_hot(rel_chain, 2 * s + 2),
        ],
        dim=-1,
    ).float()


class DiffusionConditioning(nn.Module):
    """Algorithm 21 as implemented (``DiffusionHead._conditioning``).

    pair = Linear(LN([z_trunk, relative_encoding])) + 2 transitions (the 139 one-hot channels are
    concatenated raw, not embedded first);
    single = Linear(LN([s_trunk, s_inputs])) + Linear(LN(fourier(log(sigma / sigma_data) / 4))) + 2
    transitions. LayerNorms have a scale and no offset; Linears have no bias ('linear' init).
    Inputs have the trunk widths ``c_single`` / ``c_pair``; outputs the conditioning widths
    ``c_single_cond`` / ``c_pair_cond`` (``ConditioningConfig.seq_channel`` / ``pair_channel``: 384 / 128,
    independent of the trunk's).
    """

    _af3_scoped = True

    def __init__(
        self,
        c_single: int = 384,
        c_pair: int = 128,
        c_s_inputs: int = 449,
        c_noise: int = 256,
        sigma_data: float = 16.0,
        max_relative_idx: int = 32,
        max_relative_chain: int = 2,
        *,
        c_single_cond: int = 384,
        c_pair_cond: int = 128,
    ):
        super().__init__()
        self.c_single, self.c_pair, self.c_s_inputs = c_single, c_pair, c_s_inputs
        self.c_single_cond, self.c_pair_cond = c_single_cond, c_pair_cond
        self.sigma_data = sigma_data
        self.max_relative_idx, self.max_relative_chain = max_relative_idx, max_relative_chain
        c_rel = relative_encoding_dim(max_relative_idx, max_relative_chain)
        self.pair_cond_initial_norm = AF3LayerNorm(c_pair + c_rel)
        self.pair_cond_initial_projection = af3_linear(c_pair + c_rel, c_pair_cond)
        self.pair_transitions = nn.ModuleList(ConditionedTransition(c_pair_cond) for _ in range(2))
        self.single_cond_initial_norm = AF3LayerNorm(c_single + c_s_inputs)
        self.single_cond_initial_projection = af3_linear(c_single + c_s_inputs, c_single_cond)
        self.fourier = FourierEmbedding(c_noise)
        self.noise_embedding_initial_norm = AF3LayerNorm(c_noise)
        self.noise_embedding_initial_projection = af3_linear(c_noise, c_single_cond)
        self.single_transitions = nn.ModuleList(ConditionedTransition(c_single_cond) for _ in range(2))

    def pair(self, z_trunk: Tensor, token_features: Mapping[str, Tensor]) -> Tensor:
        """Noise-independent pair conditioning: z_trunk (..., N, N, c_pair) -> (..., N, N, c_pair_cond)."""
        check_features(z_trunk, "z_trunk", self.c_pair, min_dim=3)
        rel = relative_encoding(token_features, self.max_relative_idx, self.max_relative_chain)
        if rel.shape[-3:-1] != z_trunk.shape[-3:-1]:
            raise ValueError(
                f"token features give {rel.shape[-2]} tokens, z_trunk has shape {tuple(z_trunk.shape)}"
            )
        rel = rel.to(device=z_trunk.device, dtype=z_trunk.dtype).expand(*z_trunk.shape[:-1], rel.shape[-1])
        pair = torch.cat([z_trunk, rel], dim=-1)
        pair = self.pair_cond_initial_projection(self.pair_cond_initial_norm(pair))
        for transition in self.pair_transitions:
            pair = pair + transition(pair)
        return pair

    def single(self, sigma: Tensor, s_trunk: Tensor, s_inputs: Tensor) -> Tensor:
        """Noise-dependent single conditioning.

        sigma: noise level broadcastable to the leading dims of s_trunk (..., N, c_single);
        s_inputs: (..., N, c_s_inputs). Returns (..., N, c_single_cond).
        """
        check_features(s_trunk, "s_trunk", self.c_single)
        check_features(s_inputs, "s_inputs", self.c_s_inputs)
        sigma = torch.as_tensor(sigma, dtype=s_trunk.dtype, device=s_trunk.device)
        try:
            lead = torch.broadcast_shapes(s_trunk.shape[:-1], s_inputs.shape[:-1])
            torch.broadcast_shapes(sigma.shape, lead[:-1])
        except RuntimeError:
            raise ValueError(
                f"s_trunk {tuple(s_trunk.shape)}, s_inputs {tuple(s_inputs.shape)} and sigma "
                f"{tuple(sigma.shape)} must broadcast: (..., N, C), (..., N, C') and (...)"
            ) from None
        single = torch.cat([s_trunk.expand(*lead, -1), s_inputs.expand(*lead, -1)], dim=-1)
        single = self.single_cond_initial_projection(self.single_cond_initial_norm(single))
        noise = self.fourier(0.25 * torch.log(sigma / self.sigma_data)).to(single.dtype)
        noise = self.noise_embedding_initial_projection(self.noise_embedding_initial_norm(noise))
        single = single + noise[..., None, :]
        for transition in self.single_transitions:
            single = single + transition(single)
        return single

    def forward(
        self,
        sigma: Tensor,
        s_trunk: Tensor,
        s_inputs: Tensor,
        z_trunk: Tensor,
        token_features: Mapping[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """(single (..., N, c_single_cond), pair (..., N, N, c_pair_cond)) conditioning."""
        return self.single(sigma, s_trunk, s_inputs), self.pair(z_trunk, token_features)

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        entries = {
            **norm_entries(f"{prefix}/pair_cond_initial_norm", self.pair_cond_initial_norm),
            **linear_entries(f"{prefix}/pair_cond_initial_projection", self.pair_cond_initial_projection),
            **norm_entries(f"{prefix}/single_cond_initial_norm", self.single_cond_initial_norm),
            **linear_entries(f"{prefix}/single_cond_initial_projection", self.single_cond_initial_projection),
            **norm_entries(f"{prefix}/noise_embedding_initial_norm", self.noise_embedding_initial_norm),
            **linear_entries(
                f"{prefix}/noise_embedding_initial_projection", self.noise_embedding_initial_projection
            ),
        }
        for i, (p, s) in enumerate(zip(self.pair_transitions, self.single_transitions)):
            entries.update(p._af3_entries(f"{prefix}/pair_transition_{i}"))
            entries.update(s._af3_entries(f"{prefix}/single_transition_{i}"))
        return entries
