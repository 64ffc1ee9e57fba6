"""Task ``conformers``: AlphaFold 3-style diffusion generating heavy-atom conformers of CCD molecules.

``ConformerDenoiser`` (adaln.models.conformer) in ``EDMPrecond`` with ``noise_input="af3"``, trained with
``denoising_loss`` on centred, randomly rotated and translated ideal conformers (AF3 Algorithm 19) at
AF3's training noise levels ``sigma_data * exp(-1.2 + 1.5 N(0, 1))``, plus AF3's bond loss on 1-2 and
1-3 distances; sampled with ``sample_af3`` (augmentation on, padding masked); evaluated against RDKit
ETKDGv3 on the CCD test split. ``sigma_data`` is measured from the training molecules (per-coordinate RMS
of centred coordinates, 2.76 A for the full train split) unless the config fixes it.

Batches group molecules of similar size (``epoch_batches``) so that little of a batch is padding; each
example's rotation, translation, sigma and noise come from its own (seed, step, index) generator.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adaln.data.ccd import (
    ATOM_FEATURES_DIM,
    PAIR_CODE_SIZES,
    ConformerBatch,
    Molecule,
    collate_molecules,
    coordinate_rms,
    load_ccd,
    load_component,
    signed_volume,
)
from adaln.diffusion import (
    EDMPrecond,
    centre_random_augmentation,
    denoising_loss,
    loss_weight,
    sample_af3,
    sample_training_sigmas,
)
from adaln.engine.config import RunConfig, option
from adaln.engine.seeding import Stream, example_generators, generator
from adaln.errors import ConfigError
from adaln.models.conformer import ConformerDenoiser
from adaln.outputs import check_output_path, draw_conformers, write_mmcif
from adaln.tasks.base import Task, TrainedRun, replace_config


@dataclass
class ConformerModelConfig:
    c_atom: int = option(128, ge=1)  # atom (token) and single-conditioning width
    c_pair: int = option(16, ge=1)
    num_blocks: int = option(4, ge=1)
    num_heads: int = option(4, ge=1)
    super_block_size: int = option(2, ge=1)
    single_transitions: int = option(2, ge=0)  # AF3 DiffusionConditioning applies two
    distance_rbf: int = option(16, ge=0)  # Gaussian RBFs of the noisy pairwise distances (0: off; else >= 2)
    equivariant_head: bool = True  # add sum_j w_ij (x_i - x_j) to the AF3 output (see ConformerDenoiser)
    chirality_head: bool = True  # move stereocentres along their neighbours' plane normal (ditto)


@dataclass
class ConformerSampleConfig:
    steps: int = option(100, ge=1)  # AF3 uses 200; 100 measured as good on validation molecules
    gamma_0: float = option(0.8, ge=0)  # AF3 sampler defaults
    gamma_min: float = option(1.0, ge=0)
    noise_scale: float = option(1.003, gt=0)
    step_scale: float = option(1.5, gt=0)  # the preset uses 3.0, chosen on validation molecules
    s_max: float = option(160.0, gt=0)  # first noise level / sigma_data (AF3: 160)
    batch_size: int = option(64, ge=1)  # conformers per denoiser call
    # Reflect a sample whose stereocentres mostly have the wrong handedness (see fix_mirror_images).
    fix_mirror: bool = True


@dataclass
class ConformerConfig(RunConfig):
    task: str = "conformers"
    name: str = "ccd-conformers"
    model: ConformerModelConfig = field(default_factory=ConformerModelConfig)
    sample: ConformerSampleConfig = option(resumable=True, default_factory=ConformerSampleConfig)
    steps: int = option(5000, ge=1, resumable=True)
    batch_size: int = option(32, ge=1)
    lr_schedule: str = option("cosine", choices=("constant", "cosine"))
    keep_last: int = option(2, ge=1, resumable=True)
    # torch CPU threads: 1 by default, since these tensors are small and with more threads OpenMP's
    # spin-waiting made steps up to 100x slower whenever another process used the cores.
    threads: int | None = option(1, ge=1, resumable=True)
    train_limit: int | None = option(None, ge=1)  # first N training molecules in hash order (None: all)
    eval_limit: int | None = option(200, ge=1, resumable=True)  # first N test molecules in hash order
    eval_k: int = option(5, ge=1, resumable=True)  # conformers per test molecule
    sigma_data: float | None = option(None, gt=0)  # None: measured from the training molecules
    s_trans: float = option(1.0, ge=0)  # translation of the training augmentation (AF3: 1 A)
    bond_loss_weight: float = option(0.3, ge=0)  # AF3's L_bond (alpha_bond) on bonded pairs, see distance_loss
    angle_loss_weight: float = option(0.3, ge=0)  # the same loss on 1-3 pairs (atoms two bonds apart)
    cache_dir: str | None = None  # CCD cache (None: $ADALN_CACHE or ~/.cache/adaln)


class ConformerTask(Task):
    name = "conformers"
    config = ConformerConfig
    sample_options = ("component", "step_scale")
    eval_options = ("limit", "step_scale")

    def __init__(self, cfg: ConformerConfig, device: torch.device, *, progress: bool = True,
                 molecules: list[Molecule] | None = None):
        super().__init__(cfg, device, progress=progress)
        self.mols = molecules or load_ccd("train", limit=cfg.train_limit, cache=cfg.cache_dir, progress=progress)
        self.num_examples = len(self.mols)
        self.sigma_data = cfg.sigma_data or round(coordinate_rms(self.mols), 4)
        self.sizes = np.array([m.num_atoms for m in self.mols])
        self._epoch, self._batches = -1, []

    @classmethod
    def check(cls, cfg: ConformerConfig) -> None:
        if cfg.model.c_atom % cfg.model.num_heads:
            raise ConfigError(f"model.c_atom {cfg.model.c_atom} must be divisible by model.num_heads "
                              f"{cfg.model.num_heads}")
        if cfg.model.distance_rbf == 1:
            raise ConfigError("model.distance_rbf must be 0 (off) or >= 2 (RBF centres span 0..3)")

    def info(self) -> dict[str, Any]:
        return {"sigma_data": self.sigma_data}

    @classmethod
    def model_from(cls, cfg: ConformerConfig, info: dict[str, Any]) -> ConformerDenoiser:
        m = cfg.model
        return ConformerDenoiser(m.c_atom, m.c_pair, m.num_blocks, m.num_heads, m.super_block_size,
                                 m.single_transitions, m.distance_rbf, m.equivariant_head, m.chirality_head,
                                 atom_dim=ATOM_FEATURES_DIM, pair_code_sizes=PAIR_CODE_SIZES)

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.blocks)

    def batch(self, step: int) -> Tensor:
        per_epoch = self.num_examples // self.cfg.batch_size
        if per_epoch == 0:
            raise ConfigError(f"batch_size {self.cfg.batch_size} exceeds the {self.num_examples} training molecules")
        epoch, i = divmod(step, per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.sizes, self.cfg.batch_size, self.cfg.seed, epoch)
        return torch.tensor(self._batches[i])

    def loss(self, net: nn.Module, step: int, indices: Tensor, rank: int) -> Tensor:
        cfg, sd = self.cfg, self.sigma_data
        mols = [self.mols[i] for i in indices.tolist()]
        batch = collate_molecules(mols).to(self.device)
        gens = example_generators(cfg.seed, step, indices, "cpu")
        x0 = centre_random_augmentation(batch.coords, batch.mask, cfg.s_trans, gens)
        sigma = sample_training_sigmas(len(x0), "af3", sigma_data=sd, generator=gens, device=self.device)
        keep = _KeepOutput(EDMPrecond(net, sd, noise_input="af3"))
        loss = denoising_loss(keep, x0, sigma, sigma_data=sd, mask=batch.mask, generator=gens, **batch_cond(batch))
        for distance, weight in ((1, cfg.bond_loss_weight), (2, cfg.angle_loss_weight)):
            if weight:
                loss = loss + weight * distance_loss(keep.output, x0, local_pairs(mols, distance, self.device), sigma, sd)
        return loss

    # ---- inference ---------------------------------------------------------------------------------
    @classmethod
    def sample(cls, run: TrainedRun, options: dict[str, Any]) -> str:
        component = options.get("component")
        if not component:
            raise ConfigError(f"{run.run_dir} holds a conformer model: give --component ID (a CCD id such as ATP)")
        out = check_output_path(options.get("output") or run.run_dir / f"{component.lower()}.cif")
        r = sample_component(run, component, n=options.get("n", 5), seed=options.get("seed", 0), out=out,
                             sample=_sampler_options(options))
        rmsd = ", ".join(f"{x:.2f}" for x in r["rmsd_sym"])
        return (f"wrote {r['cif']} ({len(r['rmsd'])} models) and {r['png']}; RMSD to the CCD ideal conformer "
                f"(symmetry-aware, A): {rmsd}; step {run.step}")

    @classmethod
    def evaluate(cls, run: TrainedRun, options: dict[str, Any]) -> str:
        result = evaluate_conformers(run, k=options.get("n"), limit=options.get("limit"), seed=options.get("seed", 0),
                                     sample=_sampler_options(options))
        ratio = result["median_best_rmsd_ratio"]
        return ((run.run_dir / "eval.md").read_text()
                + f"\nmedian best-of-{result['k']} RMSD ratio (ours / RDKit ETKDGv3): {ratio:.3f}")


def _sampler_options(options: dict[str, Any]) -> dict[str, Any]:
    return {"steps": options.get("steps"), "step_scale": options.get("step_scale")}


def batch_cond(batch: ConformerBatch) -> dict[str, Tensor]:
    """The denoiser keywords of a batch."""
    return {"atom_feats": batch.atom_feats, "pair_codes": batch.pair_codes, "atom_mask": batch.mask}


BUCKET_BATCHES = 50  # batches per size bucket: sorting within 50 batches cuts padding ~2x


def epoch_batches(sizes: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded permutation cut into chunks of ``BUCKET_BATCHES`` batches,
    each chunk sorted by molecule size and cut into batches (similar sizes pad little), then the
    batches shuffled; the last partial batch is dropped."""
    n = len(sizes)
    g = generator(seed, Stream.DATA_ORDER, epoch)
    perm = torch.randperm(n, generator=g).numpy()[: n - n % batch_size]
    batches = []
    for start in range(0, len(perm), BUCKET_BATCHES * batch_size):
        chunk = perm[start : start + BUCKET_BATCHES * batch_size]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


