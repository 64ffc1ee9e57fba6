"""Rigid augmentation of coordinates: AlphaFold3 Algorithm 19 (CentreRandomAugmentation).

Matches ``diffusion_head.random_augmentation``: centre on the masked mean (``mask_mean`` with its
``max(sum(mask), 1e-6)`` denominator), rotate as row vectors ``x @ R``, translate by ``s_trans * N(0, I3)``,
zero the masked atoms. Differs on purpose in the rotation sampler: AF3 Gram-Schmidts two Gaussian
vectors; we take the QR of a Gaussian 3x3 with sign correction. Both are uniform (Haar) on SO(3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaln.checks import check_tensor
from adaln.diffusion._utils import GeneratorArg, check_generator, check_nonnegative, randn

MASK_EPS = 1e-6  # AF3 random_augmentation: mask_mean(..., eps=1e-6)


def random_rotation(
    n: int,
    generator: GeneratorArg = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``(n, 3, 3)`` rotations uniform on SO(3); a generator list gives rotation ``i`` from generator ``i``.

    QR of a Gaussian matrix with ``Q`` scaled by ``sign(diag(R))`` is Haar on O(3) (Mezzadri 2007);
    flipping the last column where ``det = -1`` maps it onto SO(3), keeping the measure uniform.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    generator = check_generator(generator, n)
    # QR in float64: cheap at 3x3 and orthonormal to the output dtype's precision after the cast.
    a = randn((n, 3, 3), generator, dtype=torch.float64, device=device)
    q, r = torch.linalg.qr(a)
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)
    q = q * signs[:, None, :]
    det = (torch.linalg.cross(q[..., 0], q[..., 1], dim=-1) * q[..., 2]).sum(-1)
    q[..., 2] = q[..., 2] * torch.where(det < 0, -1.0, 1.0)[:, None]
    return q.to(dtype)


def check_atom_mask(mask: Tensor, x: Tensor) -> Tensor:
    """Atom mask ``(*atoms)`` or ``(B, *atoms)`` for ``x`` ``(B, *atoms, 3)``, as a float ``(B, *atoms)``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    atoms = tuple(x.shape[1:-1])
    if tuple(mask.shape) == atoms:
        mask = mask.expand(x.shape[0], *atoms)
    elif tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"mask must have shape {atoms} or {tuple(x.shape[:-1])} for x of shape {tuple(x.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    return mask.to(device=x.device, dtype=x.dtype)


def centre_random_augmentation(
    x: Tensor, mask: Tensor | None = None, s_trans: float = 1.0, generator: GeneratorArg = None
) -> Tensor:
    """AF3 Algorithm 19 on ``x`` ``(B, *atoms, 3)``: centre, random rotation, ``s_trans * N(0, I)`` shift.

    ``mask`` ``(*atoms)`` or ``(B, *atoms)`` selects the atoms that define the centre; masked atoms come
    back as 0. Per sample draws: 9 normals (rotation), then 3 (translation).
    """
    check_tensor(x, "x", min_dim=3)
    if x.shape[-1] != 3:
        raise ValueError(f"x must be (B, *atoms, 3) coordinates, got shape {tuple(x.shape)}")
    check_nonnegative(s_trans, "s_trans")
    b = x.shape[0]
    generator = check_generator(generator, b)
    atom_dims = tuple(range(1, x.dim() - 1))
    if mask is None:
        centre = x.mean(dim=atom_dims, keepdim=True)
    else:
        m = check_atom_mask(mask, x)[..., None]
        count = m.sum(dim=atom_dims, keepdim=True).clamp_min(MASK_EPS)
        centre = (m * x).sum(dim=atom_dims, keepdim=True) / count
    rot = random_rotation(b, generator, dtype=x.dtype, device=x.device)
    shift = s_trans * randn((b, 3), generator, dtype=x.dtype, device=x.device)
    view = (b, *([1] * len(atom_dims)))
    # x @ R as an explicit 3-term sum: elementwise, so each sample's result is independent of the batch.
    rotated = ((x - centre)[..., :, None] * rot.view(*view, 3, 3)).sum(-2)
    out = rotated + shift.view(*view, 3)
    return out if mask is None else out * m
