"""Datamodules: offline classification data (digits, Fashion-MNIST), CIFAR and ImageFolder for GPU users,
random labels for RLNAS, and detection data. One datamodule per file, re-exported here."""

from lightning_nd.datamodules.base import ClassificationDataModule, ImageTensorDataset, SplitDataModule
from lightning_nd.datamodules.cifar import CIFARDataModule
from lightning_nd.datamodules.coco_detection import CocoDetectionDataModule
from lightning_nd.datamodules.digits import DigitsDataModule
from lightning_nd.datamodules.fashion_mnist import FashionMNISTDataModule
from lightning_nd.datamodules.image_folder import ImageFolderDataModule
from lightning_nd.datamodules.random_labels import RandomLabels, RelabeledDataset
from lightning_nd.datamodules.shapes_detection import ShapesDetectionDataModule

__all__ = [
    "CIFARDataModule",
    "ClassificationDataModule",
    "CocoDetectionDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageTensorDataset",
    "RandomLabels",
    "RelabeledDataset",
    "ShapesDetectionDataModule",
    "SplitDataModule",
]
