"""ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) with the standard augmentation."""

from __future__ import annotations

from pathlib import Path

from lightning_nd.datamodules.base import ClassificationDataModule

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolderDataModule(ClassificationDataModule):
    """Train/val folders in torchvision's ``ImageFolder`` layout; RandomResizedCrop + flip for training.

    Args:
        root: folder holding ``train_dir`` and ``val_dir``.
        train_dir, val_dir: sub-folder names.
        image_size: training crop size; evaluation resizes to ``image_size / 0.875`` and centre-crops.
        batch_size, num_workers, eval_batch_size: see :class:`ClassificationDataModule`.

    Raises:
        FileNotFoundError: at setup, naming the missing folder.

    Example::

        dm = ImageFolderDataModule("/data/imagenet", image_size=224, batch_size=256, num_workers=8)
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.root, self.train_dir, self.val_dir, self.image_size = Path(root), train_dir, val_dir, image_size
        self.input_shape = (3, image_size, image_size)
        self.num_classes = 0  # known after setup

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        from torchvision import datasets, transforms

        for sub in (self.train_dir, self.val_dir):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(f"ImageFolderDataModule: folder {str(self.root / sub)!r} does not exist")
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(self.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        eval_tf = transforms.Compose(
            [
                transforms.Resize(int(self.image_size / 0.875)),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                normalize,
            ]
        )
        self.train_dataset = datasets.ImageFolder(str(self.root / self.train_dir), train_tf)
        self.val_dataset = datasets.ImageFolder(str(self.root / self.val_dir), eval_tf)
        self.test_dataset = self.val_dataset
        self.num_classes = len(self.train_dataset.classes)
