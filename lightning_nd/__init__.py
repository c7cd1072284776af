"""lightning-nd: PyTorch Lightning for convergence-based NAS, implicit (DEQ) models and structural
re-parameterization. The algorithms live in callbacks; models are plain PyTorch."""

__version__ = "0.1.0"
