"""Shapes, splits and determinism of the classification datamodules."""

import os

import pytest
import torch

from lightning_nd.datamodules import DigitsDataModule, FashionMNISTDataModule
from lightning_nd.datamodules.fashion_mnist import DEBIAN_DIR

HAVE_FMNIST = os.path.isdir(DEBIAN_DIR)
# CI installs the Debian package: there a missing dataset is a failure, never a silent skip.
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST and not os.environ.get("CI"), reason=f"{DEBIAN_DIR} not installed")


def test_digits_shapes_split_and_determinism():
    dm = DigitsDataModule(batch_size=32, image_size=32, channels=3, resize="pad")
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    assert len(dm.val_dataset) == round(1797 * 0.2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64 and int(y.max()) <= 9
    # padded border carries the normalised background value; the 8x8 digit sits in the centre
    assert torch.allclose(x[:, :, 0, :], torch.tensor(-0.3 / 0.4))
    # the same split seed gives the same split; another seed another one
    again = DigitsDataModule(image_size=32, channels=3, resize="pad")
    again.setup("fit")
    assert torch.equal(dm.val_dataset.labels, again.val_dataset.labels)
    other = DigitsDataModule(split_seed=1)
    other.setup("fit")
    assert not torch.equal(dm.val_dataset.labels, other.val_dataset.labels)
    xb, _ = dm.sample_batch(8)
    xb2, _ = again.sample_batch(8)
    assert torch.equal(xb, xb2)


def test_digits_interpolate_and_bad_input():
    dm = DigitsDataModule(image_size=16)
    dm.setup()
    assert dm.val_dataset[0][0].shape == (1, 16, 16) == dm.input_shape
    with pytest.raises(ValueError, match="image_size=4"):
        DigitsDataModule(image_size=4)
    with pytest.raises(ValueError, match="channels=2.*allowed: 1, 3"):
        DigitsDataModule(channels=2)
    with pytest.raises(ValueError, match="resize='crop'"):
        DigitsDataModule(resize="crop")


@needs_fmnist
def test_fashion_mnist_from_debian_package():
    dm = FashionMNISTDataModule(batch_size=16, image_size=32, channels=3, train_subset=1000, val_size=500)
    dm.setup("fit")
    assert len(dm.train_dataset) == 1000 and len(dm.val_dataset) == 500 and len(dm.test_dataset) == 10000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32)
    # the full test set has exactly 1000 images per class
    assert torch.bincount(dm.test_dataset.labels, minlength=10).tolist() == [1000] * 10
    again = FashionMNISTDataModule(train_subset=1000, val_size=500)
    again.setup("fit")
    assert torch.equal(dm.train_dataset.labels, again.train_dataset.labels)


def test_fashion_mnist_missing_folder_names_the_options(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*apt-get install dataset-fashion-mnist.*download=True"):
        dm.setup("fit")


def test_fashion_mnist_reads_a_user_folder_of_raw_idx_files(tmp_path):
    import gzip

    import numpy as np

    def idx(array, path):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        idx(rng.integers(0, 255, (n, 28, 28)), tmp_path / f"{prefix}-images-idx3-ubyte.gz")
        idx(np.arange(n) % 10, tmp_path / f"{prefix}-labels-idx1-ubyte.gz")
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=10, batch_size=8)
    dm.setup("fit")
    assert len(dm.train_dataset) == 50 and len(dm.test_dataset) == 20
    assert dm.test_dataset.labels.tolist() == [i % 10 for i in range(20)]
