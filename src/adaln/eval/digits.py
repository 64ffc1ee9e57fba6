"""Quality metrics for generated 8x8 digits: conditional accuracy and Frechet distance.

A small CNN (``DigitsClassifier``) trained on the real TRAIN split plays the role Inception plays for
FID: its logits give the conditional accuracy (fraction of samples classified as the class they were
requested for) and its 64-d penultimate layer gives the features of the Frechet distance

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))

between Gaussian fits (mean, unbiased covariance) of the features of the given images and of the real
TRAIN digits, computed in float64 with ``scipy.linalg.sqrtm`` as in FID (Heusel et al. 2017).

Images are ``(N, 1, 8, 8)`` floats in [-1, 1]. Generated samples may overshoot slightly, so values are
clamped to [-1, 1] before scoring; values further than ``range_tolerance`` outside [-1, 1] are rejected
as a sign of wrongly scaled data (e.g. pixels in [0, 255] or [0, 16]).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from adaln.data.digits import DIGITS_IMAGE_SHAPE, DIGITS_NUM_CLASSES, load_digits
from adaln.outputs import atomic_output, write_json

FORMAT_VERSION = 1
WEIGHTS_FILE = "digits_classifier.safetensors"
CONFIG_FILE = "digits_classifier.json"


#################################################################################
#                                Frechet distance                               #
#################################################################################

def gaussian_fit(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of features ``(N, D)``, in float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians, in float64."""
    from scipy.linalg import LinAlgWarning, sqrtm

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected mu1, mu2 (D,) and sigma1, sigma2 (D, D) with one D; got {mu1.shape}, {mu2.shape}, "
            f"{sigma1.shape}, {sigma2.shape}"
        )
    with warnings.catch_warnings():
        # sqrtm warns on singular products (e.g. N <= D samples); we check the result ourselves.
        warnings.simplefilter("ignore", LinAlgWarning)
        covmean = sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # Regularise both covariances as pytorch-fid does when the square root fails.
            offset = np.eye(d) * 1e-6
            covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        raise FloatingPointError("frechet_distance: sqrt(S1 S2) is not finite (are the covariances finite?)")
    if np.iscomplexobj(covmean):
        # S1 S2 is similar to the PSD matrix S1^1/2 S2 S1^1/2, so any imaginary part is round-off.
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


#################################################################################
#                                 The classifier                                #
#################################################################################

