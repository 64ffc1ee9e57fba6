"""The conformer denoiser: AlphaFold3's atom-level diffusion network on the heavy atoms of a molecule.

Follows AF3 (Abramson et al. 2024, supplement) with atoms where AF3 has tokens: the diffusion module's
layout (Algorithm 20: condition, transformer, ``Linear(LN(a))`` output, zero-initialised as AF3's
final_init), the pair MLP of the atom attention encoder (Algorithm 5 lines 13-14), the diffusion
conditioning (Algorithm 21) with its Fourier noise embedding (Algorithm 22), and the diffusion
transformer with pair-biased attention and conditioned transitions (Algorithms 23-25).

Ours, not AF3's: the Gaussian RBFs of the noisy pairwise distances in the pair representation (AF3 feeds
reference-conformer offsets there, which a conformer generator does not have), and two output heads,
``EquivariantHead`` (EGNN-style, rotation-equivariant for any weights) and ``ChiralityHead`` (moves
stereocentres towards their reference parity); each can be switched off for the plain AF3 form.

Inputs are features such as ``adaln.data.ccd`` makes: ``atom_feats`` (B, N, atom_dim) whose last channel
is the stereocentre parity (+1 / -1, 0 elsewhere), and ``pair_codes`` (B, N, N, 4) int64 categories of
``pair_code_sizes`` whose last group is the neighbour rank around a stereocentre (0: none, 1-3). The task
passes the widths (``ATOM_FEATURES_DIM``, ``PAIR_CODE_SIZES``), so this layer imports no data code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.models.af3 import AF3LayerNorm, ConditionedTransition, DiffusionTransformer, af3_linear
from adaln.nn import FourierEmbedding

RBF_MAX = 3.0  # distances of c_in x: about 0.55 for a bond at low noise, ~1.4 between random atoms at high


class PairEmbedder(nn.Module):
    """Pair representation ``z`` (B, N, N, c_pair) from the graph, the atoms and the noisy distances.

    ``z = sum_g Embed_g(pair_codes_g)`` (equal to a Linear on the one-hot ``pair_features``)
    ``+ Linear(RBF(|x_i - x_j|)) + Linear(relu c_i) + Linear(relu c_j)``, then ``z += MLP(z)`` (AF3
    Algorithm 5 lines 13-14). The distance term is ours: AF3 feeds reference-conformer offsets here,
    which a conformer generator does not have.
    """

    def __init__(self, c_atom: int, c_pair: int, distance_rbf: int, code_sizes: tuple[int, ...]):
        super().__init__()
        self.embed = nn.ModuleList(nn.Embedding(k, c_pair) for k in code_sizes)
        for emb in self.embed:
            # std 1/sqrt(groups): the sum over the groups starts with unit variance, like a fan-in init.
            nn.init.normal_(emb.weight, std=len(code_sizes) ** -0.5)
        self.distance_rbf = distance_rbf
        if distance_rbf:
            self.register_buffer("rbf_centres", torch.linspace(0.0, RBF_MAX, distance_rbf), persistent=False)
            self.distance = af3_linear(distance_rbf, c_pair)
        self.row = af3_linear(c_atom, c_pair, init="relu")
        self.col = af3_linear(c_atom, c_pair, init="relu")
        self.mlp = nn.Sequential(
            nn.ReLU(), af3_linear(c_pair, c_pair, init="relu"), nn.ReLU(),
            af3_linear(c_pair, c_pair, init="relu"), nn.ReLU(), af3_linear(c_pair, c_pair, init="zeros"),
        )

    def code_embedding(self, pair_codes: Tensor) -> Tensor:
        """(B, N, N, 4) int64 codes -> (B, N, N, c_pair)."""
        return sum(emb(pair_codes[..., g]) for g, emb in enumerate(self.embed))

    def rbf(self, x: Tensor) -> Tensor:
        """(B, N, N, distance_rbf) Gaussian RBFs of the pairwise distances of x (B, N, 3)."""
        d = torch.cdist(x, x)
        width = RBF_MAX / (self.distance_rbf - 1)
        return torch.exp(-(((d[..., None] - self.rbf_centres.to(x.dtype)) / width) ** 2))

    def forward(self, pair_codes: Tensor, c: Tensor, x: Tensor) -> Tensor:
        z = self.code_embedding(pair_codes).to(c.dtype)
        z = z + self.row(F.relu(c))[:, :, None] + self.col(F.relu(c))[:, None, :]
        if self.distance_rbf:
            z = z + self.distance(self.rbf(x))
        return z + self.mlp(z)


class NoiseConditioning(nn.Module):
    """Single conditioning (AF3 Algorithm 21): ``s = LN(c) + Linear(LN(Fourier(1/4 ln(sigma /
    sigma_data))))``, then ``s += ConditionedTransition(s)`` per transition."""

    def __init__(self, c_atom: int, transitions: int):
        super().__init__()
        self.fourier = FourierEmbedding()
        self.noise_norm = AF3LayerNorm(self.fourier.dim)
        self.noise_proj = af3_linear(self.fourier.dim, c_atom)
        self.single_norm = AF3LayerNorm(c_atom)
        self.transitions = nn.ModuleList(ConditionedTransition(c_atom, None) for _ in range(transitions))

    def forward(self, c: Tensor, noise_level: Tensor) -> Tensor:
        noise = self.fourier(0.25 * torch.log(noise_level.to(c.dtype)))
        s = self.single_norm(c) + self.noise_proj(self.noise_norm(noise))[:, None, :]
        for transition in self.transitions:
            s = s + transition(s)
        return s


class EquivariantHead(nn.Module):
    """``dx_i = sum_j w_ij (x_i - x_j) / N`` with ``w_ij = Linear(silu(Linear(z_ij) + Linear(a_i) +
    Linear(a_j)))`` (zero init): rotation-equivariant whatever the weights, as in EGNN."""

    def __init__(self, c_atom: int, c_pair: int):
        super().__init__()
        self.pair = af3_linear(c_pair, c_pair, bias=True)
        self.row = af3_linear(c_atom, c_pair)
        self.col = af3_linear(c_atom, c_pair)
        self.weight = af3_linear(c_pair, 1, init="zeros")

    def forward(self, a: Tensor, z: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        h = self.pair(z) + self.row(a)[:, :, None] + self.col(a)[:, None, :]
        w = self.weight(F.silu(h))[..., 0] * mask[:, None, :]  # (B, N, N); padded j contribute nothing
        dx = (w[..., None] * (x[:, :, None] - x[:, None, :])).sum(2)
        return dx / mask.sum(1).clamp_min(1)[:, None, None]


class ChiralityHead(nn.Module):
    """``dx_c = Linear(a_c) * chirality_direction(x)`` at stereocentres (zero init)."""

    def __init__(self, c_atom: int):
        super().__init__()
        self.step = af3_linear(c_atom, 1, init="zeros")

    @staticmethod
    def chirality_direction(x: Tensor, atom_feats: Tensor, pair_codes: Tensor) -> Tensor:
        """(B, N, 3): ``-parity * u / |u|`` at stereocentres, ``u = (n2 - n1) x (n3 - n1)``; 0 elsewhere.

        The signed volume ``det[n1 - c, n2 - c, n3 - c]`` is affine in the centre ``c`` with gradient
        ``-u``, so moving ``c`` along this direction drives its sign towards the reference parity. ``u``
        is a pseudovector: unlike the other output terms, this one is not mirror-symmetric.
        """
        rank = F.one_hot(pair_codes[..., 3], 4)[..., 1:].to(x.dtype)  # (B, N, N, 3): j is neighbour k of i
        n1, n2, n3 = torch.einsum("bijk,bjc->bikc", rank, x).unbind(-2)
        u = torch.linalg.cross(n2 - n1, n3 - n1, dim=-1)
        parity = atom_feats[..., -1:].to(x.dtype)  # the last atom channel
        return -parity * u / (u.norm(dim=-1, keepdim=True) + 1e-6)

    def forward(self, a: Tensor, x: Tensor, atom_feats: Tensor, pair_codes: Tensor) -> Tensor:
        return self.step(a) * self.chirality_direction(x, atom_feats, pair_codes)


class ConformerDenoiser(nn.Module):
    """AF3-style atom diffusion network ``F(c_in x, sigma / sigma_data | graph) -> (B, N, 3)``.

    AF3's atom path (Algorithms 5, 20-23) on atoms instead of tokens::

        c = Linear(atom_feats)                          atom conditioning
        z = PairEmbedder(pair_codes, c, x)              pair bias source
        s = NoiseConditioning(c, sigma / sigma_data)    AdaLN condition
        a = DiffusionTransformer(c + Linear(x), s, z, mask)
        F = Linear(LN(a)) + EquivariantHead + ChiralityHead, masked

    The AF3 output Linear is zero-initialised (AF3 final_init). Ours, not AF3's: the distance RBFs in
    ``z`` and the two heads; the equivariant head makes local geometry learnable from far fewer steps,
    the chirality head lets the parity features act (a mirror-symmetric update cannot). Switch each off
    for the plain AF3 form. x: (B, N, 3); noise_level: (B,); atom_feats: (B, N, atom_dim);
    pair_codes: (B, N, N, 4) int64; atom_mask: (B, N).
    """

    def __init__(
        self,
        c_atom: int = 128,
        c_pair: int = 16,
        num_blocks: int = 4,
        num_heads: int = 4,
        super_block_size: int = 2,
        single_transitions: int = 2,
        distance_rbf: int = 16,
        equivariant_head: bool = True,
        chirality_head: bool = True,
        *,
        atom_dim: int,
        pair_code_sizes: tuple[int, ...],
    ):
        super().__init__()
        self.atom_dim = atom_dim
        self.atom_embed = af3_linear(atom_dim, c_atom, bias=True)
        self.pair = PairEmbedder(c_atom, c_pair, distance_rbf, tuple(pair_code_sizes))
        self.single = NoiseConditioning(c_atom, single_transitions)
        self.position_embed = af3_linear(3, c_atom)
        self.transformer = DiffusionTransformer(c_atom, c_atom, c_pair, num_blocks, num_heads, super_block_size)
        self.output_norm = AF3LayerNorm(c_atom)
        self.output = af3_linear(c_atom, 3, init="zeros")
        self.equivariant_head = EquivariantHead(c_atom, c_pair) if equivariant_head else None
        self.chirality_head = ChiralityHead(c_atom) if chirality_head else None

    def forward(
        self, x: Tensor, noise_level: Tensor, *, atom_feats: Tensor, pair_codes: Tensor, atom_mask: Tensor
    ) -> Tensor:
        _check_inputs(x, noise_level, atom_feats, pair_codes, atom_mask, self.atom_dim)
        mask = atom_mask.to(x.dtype)
        c = self.atom_embed(atom_feats.to(x.dtype))
        z = self.pair(pair_codes, c, x)
        s = self.single(c, noise_level)
        a = self.output_norm(self.transformer(c + self.position_embed(x), s, z, mask))
        out = self.output(a)
        if self.equivariant_head is not None:
            out = out + self.equivariant_head(a, z, x, mask)
        if self.chirality_head is not None:
            out = out + self.chirality_head(a, x, atom_feats, pair_codes)
        return out * mask[..., None]


def _check_inputs(
    x: Tensor, noise_level: Tensor, atom_feats: Tensor, pair_codes: Tensor, atom_mask: Tensor, atom_dim: int
) -> None:
    for name, t in (("x", x), ("noise_level", noise_level), ("atom_feats", atom_feats),
                    ("pair_codes", pair_codes), ("atom_mask", atom_mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"x must be (B, N, 3), got {tuple(x.shape)}")
    b, n = x.shape[:2]
    expected = {
        "noise_level": ((b,), noise_level), "atom_feats": ((b, n, atom_dim), atom_feats),
        "pair_codes": ((b, n, n, 4), pair_codes), "atom_mask": ((b, n), atom_mask),
    }
    for name, (shape, t) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if pair_codes.dtype != torch.int64:
        raise TypeError(f"pair_codes must be int64 categories (adaln.data.ccd.pair_codes), got {pair_codes.dtype}")
