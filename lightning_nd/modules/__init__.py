"""LightningModules: thin task wrappers around plain-PyTorch networks."""

from lightning_nd.modules.classifier import ImageClassifier, default_optimizer
from lightning_nd.modules.deq_classifier import DEQClassifier
from lightning_nd.modules.detection import DetectionModule
from lightning_nd.modules.supernet import SupernetModule

__all__ = ["DEQClassifier", "DetectionModule", "ImageClassifier", "SupernetModule", "default_optimizer"]
