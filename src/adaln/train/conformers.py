"""The 3-D job: AlphaFold3-style diffusion generating heavy-atom conformers of CCD molecules.

Pieces: ``ConformerDenoiser`` (AF3 atom-level network built from ``DiffusionTransformer``), wrapped in
``EDMPrecond`` with ``noise_input="af3"``; trained with ``denoising_loss`` on centred, randomly rotated
and translated ideal conformers (``centre_random_augmentation``, AF3 Algorithm 19) at AF3's training noise
levels ``sigma_data * exp(-1.2 + 1.5 N(0, 1))``; sampled with ``sample_af3`` (augmentation on, padding
masked). ``sigma_data`` is measured from the training molecules (per-coordinate RMS of centred
coordinates, 2.76 A for the full train split) unless the config fixes it.

Randomness is stateless per step as in ``adaln.train.loop``: the data order of epoch ``e`` is seeded by
``(seed, e)``, each step's rotations, sigmas and noise by ``(seed, step)``, so a resumed run draws what an
uninterrupted one draws.

Run directory: ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``loss.png``; ``evaluate_conformers``
adds ``eval.json`` and ``eval.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adaln.data.ccd import (
    ConformerBatch,
    Molecule,
    collate_molecules,
    signed_volume,
    coordinate_rms,
    load_ccd,
    load_component,
)
from adaln.diffusion import (
    EDMPrecond,
    centre_random_augmentation,
    denoising_loss,
    loss_weight,
    sample_af3,
    sample_training_sigmas,
)
from adaln.models.conformer import (  # noqa: F401 (the model classes stay importable from here)
    RBF_MAX,
    ChiralityHead,
    ConformerDenoiser,
    EquivariantHead,
    NoiseConditioning,
    PairEmbedder,
)
from adaln.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from adaln.train.config import ConfigError
from adaln.train.ema import EMA
from adaln.train.loop import optimizer_step, plot_loss_curve, require_finite, resume_or_start
from adaln.train.loop import resolve_device as resolve_training_device


class ConformerConfigError(ConfigError):
    """A conformer configuration or run directory that cannot be used."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class ConformerModelConfig:
    c_atom: int = 128  # atom (token) and single-conditioning width
    c_pair: int = 16
    num_blocks: int = 4
    num_heads: int = 4
    super_block_size: int = 2
    single_transitions: int = 2  # AF3 DiffusionConditioning applies two
    distance_rbf: int = 16  # Gaussian RBFs of the noisy pairwise distances added to the pair (0: off)
    equivariant_head: bool = True  # add sum_j w_ij (x_i - x_j) to the AF3 output (see ConformerDenoiser)
    chirality_head: bool = True  # move stereocentres along their neighbours' plane normal (ditto)


@dataclass
class ConformerSampleConfig:
    steps: int = 100  # AF3 uses 200; 100 measured as good on validation molecules
    gamma_0: float = 0.8  # AF3 sampler defaults
    gamma_min: float = 1.0
    noise_scale: float = 1.003
    step_scale: float = 1.5  # the preset uses 3.0, chosen on validation molecules
    s_max: float = 160.0  # first noise level / sigma_data (AF3: 160)
    batch_size: int = 64  # conformers per denoiser call
    # Reflect a sample whose stereocentres mostly have the wrong handedness (see fix_mirror_images).
    fix_mirror: bool = True


@dataclass
class ConformerConfig:
    task: str = "conformers"
    name: str = "ccd-conformers"
    model: ConformerModelConfig = field(default_factory=ConformerModelConfig)
    sample: ConformerSampleConfig = field(default_factory=ConformerSampleConfig)
    train_limit: int | None = None  # first N training molecules in hash order (None: all)
    eval_limit: int | None = 200  # first N test molecules in hash order for evaluate_conformers
    eval_k: int = 5
    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    lr_final_fraction: float = 0.1  # cosine decay from lr to lr * this after warmup
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    sigma_data: float | None = None  # None: measured from the training molecules
    s_trans: float = 1.0  # translation of the training augmentation (AF3: 1 A)
    bond_loss_weight: float = 0.3  # AF3's L_bond (alpha_bond) on bonded pairs, see distance_loss
    angle_loss_weight: float = 0.3  # the same loss on 1-3 pairs (atoms two bonds apart): bond angles
    checkpoint_every: int = 1000
    keep_last: int = 2
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    # torch CPU threads set for training / sampling on CPU (None: leave torch's setting). 1 by default:
    # these tensors are small, and with more threads OpenMP's spin-waiting made steps up to 100x slower
    # whenever another process used the cores.
    threads: int | None = 1
    cache_dir: str | None = None  # CCD cache (None: $ADALN_CACHE or ~/.cache/adaln)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def conformer_config_from_dict(d: dict[str, Any]) -> ConformerConfig:
    """A ``ConformerConfig`` from a dict (a preset's YAML or a checkpoint's saved config); unknown keys
    raise ``ConformerConfigError``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ConformerConfig), d))
    except OmegaConfBaseException as e:
        raise ConformerConfigError(f"invalid conformer config: {str(e).splitlines()[0]}") from None


def _read_source(source: str) -> dict[str, Any] | None:
    """The YAML mapping of a preset name or a .yaml path; None when ``source`` is neither."""
    from importlib import resources

    import yaml

    if source.endswith((".yaml", ".yml")):
        path = Path(source)
        if not path.is_file():
            return None
        text = path.read_text()
    else:
        ref = resources.files("adaln.presets").joinpath(f"{source}.yaml")
        if not ref.is_file():
            return None
        text = ref.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # the caller's own loader reports the syntax error
    return data if isinstance(data, dict) else None


def is_conformer_config(source: str | None) -> bool:
    """Whether a preset name or YAML file configures the conformer job (``task: conformers``)."""
    data = _read_source(source) if source else None
    return data is not None and data.get("task") == "conformers"


def load_conformer_config(
    source: str = "ccd-conformers", overrides: dict[str, Any] | None = None
) -> ConformerConfig:
    """A ``ConformerConfig`` from a preset name (``src/adaln/presets/{name}.yaml``) or a YAML path, then
    top-level ``overrides`` whose value is not None (e.g. the CLI's ``steps``, ``seed``)."""
    data = _read_source(source)
    if data is None:
        raise ConformerConfigError(f"no conformer preset or YAML file {source!r}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return conformer_config_from_dict(data)


def is_conformer_run(path: str | Path) -> bool:
    """Whether a run or checkpoint directory holds a conformer model (its saved config has
    ``task: conformers``)."""
    path = Path(path)
    ckpts = [path] if (path / "state.json").is_file() else list_checkpoints(path) if path.is_dir() else []
    if not ckpts:
        return False
    config = json.loads((ckpts[-1] / "state.json").read_text()).get("config")
    return isinstance(config, dict) and config.get("task") == "conformers"


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def build_model(cfg: ConformerConfig) -> ConformerDenoiser:
    m = cfg.model
    return ConformerDenoiser(
        m.c_atom, m.c_pair, m.num_blocks, m.num_heads, m.super_block_size, m.single_transitions, m.distance_rbf,
        m.equivariant_head, m.chirality_head,
    )


def batch_cond(batch: ConformerBatch) -> dict[str, Tensor]:
    """The denoiser keywords of a batch."""
    return {"atom_feats": batch.atom_feats, "pair_codes": batch.pair_codes, "atom_mask": batch.mask}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class _KeepOutput:
    """A denoiser that remembers its last output, so a second loss can use the same forward pass."""

    def __init__(self, denoiser: nn.Module):
        self.denoiser, self.output = denoiser, None

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        self.output = self.denoiser(x, sigma, **cond)
        return self.output


def local_pairs(mols: list[Molecule], distance: int, device: torch.device) -> Tensor:
    """(E, 3) rows (sample, i, j), i < j, of every pair ``distance`` bonds apart in a batch of ``mols``."""
    rows = [np.column_stack([np.full(len(ij), k), ij])
            for k, m in enumerate(mols) for ij in [np.argwhere(np.triu(m.topo == distance, 1))]]
    return torch.from_numpy(np.concatenate(rows)).to(device)


def distance_loss(denoised: Tensor, x0: Tensor, pairs: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """AF3's L_bond (supplement eq. 5) over ``pairs``: per sample the mean of
    ``(|x^_i - x^_j| - |x_i - x_j|)^2``, weighted by the MSE's ``loss_weight(sigma)`` (AF3 puts both under
    one weight), then the batch mean. A sample without pairs contributes 0.

    denoised, x0: (B, N, 3); pairs: (E, 3) rows (sample, i, j) from ``local_pairs``; sigma: (B,).
    """
    b, i, j = pairs.unbind(-1)
    err = ((denoised[b, i] - denoised[b, j]).norm(dim=-1) - (x0[b, i] - x0[b, j]).norm(dim=-1)) ** 2
    per_sample = torch.zeros(len(x0), dtype=err.dtype, device=err.device).index_add_(0, b, err)
    count = torch.bincount(b, minlength=len(x0)).clamp_min(1)
    return (loss_weight(sigma.to(err.dtype), sigma_data) * per_sample / count).mean()


def resolve_device(name: str, threads: int | None = None) -> torch.device:
    """The torch device for ``name`` (auto, cpu, cuda[:N]); on CPU, applies ``threads`` if given."""
    device = resolve_training_device(name)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    return device


def _seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


BUCKET_BATCHES = 50  # batches per size bucket: sorting within 50 batches cuts padding ~2x


def epoch_batches(sizes: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded permutation cut into chunks of ``BUCKET_BATCHES`` batches,
    each chunk sorted by molecule size and cut into batches (similar sizes pad little), then the
    batches shuffled; the last partial batch is dropped."""
    n = len(sizes)
    if n < batch_size:
        raise ConformerConfigError(f"batch_size {batch_size} exceeds the {n} training molecules")
    g = torch.Generator().manual_seed(_seed(seed, "epoch", epoch))
    perm = torch.randperm(n, generator=g).numpy()[: n - n % batch_size]
    batches = []
    for start in range(0, len(perm), BUCKET_BATCHES * batch_size):
        chunk = perm[start : start + BUCKET_BATCHES * batch_size]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


class BatchSchedule:
    """Molecule indices of any step: ``epoch_batches`` of ``step // batches_per_epoch`` (cached)."""

    def __init__(self, sizes: np.ndarray, batch_size: int, seed: int):
        self.sizes, self.batch_size, self.seed = np.asarray(sizes), batch_size, seed
        self.per_epoch = len(sizes) // batch_size
        self._epoch, self._batches = -1, []

    def __call__(self, step: int) -> list[int]:
        epoch, i = divmod(step, max(self.per_epoch, 1))
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.sizes, self.batch_size, self.seed, epoch)
        return self._batches[i]


def learning_rate(cfg: ConformerConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``lr * lr_final_fraction`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    low = cfg.lr * cfg.lr_final_fraction
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@dataclass
class ConformerTrainResult:
    run_dir: Path
    step: int
    final_loss: float
    seconds: float
    sigma_data: float


def train_conformers(
    cfg: ConformerConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    molecules: list[Molecule] | None = None,
) -> ConformerTrainResult:
    """Train ``cfg`` into ``run_dir`` (checkpoints, metrics.jsonl, loss.png, config.json).

    ``molecules`` replaces the CCD train split (e.g. a handful for a test); by default the first
    ``cfg.train_limit`` training molecules are used.
    """
    from tqdm.auto import tqdm

    if not isinstance(cfg, ConformerConfig):
        raise TypeError(f"cfg must be a ConformerConfig, got {type(cfg).__name__}")
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device, cfg.threads)
    mols = molecules or load_ccd("train", limit=cfg.train_limit, cache=cfg.cache_dir, progress=progress)
    sigma_data = cfg.sigma_data or round(coordinate_rms(mols), 4)
    cfg = conformer_config_from_dict({**cfg.to_dict(), "sigma_data": sigma_data})
    torch.manual_seed(cfg.seed)  # initial weights depend on the seed only
    model = build_model(cfg).to(device)
    denoiser = EDMPrecond(model, sigma_data, noise_input="af3")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)

    start = resume_or_start(run_dir, resume, model=model, optimizer=optimizer, ema=ema)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    metrics = open(run_dir / "metrics.jsonl", "a" if start else "w")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    t0 = last_t = time.perf_counter()
    loss_value = float("nan")
    model.train()
    schedule = BatchSchedule(np.array([m.num_atoms for m in mols]), cfg.batch_size, cfg.seed)
    for step in bar:
        indices = schedule(step)
        batch = collate_molecules([mols[i] for i in indices])
        batch = batch.to(device)
        gen = torch.Generator().manual_seed(_seed(cfg.seed, "step", step))
        x0 = centre_random_augmentation(batch.coords, batch.mask, cfg.s_trans, gen)
        sigma = sample_training_sigmas(len(x0), "af3", sigma_data=sigma_data, generator=gen, device=device)
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        keep = _KeepOutput(denoiser)
        loss = denoising_loss(
            keep, x0, sigma, sigma_data=sigma_data, mask=batch.mask, generator=gen, **batch_cond(batch)
        )
        for distance, weight in ((1, cfg.bond_loss_weight), (2, cfg.angle_loss_weight)):
            if weight:
                pairs = local_pairs([mols[i] for i in indices], distance, device)
                loss = loss + weight * distance_loss(keep.output, x0, pairs, sigma, sigma_data)
        grad_norm = optimizer_step(loss, model, optimizer, ema, cfg.grad_clip)
        loss_value = require_finite(loss.item(), step)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            row = dict(step=done, loss=loss_value, lr=lr, grad_norm=float(grad_norm),
                       seconds=round(now - t0, 2), steps_per_s=cfg.log_every / max(now - last_t, 1e-9))
            last_t = now
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(run_dir, done, model=model, optimizer=optimizer, ema=ema, config=cfg.to_dict(),
                            extra={"loss": loss_value, "sigma_data": sigma_data}, keep_last=cfg.keep_last)
    metrics.close()
    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return ConformerTrainResult(run_dir, max(start, cfg.steps), loss_value, time.perf_counter() - t0, sigma_data)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@dataclass
class ConformerRun:
    """A trained run ready to sample: the EDM denoiser (EMA weights by default), config and step."""

    denoiser: EDMPrecond
    cfg: ConformerConfig
    step: int
    device: torch.device


def load_conformer_run(
    run_dir: str | Path, *, device: str = "auto", use_ema: bool = True, sample: dict[str, Any] | None = None
) -> ConformerRun:
    """The newest checkpoint of ``run_dir`` (or a checkpoint directory) as a sampler-ready run; ``sample``
    overrides fields of the saved ``ConformerSampleConfig`` (e.g. ``{"steps": 200, "step_scale": 2.0}``;
    None values are ignored)."""
    path = Path(run_dir)
    ckpts = list_checkpoints(path)
    if not ckpts and (path / "state.json").is_file():
        ckpts = [path]
    if not ckpts:
        raise ConformerConfigError(f"no checkpoint found in {path}")
    state = json.loads((ckpts[-1] / "state.json").read_text())
    overrides = {k: v for k, v in (sample or {}).items() if v is not None}
    cfg = conformer_config_from_dict({**state["config"], "sample": {**state["config"]["sample"], **overrides}})
    dev = resolve_device(device, cfg.threads)
    model = build_model(cfg)
    ema = EMA(model, decay=cfg.ema_decay) if use_ema else None
    load_checkpoint(ckpts[-1], model=model, ema=ema, rng=False)
    if ema is not None:
        ema.copy_to(model)
    model = model.to(dev).eval().requires_grad_(False)
    return ConformerRun(EDMPrecond(model, cfg.sigma_data, noise_input="af3"), cfg, int(state["step"]), dev)


def generate_conformers(
    run: ConformerRun, mols: list[Molecule], n: int, *, seed: int = 0, progress: bool = False
) -> list[np.ndarray]:
    """``n`` conformers per molecule with ``sample_af3``: a list of (n, N_i, 3) float64 arrays.

    Conformers are batched by molecule size (``sample.batch_size`` per denoiser call); each batch has its
    own generator seeded by ``(seed, first molecule, batch size)``, so results depend only on ``mols``,
    ``n``, ``seed`` and the config.
    """
    from tqdm.auto import tqdm

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    s = run.cfg.sample
    jobs = sorted(((k, i) for k in range(len(mols)) for i in range(n)), key=lambda j: (mols[j[0]].num_atoms, j))
    out = [np.zeros((n, m.num_atoms, 3)) for m in mols]
    chunks = [jobs[i : i + s.batch_size] for i in range(0, len(jobs), s.batch_size)]
    for chunk in tqdm(chunks, desc="sample", disable=not progress):
        batch = collate_molecules([mols[k] for k, _ in chunk]).to(run.device)
        gen = torch.Generator().manual_seed(_seed(seed, mols[chunk[0][0]].comp_id, chunk[0][1], len(chunk)))
        x = sample_af3(
            run.denoiser, tuple(batch.coords.shape), steps=s.steps, sigma_data=run.cfg.sigma_data,
            gamma_0=s.gamma_0, gamma_min=s.gamma_min, noise_scale=s.noise_scale, step_scale=s.step_scale,
            s_max=s.s_max,
            mask=batch.mask, generator=gen, device=run.device, **batch_cond(batch),
        ).samples
        x = x.double().cpu().numpy()
        for row, (k, i) in enumerate(chunk):
            out[k][i] = x[row, : mols[k].num_atoms]
    return out


def fix_mirror_images(samples: list[np.ndarray], mols: list[Molecule]) -> tuple[list[np.ndarray], int]:
    """Reflect (x -> -x) each conformer in which fewer than half of the stereocentres have the
    reference parity (``Molecule.parity``); returns the conformers and how many were reflected.

    The network sees the parity features, but a short training run does not make it use them reliably;
    the reflection uses the same stereo information that RDKit's ETKDG is given as chiral tags.
    """
    out, flipped = [], 0
    for x, mol in zip(samples, mols):
        centres = mol.chiral_neighbours()
        x = x.copy()
        for conf in x:
            agree = sum(np.sign(signed_volume(conf, c, nb)) == mol.parity[c] for c, nb in centres.items())
            if 2 * agree < len(centres):
                conf *= -1.0
                flipped += 1
        out.append(x)
    return out, flipped


def _bond_types(mol: Molecule) -> np.ndarray:
    """biotite BondType codes: 1/2/3 Kekule single/double/triple, 5/6/7 the aromatic ones."""
    return np.where(mol.bond_aromatic, mol.bond_orders + 4, mol.bond_orders)


def write_mmcif(mol: Molecule, conformers: np.ndarray, out: str | Path) -> Path:
    """Write conformers (n, N, 3) as one mmCIF file with n models (``pdbx_PDB_model_num`` 1..n) and the
    component's bonds in ``chem_comp_bond``."""
    import biotite.structure as struc
    import biotite.structure.io.pdbx as pdbx

    x = np.asarray(conformers, dtype=np.float64)
    if x.ndim != 3 or x.shape[1:] != (mol.num_atoms, 3):
        raise ValueError(f"conformers must be (n, {mol.num_atoms}, 3) for {mol.comp_id}, got {x.shape}")
    stack = struc.AtomArrayStack(len(x), mol.num_atoms)
    stack.coord = x.astype(np.float32)
    stack.chain_id[:] = "A"
    stack.res_id[:] = 1
    stack.res_name[:] = mol.comp_id
    stack.hetero[:] = True
    stack.atom_name = np.array(mol.atom_names)
    stack.element = np.array(mol.element_symbols)
    stack.set_annotation("charge", mol.charges.astype(np.int32))
    stack.bonds = struc.BondList(mol.num_atoms, np.column_stack([mol.bonds, _bond_types(mol)]))
    cif = pdbx.CIFFile()
    pdbx.set_structure(cif, stack, data_block=mol.comp_id)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cif.write(str(out))
    return out


ELEMENT_COLOURS = {
    "C": "#404040", "N": "#3050f8", "O": "#ff0d0d", "S": "#e0c030", "P": "#ff8000", "F": "#90e050",
    "CL": "#1ff01f", "BR": "#a62929", "I": "#940094", "B": "#ffb5b5", "SE": "#ffa100", "SI": "#daa520",
    "FE": "#e06633",
}  # Jmol CPK colours (carbon darkened to show on white)


def draw_conformers(mol: Molecule, conformers: np.ndarray, out: str | Path, titles: list[str]) -> Path:
    """Ball-and-stick panels (matplotlib 3-D): the reference, then each conformer; element colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [mol.coords, *conformers]
    fig = plt.figure(figsize=(2.6 * len(panels), 3.0), dpi=100)
    colours = [ELEMENT_COLOURS[e] for e in mol.element_symbols]
    lim = np.abs(np.concatenate(panels) - mol.coords.mean(0)).max()
    for p, (xyz, title) in enumerate(zip(panels, ["reference (CCD ideal)", *titles])):
        ax = fig.add_subplot(1, len(panels), p + 1, projection="3d")
        xyz = xyz - mol.coords.mean(0)
        for i, j in mol.bonds:
            ax.plot(*xyz[[i, j]].T, color="#9a9a9a", lw=2)
        ax.scatter(*xyz.T, c=colours, s=60, depthshade=True, edgecolors="black", linewidths=0.3)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_zlim(-lim, lim)
        ax.set_box_aspect(None, zoom=1.5)
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
    fig.suptitle(mol.comp_id)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def sample_component(
    run_dir: str | Path,
    component: str,
    n: int = 5,
    seed: int = 0,
    out: str | Path = "atp.cif",
    *,
    device: str = "auto",
    use_ema: bool = True,
    sample: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate ``n`` conformers of CCD ``component``; write them to ``out`` (one mmCIF, n models, each
    superposed onto the CCD ideal conformer) and a picture to ``out`` with suffix ``.png``.

    Returns ``{"cif", "png", "rmsd", "rmsd_sym", "step"}``. Unknown ids and unsupported elements raise
    ``ValueError`` (``load_component``). ``sample`` overrides the run's sampler settings.
    """
    from adaln.eval.conformers import automorphisms, kabsch_rmsd, superpose, symmetric_rmsd

    mol = load_component(component)
    run = load_conformer_run(run_dir, device=device, use_ema=use_ema, sample=sample)
    samples = generate_conformers(run, [mol], n, seed=seed)
    if run.cfg.sample.fix_mirror:
        samples, _ = fix_mirror_images(samples, [mol])
    x = superpose(samples[0], mol.coords[None])
    rmsd = kabsch_rmsd(x, mol.coords[None])
    rmsd_sym = symmetric_rmsd(x, mol.coords, automorphisms(mol))
    cif = write_mmcif(mol, x, out)
    titles = [f"sample {i + 1}: {r:.2f} A" for i, r in enumerate(rmsd_sym)]
    png = draw_conformers(mol, x, Path(out).with_suffix(".png"), titles)
    return {"cif": str(cif), "png": str(png), "rmsd": rmsd.tolist(), "rmsd_sym": rmsd_sym.tolist(), "step": run.step}


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate_conformers(
    run_dir: str | Path,
    k: int | None = None,
    limit: int | None = None,
    *,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    sample: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Our model and RDKit ETKDGv3 on the test split; writes ``eval.json`` and ``eval.md`` in the run.

    ``k`` conformers per molecule (default ``eval_k``) on the first ``limit`` test molecules in hash
    order (default ``eval_limit``; None in both: the whole split). Both methods are summarised on the
    molecules RDKit could embed; ours on all of them as well. ``sample`` overrides the run's sampler
    settings (``load_conformer_run``); the settings used are recorded in ``eval.json``.
    """
    from adaln.eval.conformers import automorphisms, conformer_metrics, evaluate_rdkit, summarize, write_report

    run = load_conformer_run(run_dir, device=device, sample=sample)
    k = k or run.cfg.eval_k
    limit = limit if limit is not None else run.cfg.eval_limit
    mols = load_ccd("test", limit=limit, cache=run.cfg.cache_dir, progress=progress)
    t0 = time.perf_counter()
    samples = generate_conformers(run, mols, k, seed=seed, progress=progress)
    ours_s = time.perf_counter() - t0
    reflected = 0
    if run.cfg.sample.fix_mirror:
        samples, reflected = fix_mirror_images(samples, mols)
    ours = [conformer_metrics(x, m, automorphisms(m)) for x, m in zip(samples, mols)]
    rd = evaluate_rdkit(mols, k=k, seed=seed, progress=progress)
    common = {r["comp_id"] for r in rd["records"]}
    result = {
        "title": f"CCD test split, first {len(mols)} molecules in hash order, k = {k}",
        "run": str(run_dir),
        "step": run.step,
        "k": k,
        "sampler": asdict(run.cfg.sample),
        "methods": {
            "adaln AF3-style diffusion": summarize([r for r in ours if r["comp_id"] in common]),
            "RDKit ETKDGv3": summarize(rd["records"]),
        },
        "ours_all_molecules": summarize(ours),
        "rdkit_failures": rd["failures"],
        "mirror_fix": {"enabled": run.cfg.sample.fix_mirror, "reflected": reflected, "conformers": k * len(mols)},
        "seconds": {"ours_sampling": round(ours_s, 1), "rdkit": round(rd["seconds"], 1)},
        "records": {"ours": ours, "rdkit": rd["records"]},
    }
    m = result["methods"]
    ratio = m["adaln AF3-style diffusion"]["median_best_rmsd"] / m["RDKit ETKDGv3"]["median_best_rmsd"]
    result["median_best_rmsd_ratio"] = ratio
    result["notes"] = [
        f"ratio of median best-of-{k} RMSD (ours / RDKit): {ratio:.3f}",
        f"RDKit failed on {len(rd['failures'])} molecule(s); both columns use the {len(common)} it embedded",
        f"mirror fix: {reflected} of {k * len(mols)} generated conformers reflected"
        if run.cfg.sample.fix_mirror else "mirror fix off",
        f"sampling: {run.cfg.sample.steps} AF3 sampler steps, step_scale {run.cfg.sample.step_scale:g}, "
        f"{ours_s:.0f} s for ours; RDKit {rd['seconds']:.0f} s "
        f"(checkpoint step {run.step})",
    ]
    out = Path(run_dir)
    write_report(result, out / "eval.json", out / "eval.md")
    return result
