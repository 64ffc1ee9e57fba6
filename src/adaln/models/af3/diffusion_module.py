"""AlphaFold3 diffusion module (Algorithm 20 as implemented): one EDM denoising step.

Matches ``DiffusionHead.__call__`` of the official ``diffusion_head.py``: c_in scaling, atom encoder
(with the raw trunk single and the conditioned pair), + Linear(LN(conditioned single)), diffusion
transformer, LN, atom decoder, ``c_skip x + c_out update``, masked. A denoiser ``D(x, sigma, **cond)``
for the EDM/AF3 samplers in :mod:`adaln.diffusion`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from adaln.checks import check_tensor
from adaln.diffusion import edm_scalings
from adaln.models.af3.atom_attention import (
    ATOM_FEATURES,
    AtomAttentionDecoder,
    AtomAttentionEncoder,
    check_atom_features,
)
from adaln.models.af3.conditioning import DiffusionConditioning
from adaln.models.af3.params import Entry, linear_entries, norm_entries
from adaln.models.af3.transformer import (
    AF3LayerNorm,
    DiffusionTransformer,
    af3_linear,
    check_devices,
    check_features,
    check_inputs,
)

SIGMA_DATA = 16.0  # "Carefully measured by averaging multimer training set" (official).


class DiffusionModule(nn.Module):
    """The AF3 denoiser ``D(x_noisy, sigma)``.

    forward(x_noisy (..., A, 3), sigma (broadcastable to ...), *, features, s_trunk (..., N, c_single),
    s_inputs (..., N, c_s_inputs), z_trunk (..., N, N, c_pair) or pair_cond (precomputed
    ``conditioning.pair``)) -> denoised coordinates (..., A, 3), zero at padded atoms.

    ``features`` holds the atom features of :mod:`adaln.models.af3.atom_attention` (``ref_pos, ref_mask,
    ref_element, ref_charge, ref_atom_name_chars, ref_space_uid, atom_to_token, atom_mask``), the
    token features of the relative encoding (``token_index, residue_index, asym_id, entity_id, sym_id``)
    and optionally ``token_mask`` (..., N). Their leading dims broadcast to those of ``x_noisy``
    (e.g. one structure, several samples). Defaults are the official ``DiffusionHead.Config``:
    ``c_single`` / ``c_pair`` are the trunk widths, ``c_single_cond`` / ``c_pair_cond`` the conditioning
    widths (``conditioning.seq_channel`` / ``pair_channel``) the transformer and the atom encoder's pair
    use; ``transition_factor`` / ``key_dim`` / ``value_dim`` configure the token transformer
    (``transformer``), ``atom_*`` the atom transformers (``atom_transformer``: factor 2, key and value
    widths 128 whatever ``c_atom`` is). ``mask_mode='corrected'`` stops real atoms from attending to
    padded keys (the official atom attention lets them); ``uid_gather='token_atoms'`` (default, with
    ``token_atom_slot`` when a token's dense layout has gaps) reproduces the official same-frame flag,
    ``'queries'`` the consistent gather (see :mod:`adaln.models.af3.atom_attention`).
    Input tensors must share the module's device and (outside ``torch.autocast``) dtype.
    """

    _af3_scoped = True

    def __init__(
        self,
        c_token: int = 768,
        c_single: int = 384,
        c_pair: int = 128,
        c_s_inputs: int = 449,
        c_atom: int = 128,
        c_atompair: int = 16,
        num_blocks: int = 24,
        num_heads: int = 16,
        super_block_size: int = 4,
        atom_blocks: int = 3,
        atom_heads: int = 4,
        sigma_data: float = SIGMA_DATA,
        mask_mode: str = "official",
        uid_gather: str = "token_atoms",
        *,
        c_single_cond: int = 384,
        c_pair_cond: int = 128,
        transition_factor: int = 2,
        key_dim: int | None = None,
        value_dim: int | None = None,
        atom_transition_factor: int = 2,
        atom_key_dim: int = 128,
        atom_value_dim: int = 128,
    ):
        super().__init__()
        self.sigma_data = sigma_data
        self.c_pair_cond = c_pair_cond
        self.conditioning = DiffusionConditioning(
            c_single, c_pair, c_s_inputs, sigma_data=sigma_data, c_single_cond=c_single_cond,
            c_pair_cond=c_pair_cond,
        )
        atom = dict(key_dim=atom_key_dim, value_dim=atom_value_dim, transition_factor=atom_transition_factor)
        self.atom_encoder = AtomAttentionEncoder(
            c_atom, c_atompair, c_token, c_single, c_pair_cond, atom_blocks, atom_heads, mask_mode,
            uid_gather, **atom,
        )
        self.single_cond_embedding_norm = AF3LayerNorm(c_single_cond)
        self.single_cond_embedding_projection = af3_linear(c_single_cond, c_token, init="zeros")
        self.transformer = DiffusionTransformer(
            c_token, c_single_cond, c_pair_cond, num_blocks, num_heads, super_block_size,
            transition_factor=transition_factor, key_dim=key_dim, value_dim=value_dim,
        )
        self.output_norm = AF3LayerNorm(c_token)
        self.atom_decoder = AtomAttentionDecoder(
            c_atom, c_atompair, c_token, atom_blocks, atom_heads, mask_mode, **atom
        )

    def forward(
        self,
        x_noisy: Tensor,
        sigma: Tensor | float,
        *,
        features: Mapping[str, Tensor],
        s_trunk: Tensor,
        s_inputs: Tensor,
        z_trunk: Tensor | None = None,
        pair_cond: Tensor | None = None,
    ) -> Tensor:
        check_features(x_noisy, "x_noisy", 3)
        check_inputs(
            self, x_noisy=x_noisy, s_trunk=s_trunk, s_inputs=s_inputs, z_trunk=z_trunk, pair_cond=pair_cond
        )
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a mapping of name -> tensor, got {type(features).__name__}")
        # sigma and the features are cast to the working dtype: only their device must match.
        check_devices(self, sigma=sigma, **{f"features[{k!r}]": v for k, v in features.items()})
        lead = x_noisy.shape[:-2]
        sigma = torch.as_tensor(sigma, dtype=x_noisy.dtype, device=x_noisy.device)
        try:
            sigma = sigma.expand(lead)
        except RuntimeError:
            raise ValueError(
                f"sigma must broadcast to x_noisy's leading dims {tuple(lead)}, got {tuple(sigma.shape)}"
            ) from None
        if (pair_cond is None) == (z_trunk is None):
            raise ValueError("give exactly one of z_trunk (..., N, N, c_pair) and pair_cond (precomputed)")
        if pair_cond is None:
            pair_cond = self.conditioning.pair(z_trunk, features)
        check_tensor(s_trunk, "s_trunk", min_dim=2)
        n = s_trunk.shape[-2]
        if pair_cond.shape[-3:-1] != (n, n):
            raise ValueError(
                f"pair conditioning must be (..., {n}, {n}, C) to match s_trunk, got {tuple(pair_cond.shape)}"
            )
        atom_mask = check_atom_features(features, n)["atom_mask"].to(x_noisy.dtype)
        if atom_mask.shape[-1] != x_noisy.shape[-2]:
            raise ValueError(
                f"x_noisy has {x_noisy.shape[-2]} atoms, features['atom_mask'] has {atom_mask.shape[-1]}"
            )
        token_mask = features.get("token_mask")
        atom_features = {k: _expand(v, lead, k) for k, v in features.items()}

        # AF3's preconditioning is EDM's; its c_noise (log(sigma / sigma_data) / 4) lives in the conditioning.
        c_skip, c_out, c_in, _ = (c[..., None, None] for c in edm_scalings(sigma, self.sigma_data))
        single = self.conditioning.single(sigma, s_trunk, s_inputs)
        enc = self.atom_encoder(atom_features, x_noisy * atom_mask[..., None] * c_in, s_trunk, pair_cond)
        act = enc.token_act + self.single_cond_embedding_projection(self.single_cond_embedding_norm(single))
        token_mask = None if token_mask is None else torch.as_tensor(token_mask)
        act = self.transformer(act, single, pair_cond, token_mask)
        update = self.atom_decoder(self.output_norm(act), enc)

        return (c_skip * x_noisy + c_out * update) * atom_mask[..., None]

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        return {
            **self.conditioning._af3_entries(prefix),
            **self.atom_encoder._af3_entries(f"{prefix}/diffusion"),
            **norm_entries(f"{prefix}/single_cond_embedding_norm", self.single_cond_embedding_norm),
            **linear_entries(
                f"{prefix}/single_cond_embedding_projection", self.single_cond_embedding_projection
            ),
            **self.transformer._af3_entries(f"{prefix}/transformer"),
            **norm_entries(f"{prefix}/output_norm", self.output_norm),
            **self.atom_decoder._af3_entries(f"{prefix}/diffusion"),
        }

    def _af3_ignored(self, prefix: str) -> tuple[str, ...]:
        return self.atom_encoder._af3_ignored(f"{prefix}/diffusion")


def _expand(value: Tensor, lead: torch.Size, key: str) -> Tensor:
    """View a per-structure atom feature at the samples' leading dims; other features pass through."""
    value = torch.as_tensor(value)
    if key not in ATOM_FEATURES + ("token_atom_slot",):
        return value
    trailing = 2 if key in ("ref_pos", "ref_atom_name_chars") else 1
    own_lead, trailing_shape = value.shape[: value.dim() - trailing], value.shape[value.dim() - trailing :]
    try:
        return value.expand(*lead, *trailing_shape)
    except RuntimeError:
        raise ValueError(
            f"features[{key!r}] leading dims {tuple(own_lead)} must broadcast to x_noisy's {tuple(lead)}"
        ) from None