class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits: 3x3 convs (8x8 -> 4x4 -> 2x2), a feature layer, 10 logits."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * width, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, DIGITS_NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations: (N, 1, 8, 8) -> (N, feature_dim)."""
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: (N, 1, 8, 8) -> (N, 10)."""
        return self.head(self.trunk(x))


@dataclass
class DigitsScorerConfig:
    """Classifier size, its training recipe and the data split it is trained on."""

    width: int = 32
    feature_dim: int = 64
    epochs: int = 15
    batch_size: int = 64
    max_lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    heldout_fraction: float = 0.2
    split_seed: int = 0


#################################################################################
#                                   The scorer                                  #
#################################################################################

class DigitsScorer:
    """Conditional accuracy and Frechet distance of 8x8 digits against the real TRAIN split.

    ``DigitsScorer().fit()`` trains the classifier (deterministic: fixed seed, one CPU thread, a few
    seconds); ``save(dir)`` / ``DigitsScorer.load(dir)`` cache it as safetensors + JSON.
    """

    def __init__(self, config: DigitsScorerConfig | None = None, *, range_tolerance: float | None = 0.5):
        if config is not None and not isinstance(config, DigitsScorerConfig):
            raise TypeError(f"config must be a DigitsScorerConfig or None, got {type(config).__name__}")
        self.config = config or DigitsScorerConfig()
        self.range_tolerance = range_tolerance
        self.classifier: DigitsClassifier | None = None
        self._reference: tuple[np.ndarray, np.ndarray] | None = None

    # ---- training and caching ------------------------------------------------------------------------

    def fit(self) -> DigitsScorer:
        """Train the classifier on the TRAIN split (Adam + one-cycle LR, cross-entropy); returns self."""
        cfg = self.config
        images, labels = load_digits("train", heldout_fraction=cfg.heldout_fraction, seed=cfg.split_seed)
        threads = torch.get_num_threads()
        # One thread and a private RNG: the same weights on every machine, global RNG state untouched.
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = DigitsClassifier(cfg.width, cfg.feature_dim)
            generator = torch.Generator().manual_seed(cfg.seed)
            steps_per_epoch = -(-images.shape[0] // cfg.batch_size)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.max_lr, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.max_lr, total_steps=cfg.epochs * steps_per_epoch)
            model.train()
            for _ in range(cfg.epochs):
                order = torch.randperm(images.shape[0], generator=generator)
                for batch in order.split(cfg.batch_size):
                    loss = F.cross_entropy(model(images[batch]), labels[batch])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        finally:
            torch.set_num_threads(threads)
        self._set_classifier(model)
        return self

    def save(self, directory: str | Path) -> Path:
        """Write ``digits_classifier.safetensors`` + ``digits_classifier.json`` into ``directory``, each
        atomically (temp file + rename)."""
        model = self._require_classifier()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        blob = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
        meta = {
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        with atomic_output(directory / WEIGHTS_FILE) as tmp:  # the config (written last) vouches for it
            tmp.write_bytes(blob)
        write_json(directory / CONFIG_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, range_tolerance: float | None = 0.5) -> DigitsScorer:
        """Load a scorer written by ``save``; checks the format version and the weights' sha256."""
        directory = Path(directory)
        weights, meta_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        for p in (weights, meta_path):
            if not p.is_file():
                raise FileNotFoundError(f"digits scorer cache is missing {p}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        known = {f.name for f in fields(DigitsScorerConfig)}
        unknown = set(meta["config"]) - known
        if unknown:
            raise ValueError(f"{meta_path}: unknown config keys {sorted(unknown)}")
        blob = weights.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
            raise ValueError(f"{weights}: sha256 does not match {meta_path} (corrupt or replaced file)")
        scorer = cls(DigitsScorerConfig(**meta["config"]), range_tolerance=range_tolerance)
        model = DigitsClassifier(scorer.config.width, scorer.config.feature_dim)
        model.load_state_dict(load_safetensors(blob))
        scorer._set_classifier(model)
        return scorer

    @classmethod
    def load_or_fit(cls, directory: str | Path | None = None) -> DigitsScorer:
        """Load the cached scorer from ``directory`` if present, else fit it (and cache it there)."""
        if directory is not None and (Path(directory) / CONFIG_FILE).is_file():
            return cls.load(directory)
        scorer = cls().fit()
        if directory is not None:
            scorer.save(directory)
        return scorer

    # ---- scoring -------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Predicted classes: (N, 1, 8, 8) in [-1, 1] -> int64 (N,)."""
        return self._run(images, "images", logits=True).argmax(dim=1)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features: (N, 1, 8, 8) in [-1, 1] -> float32 (N, feature_dim)."""
        return self._run(images, "images", logits=False)

    def evaluate_samples(self, images: Tensor, requested_labels: Tensor) -> dict[str, float]:
        """Score ``images`` (N >= 2) generated for ``requested_labels`` (N,).

        Returns ``{"conditional_accuracy": fraction classified as requested,
        "frechet_distance": FD of the features against the real TRAIN digits}``.
        """
        labels = _check_labels(requested_labels, "requested_labels")
        x = self._check_images(images, "images")
        if labels.shape[0] != x.shape[0]:
            raise ValueError(
                f"requested_labels must have one label per image: {x.shape[0]} images, "
                f"{labels.shape[0]} labels"
            )
        if x.shape[0] < 2:
            raise ValueError(f"images needs N >= 2 samples for a covariance, got N = {x.shape[0]}")
        with torch.no_grad():
            feats = self._classifier_features(x)
            pred = self._require_classifier().head(feats).argmax(dim=1)
        mu, sigma = gaussian_fit(feats)
        mu_ref, sigma_ref = self.reference_statistics()
        return {
            "conditional_accuracy": float((pred == labels).double().mean()),
            "frechet_distance": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        }

    def real_heldout_reference(self) -> dict[str, float]:
        """``evaluate_samples`` on the real held-out digits with their true labels (the reference row)."""
        cfg = self.config
        images, labels = load_digits("heldout", heldout_fraction=cfg.heldout_fraction, seed=cfg.split_seed)
        return self.evaluate_samples(images, labels)

    def reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 mean ``(D,)`` and covariance ``(D, D)`` of the real TRAIN digits' features."""
        if self._reference is None:
            cfg = self.config
            images, _ = load_digits("train", heldout_fraction=cfg.heldout_fraction, seed=cfg.split_seed)
            with torch.no_grad():
                self._reference = gaussian_fit(self._classifier_features(images))
        return self._reference

    # ---- helpers -------------------------------------------------------------------------------------

    def _set_classifier(self, model: DigitsClassifier) -> None:
        self.classifier = model.eval().requires_grad_(False)
        self._reference = None

    def _require_classifier(self) -> DigitsClassifier:
        if self.classifier is None:
            raise RuntimeError("DigitsScorer has no classifier yet: call .fit() or DigitsScorer.load(path)")
        return self.classifier

    def _classifier_features(self, x: Tensor) -> Tensor:
        model = self._require_classifier()
        return torch.cat([model.features(chunk) for chunk in x.split(2048)])

    def _run(self, images: Tensor, name: str, *, logits: bool) -> Tensor:
        feats = self._classifier_features(self._check_images(images, name))
        return self._require_classifier().head(feats) if logits else feats

    def _check_images(self, images: object, name: str) -> Tensor:
        """Validate (N, 1, 8, 8) floating, finite, within tolerance of [-1, 1]; return clamped CPU float32."""
        if not isinstance(images, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (N, 1, 8, 8), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != DIGITS_IMAGE_SHAPE or images.shape[0] == 0:
            raise ValueError(f"{name} must have shape (N, 1, 8, 8) with N >= 1, got {tuple(images.shape)}")
        x = images.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf values")
        if self.range_tolerance is not None:
            lo, hi = float(x.min()), float(x.max())
            if lo < -1.0 - self.range_tolerance or hi > 1.0 + self.range_tolerance:
                raise ValueError(
                    f"{name} must be scaled to [-1, 1] (tolerance {self.range_tolerance}), got values in "
                    f"[{lo:.3g}, {hi:.3g}]; e.g. map [0, 255] pixels with x / 127.5 - 1"
                )
        return x.clamp(-1.0, 1.0)


def _check_labels(labels: object, name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class ids (N,), got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must have shape (N,), got {tuple(labels.shape)}")
    labels = labels.detach().to("cpu", torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= DIGITS_NUM_CLASSES):
        raise ValueError(
            f"{name} must be class ids in [0, {DIGITS_NUM_CLASSES}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels
