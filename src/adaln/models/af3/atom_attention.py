"""AlphaFold3 atom cross-attention encoder and decoder (Algorithms 5-7 as implemented).

Matches ``atom_cross_att_encoder`` / ``atom_cross_att_decoder`` of the official
``atom_cross_attention.py`` and the gather layout of ``features.AtomCrossAtt``. We take atoms in one flat
list instead of the official (tokens, 24) dense layout; per-atom operations are the same.

Atom features (``features`` dict; ``...`` = leading batch dims shared by every entry, A = atom slots):

=======================  ==================  =============================================================
``ref_pos``              (..., A, 3) float   reference-conformer coordinates (Å)
``ref_mask``             (..., A)            1 where the reference conformer has the atom
``ref_element``          (..., A) int        atomic number, < 128
``ref_charge``           (..., A) float      formal charge (embedded as asinh)
``ref_atom_name_chars``  (..., A, 4) int     atom name characters, ASCII code - 32, each < 64
``ref_space_uid``        (..., A) int        id of the reference frame (atoms of one conformer share it)
``atom_to_token``        (..., A) int        index of the token each atom belongs to
``atom_mask``            (..., A)            1 for real atoms; real atoms must come first (a prefix)
=======================  ==================  =============================================================

Layout: the atoms are padded with zero features to a multiple of 32 (at least 128) and cut into subsets
of 32 queries; subset i attends to the 128 keys centred at 16 + 32 i, shifted to lie inside the real
atoms at the edges. A key window that still reaches past the real atoms (fewer than 128 of them) reads
the last padded query, as the official gather indices do. Padded atom slots are treated exactly like the
official zero padding: their features are ignored.

Same-frame flag of atom pairs (``offsets_valid``): every commit on the main history of the official
``atom_cross_attention.py`` reads the keys' ``ref_space_uid`` from the (tokens, 24) token-atom layout with
the flat query-to-key indices (alphafold3 issue #730: the indices address the queries layout, so most
keys read another atom's uid or padding); the released weights were trained with it.
``uid_gather='token_atoms'`` (the default) reproduces it; it uses ``token_atom_slot`` (..., A) int, each
real atom's slot (< 24) in its token's dense layout, and without it takes each atom's rank within its
token (a dense layout without gaps, as for complete residues and ligands). Exact when there are at least
128 real atoms; smaller systems also read padding positions that depend on the official padding
buckets. ``uid_gather='queries'`` compares each key's own uid (token -> queries -> keys, the gather
``keys_ref_pos`` uses; the fix proposed in alphafold3 pull request #733, not in the released code).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.models.af3.params import Entry, linear_entries, norm_entries
from adaln.models.af3.transformer import (
    AF3LayerNorm,
    CrossAttTransformer,
    af3_linear,
    check_features,
    gather_keys,
)

ATOM_FEATURES = (
    "ref_pos",
    "ref_mask",
    "ref_element",
    "ref_charge",
    "ref_atom_name_chars",
    "ref_space_uid",
    "atom_to_token",
    "atom_mask",
)
_INTEGER = ("ref_element", "ref_atom_name_chars", "ref_space_uid", "atom_to_token")
_TRAILING = {"ref_pos": 2, "ref_atom_name_chars": 2}
NUM_ELEMENTS, NUM_NAME_CHARS, NAME_LENGTH = 128, 64, 4
QUERIES, KEYS = 32, 128
MAX_ATOMS_PER_TOKEN = 24  # width of the official token-atom layout
UID_GATHERS = ("queries", "token_atoms")


def check_atom_features(features: Mapping[str, Tensor], num_tokens: int | None = None) -> dict[str, Tensor]:
    """Validate the atom feature dict (see module docstring); returns the entries as tensors."""
    if not isinstance(features, Mapping):
        raise TypeError(f"features must be a mapping of name -> tensor, got {type(features).__name__}")
    missing = [k for k in ATOM_FEATURES if k not in features]
    if missing:
        raise ValueError(f"features is missing {missing}; expected keys {list(ATOM_FEATURES)}")
    f = {k: torch.as_tensor(features[k]) for k in ATOM_FEATURES}
    for k in _INTEGER:
        if f[k].is_floating_point():
            raise TypeError(f"features[{k!r}] must be an integer tensor, got {f[k].dtype}")
        f[k] = f[k].long()
    lead = f["atom_mask"].shape
    for k, t in f.items():
        expected = lead + ((3,) if k == "ref_pos" else (NAME_LENGTH,) if k == "ref_atom_name_chars" else ())
        if t.shape != expected:
            raise ValueError(
                f"features[{k!r}] must have shape {tuple(expected)} (from atom_mask), got {tuple(t.shape)}"
            )
        if k in ("ref_pos", "ref_charge") and not t.is_floating_point():
            raise TypeError(f"features[{k!r}] must be a floating-point tensor, got {t.dtype}")
    mask = f["atom_mask"] > 0
    if bool((mask[..., 1:] & ~mask[..., :-1]).any()):
        raise ValueError(
            "features['atom_mask'] must list real atoms first: a padded slot is followed by a real atom"
        )
    if bool((f["ref_element"] < 0).any() | (f["ref_element"] >= NUM_ELEMENTS).any()):
        raise ValueError(f"features['ref_element'] must lie in [0, {NUM_ELEMENTS})")
    if bool((f["ref_atom_name_chars"] < 0).any() | (f["ref_atom_name_chars"] >= NUM_NAME_CHARS).any()):
        raise ValueError(f"features['ref_atom_name_chars'] must lie in [0, {NUM_NAME_CHARS})")
    tokens = f["atom_to_token"]
    if bool((tokens < 0).any()) or (num_tokens is not None and bool((tokens >= num_tokens).any())):
        raise ValueError(f"features['atom_to_token'] must lie in [0, num_tokens={num_tokens})")
    return f


def key_windows(atom_mask: Tensor, queries: int = QUERIES, keys: int = KEYS) -> tuple[int, Tensor]:
    """Padded atom count P and key indices (B, P / queries, keys) into the flat padded queries.

    Windows centred at queries/2 + queries*i; a window starting before 0 moves right to 0, else one
    ending after the last real atom moves left to end on it (``features.AtomCrossAtt``). Indices outside
    the real atoms point at the last padded slot (P - 1): the official gather of any padding atom.
    """
    b, a = atom_mask.shape
    padded = math.ceil(max(a, keys) / queries) * queries  # >= keys: a padded slot exists when needed
    n = atom_mask.sum(-1).long()[:, None]
    start = queries // 2 + queries * torch.arange(padded // queries, device=atom_mask.device) - keys // 2
    start = torch.where(start < 0, torch.zeros_like(start), torch.where(start + keys > n, n - keys, start))
    index = start[..., None] + torch.arange(keys, device=atom_mask.device)
    real = (index >= 0) & (index < n[..., None])
    return padded, torch.where(real, index, torch.full_like(index, padded - 1))


@dataclass(frozen=True)
class AtomEncoderOutput:
    """Encoder results the decoder reuses; atom tensors are flattened to one batch dim B."""

    token_act: Tensor  # (..., N, c_token)
    skip: Tensor  # (B, S, 32, c_atom)
    queries_mask: Tensor  # (B, S, 32)
    queries_cond: Tensor  # (B, S, 32, c_atom)
    key_index: Tensor  # (B, S, 128)
    keys_mask: Tensor  # (B, S, 128)
    keys_cond: Tensor  # (B, S, 128, c_atom)
    pair: Tensor  # (B, S, 32, 128, c_atompair)
    token_index: Tensor  # (B, P) token of each padded query
    num_atoms: int  # A


def _check_lead(t: Tensor, name: str, lead: torch.Size, trailing: int) -> None:
    try:
        ok = torch.broadcast_shapes(t.shape[: t.dim() - trailing], lead) == lead
    except RuntimeError:
        ok = False
    if not ok:
        own = tuple(t.shape[: t.dim() - trailing])
        raise ValueError(f"{name}'s leading dims {own} must broadcast to the atom features' {tuple(lead)}")


def _flat(t: Tensor, lead: torch.Size, trailing: int) -> Tensor:
    return t.expand(*lead, *t.shape[t.dim() - trailing :]).reshape(-1, *t.shape[t.dim() - trailing :])


def _pad(t: Tensor, padded: int) -> Tensor:
    """Zero-pad the atom axis (dim 1) of (B, A, ...) to ``padded``."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, padded - t.shape[1]))


def _take_tokens(t: Tensor, index: Tensor) -> Tensor:
    """t (B, N, C) at token indices (B, ...) -> (B, ..., C)."""
    batch = torch.arange(t.shape[0], device=t.device).view(-1, *([1] * (index.dim() - 1)))
    return t[batch, index]


class AtomAttentionEncoder(nn.Module):
    """Algorithm 5 as implemented (``atom_cross_att_encoder``): atoms -> per-token activations.

    Per-atom conditioning from the reference conformer (+ LN/Linear of the trunk single, zero init);
    queries = Linear(noisy positions) + conditioning; atom-pair features from the conditioning (row/col),
    the trunk pair (zero-init projection), reference offsets, inverse squared distances and the
    same-reference-frame flag, refined by a 3-layer ReLU MLP; a 3-block CrossAttTransformer; then the
    masked mean of ReLU(Linear(atoms)) over each token. ``c_single`` (the raw trunk single) /
    ``c_pair`` (the conditioned pair) None drop the trunk inputs (as when the official code is called
    without them). ``key_dim``, ``value_dim`` and ``transition_factor`` configure the atom transformer
    (``AtomCrossAttEncoderConfig.atom_transformer``: 128, 128, 2 whatever ``c_atom`` is).
    """

    def __init__(
        self,
        c_atom: int = 128,
        c_atompair: int = 16,
        c_token: int = 768,
        c_single: int | None = 384,
        c_pair: int | None = 128,
        num_blocks: int = 3,
        num_heads: int = 4,
        mask_mode: str = "official",
        uid_gather: str = "token_atoms",
        *,
        key_dim: int = 128,
        value_dim: int = 128,
        transition_factor: int = 2,
    ):
        super().__init__()
        if uid_gather not in UID_GATHERS:
            raise ValueError(f"uid_gather must be one of {UID_GATHERS}, got {uid_gather!r}")
        self.c_atom, self.c_token, self.c_single, self.c_pair = c_atom, c_token, c_single, c_pair
        self.uid_gather = uid_gather
        self.embed_ref_pos = af3_linear(3, c_atom)
        self.embed_ref_mask = af3_linear(1, c_atom)
        self.embed_ref_element = af3_linear(NUM_ELEMENTS, c_atom)
        self.embed_ref_charge = af3_linear(1, c_atom)
        self.embed_ref_atom_name = af3_linear(NAME_LENGTH * NUM_NAME_CHARS, c_atom)
        if c_single is not None:
            self.lnorm_trunk_single_cond = AF3LayerNorm(c_single)
            self.embed_trunk_single_cond = af3_linear(c_single, c_atom, init="zeros")
        self.atom_positions_to_features = af3_linear(3, c_atom)
        self.single_to_pair_cond_row = af3_linear(c_atom, c_atompair)
        self.single_to_pair_cond_col = af3_linear(c_atom, c_atompair)
        if c_pair is not None:
            self.lnorm_trunk_pair_cond = AF3LayerNorm(c_pair)
            self.embed_trunk_pair_cond = af3_linear(c_pair, c_atompair, init="zeros")
        self.embed_pair_offsets = af3_linear(3, c_atompair)
        self.embed_pair_distances = af3_linear(1, c_atompair)
        self.embed_pair_offsets_valid = af3_linear(1, c_atompair)
        self.pair_mlp_1 = af3_linear(c_atompair, c_atompair, init="relu")
        self.pair_mlp_2 = af3_linear(c_atompair, c_atompair, init="relu")
        self.pair_mlp_3 = af3_linear(c_atompair, c_atompair, init="zeros")
        self.atom_transformer = CrossAttTransformer(
            c_atom, c_atom, c_atompair, num_blocks, num_heads, mask_mode,
            transition_factor=transition_factor, key_dim=key_dim, value_dim=value_dim,
        )
        self.project_atom_features_for_aggr = af3_linear(c_atom, c_token)

    def per_atom_conditioning(self, f: Mapping[str, Tensor], ref_mask: Tensor, ref_pos: Tensor) -> Tensor:
        """``_per_atom_conditioning``'s single part: (B, A) -> (B, A, c_atom), 0 where ref_mask is 0."""
        dtype = ref_pos.dtype
        act = self.embed_ref_pos(ref_pos)
        act = act + self.embed_ref_mask(ref_mask[..., None])
        act = act + self.embed_ref_element(F.one_hot(f["ref_element"], NUM_ELEMENTS).to(dtype))
        act = act + self.embed_ref_charge(torch.asinh(f["ref_charge"].to(dtype))[..., None])
        names = F.one_hot(f["ref_atom_name_chars"], NUM_NAME_CHARS).to(dtype).flatten(-2)
        act = act + self.embed_ref_atom_name(names)
        return act * ref_mask[..., None]

    def forward(
        self,
        features: Mapping[str, Tensor],
        positions: Tensor | None = None,
        s_trunk: Tensor | None = None,
        pair_cond: Tensor | None = None,
    ) -> AtomEncoderOutput:
        """features: atom feature dict (..., A); positions: (..., A, 3) (already scaled by c_in) or None;
        s_trunk: (..., N, c_single); pair_cond: (..., N, N, c_pair). Returns token_act (..., N, c_token)
        and the tensors the decoder reuses."""
        for name, value, dim in (("s_trunk", s_trunk, self.c_single), ("pair_cond", pair_cond, self.c_pair)):
            if value is not None and dim is None:
                raise ValueError(f"{name} must be None: the encoder was built without it (its dim is None)")
        num_tokens = self._num_tokens(features, s_trunk, pair_cond)
        n = num_tokens
        if pair_cond is not None and s_trunk is not None and pair_cond.shape[-3:-1] != (n, n):
            got = tuple(pair_cond.shape)
            raise ValueError(f"pair_cond must be (..., {n}, {n}, C) to match s_trunk, got {got}")
        f = check_atom_features(features, num_tokens)
        lead, num_atoms = f["atom_mask"].shape[:-1], f["atom_mask"].shape[-1]
        dtype = self.embed_ref_pos.weight.dtype
        f = {k: _flat(t, lead, _TRAILING.get(k, 1)) for k, t in f.items()}
        mask = f["atom_mask"].to(dtype)
        # Padded slots are zeroed like the official zero padding.
        ref_mask = f["ref_mask"].to(dtype) * mask
        ref_pos = f["ref_pos"].to(dtype) * mask[..., None]
        uid = torch.where(mask > 0, f["ref_space_uid"], torch.zeros_like(f["ref_space_uid"]))

        padded, key_index = key_windows(mask)
        subsets = (key_index.shape[0], padded // QUERIES, QUERIES)
        token_index = _pad(f["atom_to_token"], padded)
        q_mask = _pad(mask, padded)
        q_cond = _pad(self.per_atom_conditioning(f, ref_mask, ref_pos), padded)
        if s_trunk is not None:
            _check_lead(check_features(s_trunk, "s_trunk", self.c_single), "s_trunk", lead, 2)
            trunk = self.embed_trunk_single_cond(self.lnorm_trunk_single_cond(_flat(s_trunk, lead, 2)))
            q_cond = q_cond + _take_tokens(trunk, token_index) * q_mask[..., None]
        q_act = q_cond
        if positions is not None:
            check_features(positions, "positions", 3)
            if positions.shape[:-1] != lead + (num_atoms,):
                expected = tuple(lead) + (num_atoms, 3)
                raise ValueError(f"positions must be {expected}, got {tuple(positions.shape)}")
            pos = _pad(_flat(positions.to(dtype), lead, 2), padded)
            q_act = self.atom_positions_to_features(pos) * q_mask[..., None] + q_cond

        q_mask, q_cond, q_act = q_mask.view(subsets), q_cond.view(*subsets, -1), q_act.view(*subsets, -1)
        k_mask, k_cond = gather_keys(q_mask, key_index), gather_keys(q_cond, key_index)
        pair = self.single_to_pair_cond_row(F.relu(q_cond))[..., :, None, :]
        pair = pair + self.single_to_pair_cond_col(F.relu(k_cond))[..., None, :, :]
        if pair_cond is not None:
            _check_lead(check_features(pair_cond, "pair_cond", self.c_pair, min_dim=3), "pair_cond", lead, 3)
            trunk = self.embed_trunk_pair_cond(self.lnorm_trunk_pair_cond(pair_cond))
            trunk = _flat(trunk, lead, 3)
            q_tok = token_index.view(subsets)
            k_tok = gather_keys(q_tok, key_index)
            batch = torch.arange(trunk.shape[0], device=trunk.device).view(-1, 1, 1, 1)
            both = (q_mask[..., :, None] * k_mask[..., None, :])[..., None]
            pair = pair + trunk[batch, q_tok[..., :, None], k_tok[..., None, :]] * both
        q_pos = _pad(ref_pos, padded).view(*subsets, 3)
        q_uid = _pad(uid, padded).view(subsets)
        k_uid = gather_keys(q_uid, key_index)
        if self.uid_gather == "token_atoms":
            k_uid = _token_atoms_uid(features, lead, f["atom_to_token"], uid, mask, key_index, num_tokens)
        valid = (q_uid[..., :, None] == k_uid[..., None, :]).to(dtype)[..., None]
        offsets = q_pos[..., :, None, :] - gather_keys(q_pos, key_index)[..., None, :, :]
        pair = pair + self.embed_pair_offsets(offsets) * valid
        inv_sq = 1.0 / (1.0 + offsets.square().sum(-1, keepdim=True))
        pair = pair + self.embed_pair_distances(inv_sq) * valid
        pair = pair + self.embed_pair_offsets_valid(valid)
        hidden = self.pair_mlp_2(F.relu(self.pair_mlp_1(F.relu(pair))))
        pair = pair + self.pair_mlp_3(F.relu(hidden))

        q_act = self.atom_transformer(q_act, q_mask, key_index, k_mask, q_cond, k_cond, pair)
        q_act = q_act * q_mask[..., None]
        per_atom = F.relu(self.project_atom_features_for_aggr(q_act)).flatten(1, 2)[:, :num_atoms]
        token_act = _masked_token_mean(per_atom, f["atom_to_token"], mask, num_tokens)
        return AtomEncoderOutput(
            token_act=token_act.reshape(*lead, num_tokens, self.c_token),
            skip=q_act,
            queries_mask=q_mask,
            queries_cond=q_cond,
            key_index=key_index,
            keys_mask=k_mask,
            keys_cond=k_cond,
            pair=pair,
            token_index=token_index,
            num_atoms=num_atoms,
        )

    @staticmethod
    def _num_tokens(features: Mapping[str, Tensor], s_trunk: Tensor | None, pair_cond: Tensor | None) -> int:
        if s_trunk is not None:
            return s_trunk.shape[-2]
        if pair_cond is not None:
            return pair_cond.shape[-2]
        return int(torch.as_tensor(features["atom_to_token"]).max()) + 1

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        names = [
            "embed_ref_pos",
            "embed_ref_mask",
            "embed_ref_element",
            "embed_ref_charge",
            "embed_ref_atom_name",
            "atom_positions_to_features",
            "embed_pair_offsets_valid",
            "pair_mlp_1",
            "pair_mlp_2",
            "pair_mlp_3",
            "project_atom_features_for_aggr",
        ]
        # Haiku suffixes '_1': _per_atom_conditioning already created these names (their outputs unused).
        renamed = {
            "single_to_pair_cond_row": "single_to_pair_cond_row_1",
            "single_to_pair_cond_col": "single_to_pair_cond_col_1",
            "embed_pair_offsets": "embed_pair_offsets_1",
            "embed_pair_distances": "embed_pair_distances_1",
        }
        entries = {}
        for name in names:
            entries.update(linear_entries(f"{prefix}_{name}", getattr(self, name)))
        for name, official in renamed.items():
            entries.update(linear_entries(f"{prefix}_{official}", getattr(self, name)))
        if self.c_single is not None:
            entries.update(norm_entries(f"{prefix}_lnorm_trunk_single_cond", self.lnorm_trunk_single_cond))
            entries.update(linear_entries(f"{prefix}_embed_trunk_single_cond", self.embed_trunk_single_cond))
        if self.c_pair is not None:
            entries.update(norm_entries(f"{prefix}_lnorm_trunk_pair_cond", self.lnorm_trunk_pair_cond))
            entries.update(linear_entries(f"{prefix}_embed_trunk_pair_cond", self.embed_trunk_pair_cond))
        entries.update(self.atom_transformer._af3_entries(f"{prefix}_atom_transformer_encoder"))
        return entries

    def _af3_ignored(self, prefix: str) -> tuple[str, ...]:
        """Parameters of ``_per_atom_conditioning``'s pair part: created, never used by the encoder."""
        unused = ("single_to_pair_cond_row", "single_to_pair_cond_col")
        unused += ("embed_pair_offsets", "embed_pair_distances")
        return tuple(f"{prefix}_{n}/weights" for n in unused)


def _token_atoms_uid(
    features: Mapping[str, Tensor],
    lead: torch.Size,
    atom_to_token: Tensor,
    uid: Tensor,
    mask: Tensor,
    key_index: Tensor,
    num_tokens: int,
) -> Tensor:
    """The released keys' uid (issue #730): (tokens x 24) layout read at flat query indices (B, S, K)."""
    if "token_atom_slot" in features:
        slot = torch.as_tensor(features["token_atom_slot"])
        if slot.is_floating_point() or slot.shape != lead + uid.shape[-1:]:
            expected = tuple(lead + uid.shape[-1:])
            raise ValueError(f"features['token_atom_slot'] must be an integer tensor of shape {expected}")
        slot = _flat(slot.long().to(uid.device), lead, 1)
    else:
        slot = _rank_within_token(atom_to_token, mask)
    if bool(((slot < 0) | (slot >= MAX_ATOMS_PER_TOKEN))[mask > 0].any()):
        raise ValueError(
            f"features['token_atom_slot'] must lie in [0, {MAX_ATOMS_PER_TOKEN}) (without it: at most "
            f"{MAX_ATOMS_PER_TOKEN} atoms per token)"
        )
    size = num_tokens * MAX_ATOMS_PER_TOKEN
    # Real atoms fill their dense slot; padded atoms write into one extra column that is dropped.
    index = torch.where(mask > 0, atom_to_token * MAX_ATOMS_PER_TOKEN + slot, torch.full_like(slot, size))
    dense = uid.new_zeros(uid.shape[0], size + 1).scatter_(1, index, uid)[:, :size]
    # Under jit an out-of-range gather clamps to the last element.
    flat = key_index.flatten(1).clamp_max(size - 1)
    return dense.gather(1, flat).view_as(key_index)


def _rank_within_token(atom_to_token: Tensor, mask: Tensor) -> Tensor:
    """(B, A): how many real atoms of the same token come before each atom (0 for padded slots)."""
    real = mask > 0
    b, a = atom_to_token.shape
    # Stable sort by token (padded slots last): a token's atoms become one run, in their input order.
    key = torch.where(real, atom_to_token, torch.full_like(atom_to_token, atom_to_token.max() + 1))
    order = torch.sort(key, dim=1, stable=True).indices
    sorted_key = key.gather(1, order)
    position = torch.arange(a, device=key.device).expand(b, a)
    run_start = torch.ones_like(real)
    run_start[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    start = torch.cummax(torch.where(run_start, position, torch.zeros_like(position)), dim=1).values
    rank = torch.empty_like(position).scatter_(1, order, position - start)
    return torch.where(real, rank, torch.zeros_like(rank))


def _masked_token_mean(per_atom: Tensor, atom_to_token: Tensor, mask: Tensor, num_tokens: int) -> Tensor:
    """``utils.mask_mean`` over each token's atoms: (B, A, C) -> (B, N, C); empty tokens give 0."""
    b, _, c = per_atom.shape
    index = atom_to_token[..., None].expand(-1, -1, c)
    masked = per_atom * mask[..., None]  # in the wider dtype of the two (under autocast: the mask's)
    total = masked.new_zeros(b, num_tokens, c).scatter_add_(1, index, masked)
    count = mask.new_zeros(b, num_tokens).scatter_add_(1, atom_to_token, mask)
    return total / count.clamp_min(1e-10)[..., None]


class AtomAttentionDecoder(nn.Module):
    """Algorithm 6 as implemented (``atom_cross_att_decoder``): token activations -> atom position updates.

    Broadcast Linear(token_act) to the token's atoms, add the encoder skip, run a 3-block
    CrossAttTransformer with the encoder's conditioning and pair features, then LN + Linear(-> 3) (zero
    init). ``key_dim``, ``value_dim`` and ``transition_factor`` as in :class:`AtomAttentionEncoder`.
    token_act: (..., N, c_token); returns (..., A, 3).
    """

    def __init__(
        self,
        c_atom: int = 128,
        c_atompair: int = 16,
        c_token: int = 768,
        num_blocks: int = 3,
        num_heads: int = 4,
        mask_mode: str = "official",
        *,
        key_dim: int = 128,
        value_dim: int = 128,
        transition_factor: int = 2,
    ):
        super().__init__()
        self.c_token = c_token
        self.project_token_features_for_broadcast = af3_linear(c_token, c_atom)
        self.atom_transformer = CrossAttTransformer(
            c_atom, c_atom, c_atompair, num_blocks, num_heads, mask_mode,
            transition_factor=transition_factor, key_dim=key_dim, value_dim=value_dim,
        )
        self.atom_features_layer_norm = AF3LayerNorm(c_atom)
        self.atom_features_to_position_update = af3_linear(c_atom, 3, init="zeros")

    def forward(self, token_act: Tensor, enc: AtomEncoderOutput) -> Tensor:
        check_features(token_act, "token_act", self.c_token)
        lead = token_act.shape[:-2]
        q_mask = enc.queries_mask
        tokens = self.project_token_features_for_broadcast(token_act)
        tokens = tokens.reshape(q_mask.shape[0], token_act.shape[-2], -1)
        q_act = _take_tokens(tokens, enc.token_index).view_as(enc.skip)
        q_act = (q_act + enc.skip) * q_mask[..., None]
        q_act = self.atom_transformer(
            q_act, q_mask, enc.key_index, enc.keys_mask, enc.queries_cond, enc.keys_cond, enc.pair
        )
        q_act = self.atom_features_layer_norm(q_act * q_mask[..., None])
        update = self.atom_features_to_position_update(q_act).flatten(1, 2)[:, : enc.num_atoms]
        return update.reshape(*lead, enc.num_atoms, 3)

    def _af3_entries(self, prefix: str) -> dict[str, Entry]:
        return {
            **linear_entries(
                f"{prefix}_project_token_features_for_broadcast", self.project_token_features_for_broadcast
            ),
            **self.atom_transformer._af3_entries(f"{prefix}_atom_transformer_decoder"),
            **norm_entries(f"{prefix}_atom_features_layer_norm", self.atom_features_layer_norm),
            **linear_entries(
                f"{prefix}_atom_features_to_position_update", self.atom_features_to_position_update
            ),
        }
