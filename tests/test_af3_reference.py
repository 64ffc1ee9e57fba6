"""adaln.models.af3 against a float64 NumPy re-derivation of the official AlphaFold3 JAX code.

The reference functions below follow google-deepmind/alphafold3 (diffusion_transformer.py,
diffusion_head.py, atom_cross_attention.py, features.AtomCrossAtt, featurization.py) line by line, on
unbatched NumPy arrays and a parameter dict in the official naming. The parameter dict is what
``export_alphafold3_params`` produces from a module whose every parameter was randomised, so these
tests check the maths and the official names/layouts together.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaln.models.af3 import (
    AtomAttentionEncoder,
    AttentionPairBias,
    ConditionedTransition,
    DiffusionConditioning,
    DiffusionModule,
    DiffusionTransformer,
    export_alphafold3_params,
    key_windows,
    relative_encoding,
)

F64 = torch.float64
TOL = 1e-13  # measured at most 2.2e-14 (DiffusionModule outputs of magnitude ~40): docs/af3_differences.md


# ------------------------------------------------------------------------------------------------
# NumPy reference of the official code
# ------------------------------------------------------------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def layer_norm(x, scale=None, offset=None, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # use_fast_variance=False
    y = (x - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    return y


def linear(p, name, x):
    """hm.Linear(num_input_dims=1): weights (in, *out), optional bias (*out)."""
    y = np.tensordot(x, p[f"{name}/weights"], axes=([-1], [0]))
    if f"{name}/bias" in p:
        y = y + p[f"{name}/bias"]
    return y


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def layer(p, prefix, index):
    """The parameters of one layer of a layer_stack: keys under ``prefix`` indexed at ``index``."""
    return {k[len(prefix) :]: v[index] for k, v in p.items() if k.startswith(prefix)}


def adaptive_layernorm(p, x, single_cond, name):
    if single_cond is None:
        return layer_norm(x, p[f"{name}layer_norm/scale"], p[f"{name}layer_norm/offset"])
    x = layer_norm(x)
    single_cond = layer_norm(single_cond, p[f"{name}single_cond_layer_norm/scale"])
    single_scale = linear(p, f"{name}single_cond_scale", single_cond)
    single_bias = linear(p, f"{name}single_cond_bias", single_cond)
    return sigmoid(single_scale) * x + single_bias


def adaptive_zero_init(p, x, single_cond, name):
    output = linear(p, f"{name}transition2", x)
    if single_cond is not None:
        output = sigmoid(linear(p, f"{name}adaptive_zero_cond", single_cond)) * output
    return output


def transition_block(p, x, single_cond, name=""):
    x = adaptive_layernorm(p, x, single_cond, f"{name}ffw_")
    x = linear(p, f"{name}ffw_transition1", x)
    a, b = np.split(x, 2, axis=-1)
    c = a * sigmoid(a) * b  # swish(a) * b
    return adaptive_zero_init(p, c, single_cond, f"{name}ffw_")


def self_attention(p, x, mask, pair_logits, single_cond, name=""):
    bias = (1e9 * (mask - 1.0))[..., None, None, :]
    x = adaptive_layernorm(p, x, single_cond, name)
    q = linear(p, f"{name}q_projection", x)
    k = linear(p, f"{name}k_projection", x)
    key_dim = q.shape[-1]
    logits = np.einsum("...qhc,...khc->...hqk", q * key_dim ** (-0.5), k) + bias
    if pair_logits is not None:
        logits = logits + pair_logits
    weights = softmax(logits)
    v = linear(p, f"{name}v_projection", x)
    weighted_avg = np.einsum("...hqk,...khc->...qhc", weights, v)
    weighted_avg = weighted_avg.reshape(weighted_avg.shape[:-2] + (-1,))
    weighted_avg = weighted_avg * sigmoid(linear(p, f"{name}gating_query", x))
    return adaptive_zero_init(p, weighted_avg, single_cond, name)


def transformer(p, act, mask, single_cond, pair_cond, scope="transformer"):
    """diffusion_transformer.Transformer (unbatched)."""
    name = scope.split("/")[-1]
    stack = f"{scope}/__layer_stack_with_per_layer/"
    pair_act = layer_norm(pair_cond, p[f"{scope}/pair_input_layer_norm/scale"])
    projection = p[f"{stack}pair_logits_projection/weights"]  # (n_super, c_pair, blocks, heads)
    for i in range(projection.shape[0]):
        pair_logits = np.tensordot(pair_act, projection[i], axes=([-1], [0]))
        pair_logits = np.transpose(pair_logits, [2, 3, 0, 1])
        for j in range(projection.shape[2]):
            block = layer(layer(p, f"{stack}__layer_stack_with_per_layer/", i), "", j)
            act = act + self_attention(block, act, mask, pair_logits[j], single_cond, name)
            act = act + transition_block(block, act, single_cond, name)
    return act


def cross_attention(p, x_q, x_k, mask_q, mask_k, pair_logits, cond_q, cond_k, name, official_mask):
    if official_mask:
        bias = 1e9 * (mask_q - 1.0)[..., None, :, None] * (mask_k - 1.0)[..., None, None, :]
    else:
        bias = (1e9 * (mask_k - 1.0))[..., None, None, :]
    x_q = adaptive_layernorm(p, x_q, cond_q, f"{name}q")
    x_k = adaptive_layernorm(p, x_k, cond_k, f"{name}k")
    q = linear(p, f"{name}q_projection", x_q)
    k = linear(p, f"{name}k_projection", x_k)
    key_dim = q.shape[-1]
    logits = np.einsum("...qhc,...khc->...hqk", q * key_dim ** (-0.5), k) + bias + pair_logits
    weights = softmax(logits)
    v = linear(p, f"{name}v_projection", x_k)
    weighted_avg = np.einsum("...hqk,...khc->...qhc", weights, v)
    weighted_avg = weighted_avg.reshape(weighted_avg.shape[:-2] + (-1,))
    weighted_avg = weighted_avg * sigmoid(linear(p, f"{name}gating_query", x_q))
    return adaptive_zero_init(p, weighted_avg, cond_q, name)


def convert(gather, flat):
    """atom_layout.convert on an array already flattened over its layout axes: flat[idx] * mask."""
    idxs, mask = gather
    return flat[idxs] * mask.reshape(mask.shape + (1,) * (flat.ndim - 1))


def cross_att_transformer(p, scope, queries_act, queries_mask, queries_to_keys, keys_mask, q_cond, k_cond,
                          pair_cond, official_mask):
    name = scope.split("/")[-1]
    pair_act = layer_norm(pair_cond, p[f"{scope}/pair_input_layer_norm/scale"])
    pair_logits = linear(p, f"{scope}/pair_logits_projection", pair_act)  # (S, Q, K, blocks, heads)
    pair_logits = np.transpose(pair_logits, [3, 0, 4, 1, 2])
    for i in range(pair_logits.shape[0]):
        block = layer(p, f"{scope}/__layer_stack_with_per_layer/", i)
        keys_act = convert(queries_to_keys, queries_act.reshape(-1, queries_act.shape[-1]))
        queries_act = queries_act + cross_attention(
            block, queries_act, keys_act, queries_mask, keys_mask, pair_logits[i], q_cond, k_cond, name,
            official_mask,
        )
        queries_act = queries_act + transition_block(block, queries_act, q_cond, name)
    return queries_act


def atom_cross_att_gathers(num_valid, num_atoms_padded, queries=32, keys=128):
    """features.AtomCrossAtt.compute_features on a flat atom list (uids = atom index, '' = padding)."""
    uids = [str(i) for i in range(num_valid)] + [""] * (num_atoms_padded - num_valid)
    padded_flat_layout = np.array(uids, dtype=object)
    num_subsets = num_atoms_padded // queries
    queries_layout = padded_flat_layout.reshape(num_subsets, queries)
    subset_centers = np.arange(queries / 2, num_atoms_padded, queries)
    flat_to_key_gathers = (subset_centers[:, None] + np.arange(-keys / 2, keys / 2)[None, :]).astype(int)
    for row in range(flat_to_key_gathers.shape[0]):
        if flat_to_key_gathers[row, 0] < 0:
            flat_to_key_gathers[row, :] -= flat_to_key_gathers[row, 0]
        elif flat_to_key_gathers[row, -1] > num_valid - 1:
            overflow = flat_to_key_gathers[row, -1] - (num_valid - 1)
            flat_to_key_gathers[row, :] -= overflow
    keys_layout = padded_flat_layout[flat_to_key_gathers]
    source_uid_to_idx = {uid: idx for idx, uid in enumerate(queries_layout.ravel())}
    idxs = np.array([source_uid_to_idx.get(uid, 0) for uid in keys_layout.ravel()]).reshape(keys_layout.shape)
    mask = np.array([uid in source_uid_to_idx for uid in keys_layout.ravel()]).reshape(keys_layout.shape)
    return idxs, mask


def atom_encoder(p, name, f, token_atoms_act, trunk_single_cond, trunk_pair_cond, padded, official_mask,
                 num_tokens, token_atoms_uid=None):
    """atom_cross_att_encoder on a flat atom list (per-atom maths as on the dense layout)."""
    n_valid = int(f["atom_mask"].sum())

    def to_queries(arr):  # token_atoms -> queries: real atoms in order, zero padding
        out = np.zeros((padded,) + arr.shape[1:], dtype=arr.dtype)
        out[:n_valid] = arr[:n_valid]
        return out.reshape((padded // 32, 32) + arr.shape[1:])

    ref_pos = f["ref_pos"]
    ref_mask = f["ref_mask"].astype(np.float64)
    act = linear(p, f"{name}_embed_ref_pos", ref_pos)
    act += linear(p, f"{name}_embed_ref_mask", ref_mask[:, None])
    act += linear(p, f"{name}_embed_ref_element", np.eye(128)[f["ref_element"]])
    act += linear(p, f"{name}_embed_ref_charge", np.arcsinh(f["ref_charge"])[:, None])
    names = np.eye(64)[f["ref_atom_name_chars"]].reshape(len(ref_pos), -1)
    act += linear(p, f"{name}_embed_ref_atom_name", names)
    act *= ref_mask[:, None]

    queries_single_cond = to_queries(act)
    queries_mask = to_queries(f["atom_mask"].astype(np.float64))
    token_of_query = to_queries(f["atom_to_token"])
    if trunk_single_cond is not None:
        trunk = layer_norm(trunk_single_cond, p[f"{name}_lnorm_trunk_single_cond/scale"])
        trunk = linear(p, f"{name}_embed_trunk_single_cond", trunk)
        queries_single_cond = queries_single_cond + trunk[token_of_query] * queries_mask[..., None]

    if token_atoms_act is None:
        queries_act = queries_single_cond
    else:
        queries_act = linear(p, f"{name}_atom_positions_to_features", to_queries(token_atoms_act))
        queries_act = queries_act * queries_mask[..., None] + queries_single_cond

    queries_to_keys = atom_cross_att_gathers(n_valid, padded)
    keys_single_cond = convert(queries_to_keys, queries_single_cond.reshape(padded, -1))
    keys_mask = convert(queries_to_keys, queries_mask.reshape(padded))
    row_act = linear(p, f"{name}_single_to_pair_cond_row_1", np.maximum(queries_single_cond, 0))
    col_act = linear(p, f"{name}_single_to_pair_cond_col_1", np.maximum(keys_single_cond, 0))
    pair_act = row_act[:, :, None, :] + col_act[:, None, :, :]

    if trunk_pair_cond is not None:
        trunk_pair = layer_norm(trunk_pair_cond, p[f"{name}_lnorm_trunk_pair_cond/scale"])
        trunk_pair = linear(p, f"{name}_embed_trunk_pair_cond", trunk_pair)
        tokens_to_queries = (token_of_query, queries_mask > 0)
        tokens_to_keys = (convert(queries_to_keys, token_of_query.reshape(padded)), keys_mask > 0)
        gather_idxs = num_tokens * tokens_to_queries[0][:, :, None] + tokens_to_keys[0][:, None, :]
        gather_mask = tokens_to_queries[1][:, :, None] & tokens_to_keys[1][:, None, :]
        trunk_pair = trunk_pair.reshape(num_tokens * num_tokens, -1)
        pair_act = pair_act + convert((gather_idxs, gather_mask), trunk_pair)

    queries_ref_pos = to_queries(ref_pos * f["atom_mask"][:, None])
    queries_uid = to_queries(np.where(f["atom_mask"] > 0, f["ref_space_uid"], 0))
    keys_ref_pos = convert(queries_to_keys, queries_ref_pos.reshape(padded, 3))
    if token_atoms_uid is None:
        keys_uid = convert(queries_to_keys, queries_uid.reshape(padded))
    else:  # the released code (issue #730): token-atom layout read with queries->keys indices (jit clamps)
        dense = token_atoms_uid.reshape(-1)
        keys_uid = convert((np.minimum(queries_to_keys[0], len(dense) - 1), queries_to_keys[1]), dense)
    offsets_valid = queries_uid[:, :, None] == keys_uid[:, None, :]
    offsets = queries_ref_pos[:, :, None, :] - keys_ref_pos[:, None, :, :]
    pair_act += linear(p, f"{name}_embed_pair_offsets_1", offsets) * offsets_valid[..., None]
    sq_dists = np.sum(np.square(offsets), axis=-1)
    inv_sq = 1.0 / (1 + sq_dists[..., None])
    pair_act += linear(p, f"{name}_embed_pair_distances_1", inv_sq) * offsets_valid[..., None]
    pair_act += linear(p, f"{name}_embed_pair_offsets_valid", offsets_valid[..., None].astype(np.float64))
    pair_act2 = linear(p, f"{name}_pair_mlp_1", np.maximum(pair_act, 0))
    pair_act2 = linear(p, f"{name}_pair_mlp_2", np.maximum(pair_act2, 0))
    pair_act += linear(p, f"{name}_pair_mlp_3", np.maximum(pair_act2, 0))

    queries_act = cross_att_transformer(
        p, f"{name}_atom_transformer_encoder", queries_act, queries_mask, queries_to_keys, keys_mask,
        queries_single_cond, keys_single_cond, pair_act, official_mask,
    )
    queries_act *= queries_mask[..., None]
    skip_connection = queries_act
    per_atom = np.maximum(linear(p, f"{name}_project_atom_features_for_aggr", queries_act), 0)
    per_atom = per_atom.reshape(padded, -1)
    token_act = np.zeros((num_tokens, per_atom.shape[-1]))
    counts = np.zeros(num_tokens)
    for a in range(n_valid):
        token_act[f["atom_to_token"][a]] += per_atom[a]
        counts[f["atom_to_token"][a]] += 1
    token_act /= np.maximum(counts, 1e-10)[:, None]
    enc = dict(
        skip=skip_connection, queries_mask=queries_mask, q_cond=queries_single_cond, keys_mask=keys_mask,
        k_cond=keys_single_cond, pair=pair_act, queries_to_keys=queries_to_keys,
        token_of_query=token_of_query,
    )
    return token_act, enc


def atom_decoder(p, name, token_act, enc, n_atoms, official_mask):
    token_act = linear(p, f"{name}_project_token_features_for_broadcast", token_act)
    token_of_query = np.where(enc["queries_mask"] > 0, enc["token_of_query"], token_act.shape[0] - 1)
    queries_act = token_act[token_of_query]
    queries_act = (queries_act + enc["skip"]) * enc["queries_mask"][..., None]
    queries_act = cross_att_transformer(
        p, f"{name}_atom_transformer_decoder", queries_act, enc["queries_mask"], enc["queries_to_keys"],
        enc["keys_mask"], enc["q_cond"], enc["k_cond"], enc["pair"], official_mask,
    )
    queries_act *= enc["queries_mask"][..., None]
    queries_act = layer_norm(queries_act, p[f"{name}_atom_features_layer_norm/scale"])
    update = linear(p, f"{name}_atom_features_to_position_update", queries_act)
    return update.reshape(-1, 3)[:n_atoms]


def one_hot(index, n):
    return np.eye(n)[index]


def create_relative_encoding(tf, max_relative_idx=32, max_relative_chain=2):
    left, right = (lambda k: tf[k][:, None]), (lambda k: tf[k][None, :])
    offset = left("residue_index") - right("residue_index")
    clipped_offset = np.clip(offset + max_relative_idx, 0, 2 * max_relative_idx)
    asym_id_same = left("asym_id") == right("asym_id")
    final_offset = np.where(asym_id_same, clipped_offset, 2 * max_relative_idx + 1)
    rel_pos = one_hot(final_offset, 2 * max_relative_idx + 2)
    token_offset = left("token_index") - right("token_index")
    clipped_token_offset = np.clip(token_offset + max_relative_idx, 0, 2 * max_relative_idx)
    residue_same = asym_id_same & (left("residue_index") == right("residue_index"))
    final_token_offset = np.where(residue_same, clipped_token_offset, 2 * max_relative_idx + 1)
    rel_token = one_hot(final_token_offset, 2 * max_relative_idx + 2)
    entity_id_same = left("entity_id") == right("entity_id")
    rel_sym_id = left("sym_id") - right("sym_id")
    clipped_rel_chain = np.clip(rel_sym_id + max_relative_chain, 0, 2 * max_relative_chain)
    final_rel_chain = np.where(entity_id_same, clipped_rel_chain, 2 * max_relative_chain + 1)
    rel_chain = one_hot(final_rel_chain, 2 * max_relative_chain + 2)
    same_entity = entity_id_same[..., None].astype(np.float64)
    return np.concatenate([rel_pos, rel_token, same_entity, rel_chain], axis=-1)


def pair_conditioning(p, scope, z_trunk, tf):
    features_2d = np.concatenate([z_trunk, create_relative_encoding(tf)], axis=-1)
    pair_cond = layer_norm(features_2d, p[f"{scope}/pair_cond_initial_norm/scale"])
    pair_cond = linear(p, f"{scope}/pair_cond_initial_projection", pair_cond)
    for idx in range(2):
        pair_cond = pair_cond + transition_block(p, pair_cond, None, f"{scope}/pair_transition_{idx}")
    return pair_cond


def single_conditioning(p, scope, noise_level, s_trunk, s_inputs, fourier_weight, fourier_bias,
                        sigma_data=16.0):
    features_1d = np.concatenate([s_trunk, s_inputs], axis=-1)
    single_cond = layer_norm(features_1d, p[f"{scope}/single_cond_initial_norm/scale"])
    single_cond = linear(p, f"{scope}/single_cond_initial_projection", single_cond)
    x = (1 / 4) * np.log(noise_level / sigma_data)
    noise_embedding = np.cos(2 * np.pi * (x * fourier_weight + fourier_bias))
    noise_embedding = layer_norm(noise_embedding, p[f"{scope}/noise_embedding_initial_norm/scale"])
    single_cond = single_cond + linear(p, f"{scope}/noise_embedding_initial_projection", noise_embedding)
    for idx in range(2):
        single_cond = single_cond + transition_block(p, single_cond, None, f"{scope}/single_transition_{idx}")
    return single_cond


def diffusion_head(p, scope, positions_noisy, noise_level, f, s_trunk, s_inputs, z_trunk, fourier, padded,
                   official_mask, sigma_data=16.0, token_atoms_uid=None):
    """DiffusionHead.__call__ (one structure, one noise level)."""
    trunk_pair_cond = pair_conditioning(p, scope, z_trunk, f)
    trunk_single_cond = single_conditioning(p, scope, noise_level, s_trunk, s_inputs, *fourier, sigma_data)
    atom_mask = f["atom_mask"].astype(np.float64)
    act = positions_noisy * atom_mask[..., None] / np.sqrt(noise_level**2 + sigma_data**2)
    sub = {k[len(scope) + 1 :]: v for k, v in p.items() if k.startswith(f"{scope}/")}
    token_act, enc = atom_encoder(
        sub, "diffusion", f, act, s_trunk, trunk_pair_cond, padded, official_mask, len(s_trunk),
        token_atoms_uid,
    )
    single = layer_norm(trunk_single_cond, p[f"{scope}/single_cond_embedding_norm/scale"])
    act = token_act + linear(p, f"{scope}/single_cond_embedding_projection", single)
    mask = f.get("token_mask", np.ones(len(s_trunk)))
    act = transformer(p, act, mask, trunk_single_cond, trunk_pair_cond, f"{scope}/transformer")
    act = layer_norm(act, p[f"{scope}/output_norm/scale"])
    position_update = atom_decoder(sub, "diffusion", act, enc, len(atom_mask), official_mask)
    skip_scaling = sigma_data**2 / (noise_level**2 + sigma_data**2)
    out_scaling = noise_level * sigma_data / np.sqrt(noise_level**2 + sigma_data**2)
    return (skip_scaling * positions_noisy + out_scaling * position_update) * atom_mask[..., None]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Random non-zero values for every parameter.

    Weights N(0, scale^2 / fan_in), norm scales 1 + N(0, 0.3^2), everything else N(0, 0.5^2).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)
            if p.dim() == 2:
                p.copy_(noise * scale / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.5 * noise)
    return module


def numpy_params(module, prefix):
    return {k: v.astype(np.float64) for k, v in export_alphafold3_params(module, prefix).items()}


def max_err(out: torch.Tensor, ref: np.ndarray) -> float:
    assert tuple(out.shape) == ref.shape
    assert np.isfinite(ref).all()
    return float(np.abs(out.detach().numpy() - ref).max())


def toy_structure(num_tokens=5, atoms_per_token=(4, 3, 6, 1, 5), padded_slots=3, seed=0,
                  chains=(0, 0, 0, 1, 1)):
    """A small system: per-token atom counts, padded atom slots at the end, numpy features."""
    rng = np.random.default_rng(seed)
    per_token = [np.full(n, t) for t, n in enumerate(atoms_per_token)]
    atom_to_token = np.concatenate(per_token + [np.zeros(padded_slots, int)])
    a = len(atom_to_token)
    n_valid = a - padded_slots
    f = dict(
        ref_pos=rng.normal(size=(a, 3)) * 2.0,
        ref_mask=(rng.random(a) > 0.1).astype(np.float64),
        ref_element=rng.integers(0, 128, a),
        ref_charge=rng.integers(-2, 3, a).astype(np.float64),
        ref_atom_name_chars=rng.integers(0, 64, (a, 4)),
        ref_space_uid=np.array([atom_to_token[i] // 2 for i in range(a)]),
        atom_to_token=atom_to_token,
        atom_mask=(np.arange(a) < n_valid).astype(np.float64),
        token_index=np.arange(num_tokens),
        residue_index=np.array([0, 1, 1, 0, 5])[:num_tokens],
        asym_id=np.array(chains)[:num_tokens],
        entity_id=np.array([0, 0, 0, 0, 1])[:num_tokens],
        sym_id=np.array([0, 0, 0, 1, 0])[:num_tokens],
    )
    return f


def torch_features(f):
    return {k: torch.as_tensor(v) for k, v in f.items()}


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond_dim", [6, None])
def test_conditioned_transition_matches_reference(cond_dim):
    module = randomize_(ConditionedTransition(8, cond_dim, factor=2).to(F64))
    x = torch.randn(2, 3, 5, 8, dtype=F64)
    cond = None if cond_dim is None else torch.randn(2, 3, 5, cond_dim, dtype=F64)
    cond_np = None if cond is None else cond.numpy()
    ref = transition_block(numpy_params(module, "p_"), x.numpy(), cond_np, "p_")
    assert max_err(module(x, cond), ref) < TOL


@pytest.mark.parametrize("cond_dim", [6, None])
def test_attention_pair_bias_matches_reference(cond_dim):
    module = randomize_(AttentionPairBias(8, cond_dim, num_heads=2).to(F64))
    x = torch.randn(3, 7, 8, dtype=F64)
    cond = None if cond_dim is None else torch.randn(3, 7, cond_dim, dtype=F64)
    mask = torch.ones(3, 7, dtype=F64)
    mask[0, 5:] = 0
    mask[2, 0] = 0
    pair_logits = torch.randn(3, 2, 7, 7, dtype=F64)
    p = numpy_params(module, "p_")
    ref = np.stack([
        self_attention(
            p, x[b].numpy(), mask[b].numpy(), pair_logits[b].numpy(),
            None if cond is None else cond[b].numpy(), "p_",
        )
        for b in range(3)
    ])
    assert max_err(module(x, cond, mask, pair_logits), ref) < TOL


def test_diffusion_transformer_matches_reference():
    module = randomize_(DiffusionTransformer(8, 6, 4, num_blocks=4, num_heads=2, super_block_size=2).to(F64))
    x, cond = torch.randn(2, 6, 8, dtype=F64), torch.randn(2, 6, 6, dtype=F64)
    pair = torch.randn(2, 6, 6, 4, dtype=F64)
    mask = torch.ones(2, 6, dtype=F64)
    mask[1, -2:] = 0
    p = numpy_params(module, "diffusion_head/transformer")
    ref = np.stack([
        transformer(
            p, x[b].numpy(), mask[b].numpy(), cond[b].numpy(), pair[b].numpy(), "diffusion_head/transformer"
        )
        for b in range(2)
    ])
    assert max_err(module(x, cond, pair, mask), ref) < TOL


def test_relative_encoding_has_139_channels_and_matches_reference():
    f = toy_structure()
    rel = relative_encoding(torch_features(f))
    assert rel.shape == (5, 5, 139)
    np.testing.assert_array_equal(rel.numpy(), create_relative_encoding(f))


def test_diffusion_conditioning_matches_reference():
    # Conditioning widths (6, 3) differ from the trunk widths (8, 4), as the official config allows.
    module = DiffusionConditioning(c_single=8, c_pair=4, c_s_inputs=5, c_single_cond=6, c_pair_cond=3)
    module = randomize_(module.to(F64))
    f = toy_structure()
    s_trunk, s_inputs = torch.randn(5, 8, dtype=F64), torch.randn(5, 5, dtype=F64)
    z_trunk = torch.randn(5, 5, 4, dtype=F64)
    sigma = torch.tensor([0.3, 16.0, 400.0], dtype=F64)
    single, pair = module(sigma, s_trunk, s_inputs, z_trunk, torch_features(f))
    p = numpy_params(module, "diffusion_head")
    fourier = (module.fourier.weight.double().numpy(), module.fourier.bias.double().numpy())
    ref_single = np.stack([
        single_conditioning(p, "diffusion_head", s, s_trunk.numpy(), s_inputs.numpy(), *fourier)
        for s in sigma.numpy()
    ])
    assert single.shape == (3, 5, 6) and pair.shape == (5, 5, 3)
    assert max_err(single, ref_single) < TOL
    assert max_err(pair, pair_conditioning(p, "diffusion_head", z_trunk.numpy(), f)) < TOL


@pytest.mark.parametrize("num_valid", [5, 100, 128, 150, 300])
def test_key_windows_match_official_featurisation(num_valid):
    mask = (torch.arange(num_valid + 7) < num_valid).to(F64)[None]
    padded, index = key_windows(mask)
    assert padded % 32 == 0 and padded >= 128
    # The official gathers (any padding of at least 128 slots), translated to our padding.
    for official_padded in (padded, padded + 96):
        idxs, gmask = atom_cross_att_gathers(num_valid, official_padded)
        assert gmask.all()
        ours = np.where(idxs >= num_valid, padded - 1, idxs)[: padded // 32]
        np.testing.assert_array_equal(index[0].numpy(), ours)


def dense_token_atoms(f, num_tokens, slot=None, width=24):
    """The official (tokens, 24) layout of ``ref_space_uid`` (0 in empty slots).

    slot: each real atom's slot; None = its rank within its token (no gaps).
    """
    real = f["atom_mask"] > 0
    tokens = f["atom_to_token"][real]
    if slot is None:
        slot = np.array([int((tokens[:i] == t).sum()) for i, t in enumerate(tokens)])
    dense = np.zeros((num_tokens, width), int)
    dense[tokens, slot] = f["ref_space_uid"][real]
    return dense


@pytest.mark.parametrize(
    "with_trunk, uid_gather", [(True, "token_atoms"), (False, "token_atoms"), (True, "queries")]
)
def test_atom_encoder_matches_reference(with_trunk, uid_gather):
    f = toy_structure()
    c_trunk = (8, 4) if with_trunk else (None, None)
    # Attention key/value widths (6, 10) and transition factor 3 differ from the atom width 8.
    module = AtomAttentionEncoder(
        8, 4, 16, *c_trunk, num_blocks=2, num_heads=2, uid_gather=uid_gather, key_dim=6, value_dim=10,
        transition_factor=3,
    )
    randomize_(module.to(F64), seed=5)
    dense_uid = dense_token_atoms(f, 5) if uid_gather == "token_atoms" else None
    g = torch.Generator().manual_seed(8)
    s_trunk, pair = torch.randn(5, 8, generator=g, dtype=F64), torch.randn(5, 5, 4, generator=g, dtype=F64)
    positions = torch.randn(22, 3, generator=g, dtype=F64) if with_trunk else None
    inputs = (s_trunk, pair) if with_trunk else (None, None)
    enc = module(torch_features(f), positions, *inputs)
    ref, _ = atom_encoder(
        numpy_params(module, "diffusion"), "diffusion", f, None if positions is None else positions.numpy(),
        *(None if t is None else t.numpy() for t in inputs), 160, True, 5, dense_uid,
    )
    assert enc.token_act.shape == (5, 16)
    assert max_err(enc.token_act, ref) < TOL


def _diffusion_module_case(mask_mode, atoms_per_token, padded_slots, num_samples=2, seed=0,
                           uid_gather=None, gaps=False):
    """Our module (``uid_gather`` None: its default) against the reference (the official gather unless
    ``uid_gather='queries'``); ``gaps``: slots in the 24-wide layout skip one, as a missing atom does."""
    torch.manual_seed(seed)
    n = len(atoms_per_token)
    f = toy_structure(n, atoms_per_token, padded_slots, seed=seed, chains=(0,) * n)
    f["residue_index"], f["entity_id"], f["sym_id"] = np.arange(n), np.zeros(n, int), np.zeros(n, int)
    slot = None
    if gaps:
        slots = [np.arange(k) + (k < 20) for k in atoms_per_token]
        f["token_atom_slot"] = np.concatenate(slots + [np.zeros(padded_slots, int)])
        slot = f["token_atom_slot"][f["atom_mask"] > 0]
    token_atoms_uid = None if uid_gather == "queries" else dense_token_atoms(f, n, slot)
    kwargs = {} if uid_gather is None else dict(uid_gather=uid_gather)
    # Every width the official config sets apart from another is set apart here.
    module = DiffusionModule(
        c_token=16, c_single=8, c_pair=4, c_s_inputs=5, c_atom=8, c_atompair=4, num_blocks=2, num_heads=2,
        super_block_size=1, atom_blocks=2, atom_heads=2, mask_mode=mask_mode, **kwargs,
        c_single_cond=6, c_pair_cond=3, transition_factor=3, key_dim=12, value_dim=6,
        atom_transition_factor=1, atom_key_dim=6, atom_value_dim=10,
    )
    randomize_(module.to(F64), seed=seed)
    a = len(f["atom_mask"])
    x = torch.randn(num_samples, a, 3, dtype=F64) * 10
    sigma = torch.tensor([2.0, 30.0, 150.0][:num_samples], dtype=F64)
    s_trunk, s_inputs = torch.randn(n, 8, dtype=F64), torch.randn(n, 5, dtype=F64)
    z_trunk = torch.randn(n, n, 4, dtype=F64)
    out = module(x, sigma, features=torch_features(f), s_trunk=s_trunk, s_inputs=s_inputs, z_trunk=z_trunk)
    p = numpy_params(module, "diffuser/~/diffusion_head")
    fourier = module.conditioning.fourier
    fourier = (fourier.weight.double().numpy(), fourier.bias.double().numpy())
    padded = max(128, -(-a // 32) * 32) + 64  # the official pads to a bucket: use more padding than ours
    ref = np.stack([
        diffusion_head(
            p, "diffuser/~/diffusion_head", x[i].numpy(), float(sigma[i]), f, s_trunk.numpy(),
            s_inputs.numpy(), z_trunk.numpy(), fourier, padded, mask_mode == "official",
            token_atoms_uid=token_atoms_uid,
        )
        for i in range(num_samples)
    ])
    return out, ref, f


@pytest.mark.parametrize("mask_mode", ["official", "corrected"])
def test_diffusion_module_matches_reference_few_atoms(mask_mode):
    out, ref, f = _diffusion_module_case(mask_mode, atoms_per_token=(4, 3, 6, 1, 5), padded_slots=3)
    assert max_err(out, ref) < TOL
    assert (out[:, torch.as_tensor(f["atom_mask"] == 0)] == 0).all()


def test_diffusion_module_matches_reference_shifted_windows():
    # More than 128 real atoms: the edge windows shift inside the real atoms.
    atoms = (20, 18, 22, 15, 24, 19, 21, 17, 16, 10)
    out, ref, _ = _diffusion_module_case("official", atoms, padded_slots=5, num_samples=1)
    assert max_err(out, ref) < TOL


def test_official_mask_lets_real_atoms_see_padded_keys():
    out_official, _, f = _diffusion_module_case("official", (4, 3, 6, 1, 5), padded_slots=3)
    out_corrected, _, _ = _diffusion_module_case("corrected", (4, 3, 6, 1, 5), padded_slots=3)
    real = torch.as_tensor(f["atom_mask"] > 0)
    assert (out_official[:, real] - out_corrected[:, real]).abs().max() > 1e-6


def test_diffusion_module_reproduces_released_uid_gather_by_default():
    # 12 tokens, 150 real atoms with gaps in the 24-wide layout: the default is the official gather.
    atoms = (14, 12, 13, 11, 15, 12, 10, 14, 13, 12, 11, 13)
    out, ref, _ = _diffusion_module_case("official", atoms, 4, num_samples=1, gaps=True)
    assert max_err(out, ref) < TOL
    consistent, _, _ = _diffusion_module_case("official", atoms, 4, num_samples=1, uid_gather="queries",
                                              gaps=True)
    assert (out - consistent).abs().max() > 1e-6  # the two gathers do differ


def official_offsets_valid(f, num_tokens, slot, padded, released=True):
    """``offsets_valid`` of ``atom_cross_att_encoder`` on the official (tokens, 24) layout, (S, 32, 128).

    released: the keys' uid read from the token-atom layout with the queries->keys indices (every commit
    of atom_cross_attention.py; jit clamps the out-of-range gather); else token -> queries -> keys.
    """
    dense = dense_token_atoms(f, num_tokens, slot).astype(np.float64).reshape(-1)
    real = f["atom_mask"] > 0
    n_valid = int(real.sum())
    queries_uid = np.zeros(padded)  # token_atoms_to_queries: real atoms in layout order, 0 at padding
    queries_uid[:n_valid] = dense[f["atom_to_token"][real] * 24 + slot]
    idxs, mask = atom_cross_att_gathers(n_valid, padded)
    source = dense if released else queries_uid
    keys_uid = source[np.minimum(idxs, len(source) - 1)] * mask
    return queries_uid.reshape(-1, 32)[:, :, None] == keys_uid[:, None, :]


def _same_frame_flag(f, uid_gather=None):
    """Our encoder's same-frame flag, read off its pair features with every other term zeroed."""
    kwargs = {} if uid_gather is None else dict(uid_gather=uid_gather)
    module = AtomAttentionEncoder(8, 2, 16, None, None, num_blocks=1, num_heads=2, **kwargs).to(F64)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        module.embed_pair_offsets_valid.weight.fill_(1.0)
    return module(torch_features(f)).pair[0, ..., 0].detach().numpy()


