"""adaln.eval: quality metrics (digits conditional accuracy and Frechet distance; conformer RMSD and
geometry against RDKit ETKDGv3 in adaln.eval.conformers)."""

from adaln.eval.digits import DigitsClassifier, DigitsScorer, DigitsScorerConfig, frechet_distance, gaussian_fit

__all__ = ["DigitsClassifier", "DigitsScorer", "DigitsScorerConfig", "frechet_distance", "gaussian_fit"]
