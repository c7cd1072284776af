"""LightningModules: thin task wrappers around plain-PyTorch networks."""

from lightning_nd.modules.classifier import ImageClassifier, default_optimizer

__all__ = ["ImageClassifier", "default_optimizer"]