def test_default_same_frame_flag_is_the_official_gather():
    # 12 tokens, 150 real atoms, gaps in the 24-wide layout: there the two gathers disagree.
    atoms = (14, 12, 13, 11, 15, 12, 10, 14, 13, 12, 11, 13)
    f = toy_structure(12, atoms, padded_slots=4, chains=(0,) * 12)
    f["token_atom_slot"] = np.concatenate([np.arange(k) + (k < 14) for k in atoms] + [np.zeros(4, int)])
    slot = f["token_atom_slot"][f["atom_mask"] > 0]
    official = official_offsets_valid(f, 12, slot, padded=160)
    consistent = official_offsets_valid(f, 12, slot, padded=160, released=False)
    assert (official != consistent).mean() > 0.05  # the layout does tell the two apart
    default = _same_frame_flag(f)
    assert default.shape == official.shape
    np.testing.assert_array_equal(default, official.astype(np.float64))
    np.testing.assert_array_equal(_same_frame_flag(f, "token_atoms"), default)
    queries = _same_frame_flag(f, "queries")
    np.testing.assert_array_equal(queries, consistent.astype(np.float64))
    assert (queries != official).any()
    # Without token_atom_slot the slots are the atoms' ranks within their tokens (no gaps).
    no_gaps = {k: v for k, v in f.items() if k != "token_atom_slot"}
    rank = np.concatenate([np.arange(k) for k in atoms])
    np.testing.assert_array_equal(_same_frame_flag(no_gaps), official_offsets_valid(f, 12, rank, 160))
