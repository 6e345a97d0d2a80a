"""prn: the Prototypical Residual Network (Zhang et al., CVPR 2023) as a tool."""

__version__ = "0.1.0"
