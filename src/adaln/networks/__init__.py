"""adaln.networks: consumers of the residual blocks (``ResidualNetwork``, ``ClassificationResNet``)."""

from adaln.networks.classification import ClassificationResNet
from adaln.networks.residual import ResidualNetwork, build_blocks

__all__ = ["ClassificationResNet", "ResidualNetwork", "build_blocks"]