class _KeepOutput:
    """A denoiser that remembers its last output, so a second loss can use the same forward pass."""

    def __init__(self, denoiser: nn.Module):
        self.denoiser, self.output = denoiser, None

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
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


def generate_conformers(run: TrainedRun, mols: list[Molecule], n: int, *, seed: int = 0,
                        progress: bool = False) -> list[np.ndarray]:
    """``n`` conformers per molecule with ``sample_af3``: a list of (n, N_i, 3) float64 arrays.

    Conformers are batched by molecule size (``sample.batch_size`` per denoiser call); each batch draws
    from the generator (seed, first molecule id, its conformer index, batch size), so results depend
    only on ``mols``, ``n``, ``seed`` and the config.
    """
    from tqdm.auto import tqdm

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--n must be a positive integer, got {n!r}")
    s, sd = run.cfg.sample, float(run.info["sigma_data"])
    denoiser = EDMPrecond(run.model, sd, noise_input="af3")
    jobs = sorted(((k, i) for k in range(len(mols)) for i in range(n)), key=lambda j: (mols[j[0]].num_atoms, j))
    out = [np.zeros((n, m.num_atoms, 3)) for m in mols]
    chunks = [jobs[i : i + s.batch_size] for i in range(0, len(jobs), s.batch_size)]
    for chunk in tqdm(chunks, desc="sample", disable=not progress):
        batch = collate_molecules([mols[k] for k, _ in chunk]).to(run.device)
        gen = generator(seed, Stream.GENERATE, mols[chunk[0][0]].comp_id, chunk[0][1], len(chunk))
        x = sample_af3(
            denoiser, tuple(batch.coords.shape), steps=s.steps, sigma_data=sd, gamma_0=s.gamma_0,
            gamma_min=s.gamma_min, noise_scale=s.noise_scale, step_scale=s.step_scale, s_max=s.s_max,
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


def with_sampler(run: TrainedRun, sample: dict[str, Any] | None) -> TrainedRun:
    """``run`` with its ``sample`` section overridden (None values ignored), range-checked."""
    if not sample:
        return run
    cfg = replace_config(run.cfg, "sample", sample, "sampler options")
    return TrainedRun(run.task, cfg, run.info, run.model, run.step, run.checkpoint, run.run_dir, run.device)


def sample_component(run: TrainedRun, component: str, n: int = 5, seed: int = 0, out: str | Path = "atp.cif", *,
                     sample: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate ``n`` conformers of CCD ``component``; write them to ``out`` (one mmCIF, n models, each
    superposed onto the CCD ideal conformer) and a picture beside it (``.png``).

    Returns ``{"cif", "png", "rmsd", "rmsd_sym"}``; an unknown id is a ConfigError naming it."""
    from adaln.eval.conformers import automorphisms, kabsch_rmsd, superpose, symmetric_rmsd

    try:
        mol = load_component(component)
    except ValueError as e:
        raise ConfigError(f"--component: {e}") from None
    run = with_sampler(run, sample)
    samples = generate_conformers(run, [mol], n, seed=seed)
    if run.cfg.sample.fix_mirror:
        samples, _ = fix_mirror_images(samples, [mol])
    x = superpose(samples[0], mol.coords[None])
    rmsd = kabsch_rmsd(x, mol.coords[None])
    rmsd_sym = symmetric_rmsd(x, mol.coords, automorphisms(mol))
    cif = write_mmcif(mol, x, out)
    titles = [f"sample {i + 1}: {r:.2f} A" for i, r in enumerate(rmsd_sym)]
    png = draw_conformers(mol, x, Path(out).with_suffix(".png"), titles)
    return {"cif": str(cif), "png": str(png), "rmsd": rmsd.tolist(), "rmsd_sym": rmsd_sym.tolist()}


def evaluate_conformers(run: TrainedRun, k: int | None = None, limit: int | None = None, *, seed: int = 0,
                        progress: bool = True, sample: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our model and RDKit ETKDGv3 on the test split; writes ``eval.json`` and ``eval.md`` in the run.

    ``k`` conformers per molecule (default ``eval_k``) on the first ``limit`` test molecules in hash
    order (default ``eval_limit``; None in both: the whole split). Both methods are summarised on the
    molecules RDKit could embed; ours on all of them as well. ``sample`` overrides the run's sampler
    settings; the settings used are recorded in ``eval.json``.
    """
    from adaln.eval.conformers import automorphisms, conformer_metrics, evaluate_rdkit, summarize, write_report

    run = with_sampler(run, sample)
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
        "run": str(run.run_dir),
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
        f"{ours_s:.0f} s for ours; RDKit {rd['seconds']:.0f} s (checkpoint step {run.step})",
    ]
    write_report(result, run.run_dir / "eval.json", run.run_dir / "eval.md")
    return result
