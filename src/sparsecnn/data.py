"""Datasets for (re)training: scikit-learn's digits and users' own image folders.

Both return a :class:`DataSplits` with a train and a test ``torch.utils.data.Dataset`` of
``(image, label)`` pairs, images float32 ``(C, H, W)`` in [0, 1], and a :class:`DataInfo` that says
how to build a model for them (classes, channels, input size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from sparsecnn.errors import SparseCNNError

__all__ = ["IMAGE_EXTENSIONS", "DataInfo", "DataSplits", "ImageFolder", "digits", "image_folder", "load"]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)
_SPLIT = {"test_size": 0.25, "random_state": 0}  # the fixed split everyone can reproduce


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a dataset."""

    name: str  # "digits" or the image folder's path
    num_classes: int
    in_channels: int
    input_size: int  # images are square, input_size x input_size
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DataSplits:
    train: Dataset
    test: Dataset
    info: DataInfo


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, stratify=labels, **_SPLIT)
    return np.asarray(train), np.asarray(test)


def digits() -> DataSplits:
    """scikit-learn's digits: 1,797 real 8x8 grey images of 0-9 (the UCI optical digits test set).

    Split with ``train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)``: 1,347 train,
    450 test images; pixels (0..16) divided by 16 to lie in [0, 1].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(X, y, stratify=y, **_SPLIT)

    def as_set(X: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(X.reshape(-1, 1, 8, 8).copy()), torch.from_numpy(y))

    info = DataInfo("digits", 10, 1, 8, tuple(str(c) for c in range(10)))
    return DataSplits(as_set(X_train, y_train), as_set(X_test, y_test), info)


class ImageFolder(Dataset):
    """Images in one sub-folder per class (``root/<class>/<image>``), read with Pillow on access.

    Parameters
    ----------
    root : path
        Folder holding one sub-folder per class; class indices follow the sorted sub-folder names.
    size : int, optional
        Resize every image to ``size x size`` (bilinear). Default: the first image's size, which
        must then be square.
    channels : {1, 3}, optional
        1 converts to grey ("L"), 3 to RGB. Default: 1 if every image is grey, else 3.
    classes : sequence of str, optional
        Use this class list (e.g. the train folder's, for a test folder).

    Raises
    ------
    SparseCNNError
        If ``root`` is not a folder, or no sub-folder holds an image.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int | None = None,
        channels: int | None = None,
        classes: tuple[str, ...] | None = None,
    ) -> None:
        from PIL import Image

        root = Path(root)
        if not root.is_dir():
            raise SparseCNNError(f"image folder {root} does not exist or is not a folder")
        found: dict[str, list[Path]] = {}
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if files:
                found[sub.name] = files
        if not found:
            raise SparseCNNError(
                f"image folder {root} has no images in class sub-folders; put each class's images "
                f"({', '.join(IMAGE_EXTENSIONS)}) in its own sub-folder, e.g. {root}/cat/1.png"
            )
        if classes is None:
            classes = tuple(found)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise SparseCNNError(f"image folder {root} has classes {unknown} that the training data lacks")
        self.root = root
        self.classes = tuple(classes)
        self.samples = [(f, self.classes.index(c)) for c in found for f in found[c]]
        first = self._open(self.samples[0][0])
        if size is None:
            if first.width != first.height:
                raise SparseCNNError(
                    f"{self.samples[0][0]} is {first.width}x{first.height}, not square; "
                    "pass a size to resize to"
                )
            size = first.width
        if not isinstance(size, int) or size < 1:
            raise SparseCNNError(f"image size must be a positive integer, got {size!r}")
        if channels is None:
            grey = {"1", "L", "LA", "I", "I;16", "F"}  # palette and colour modes count as colour
            channels = 1
            for f, _ in self.samples:
                with Image.open(f) as im:
                    if im.mode not in grey:
                        channels = 3
                        break
        if channels not in (1, 3):
            raise SparseCNNError(f"channels must be 1 or 3, got {channels!r}")
        self.size = size
        self.channels = channels
        self.targets = [label for _, label in self.samples]

    @staticmethod
    def _open(path: Path):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (OSError, UnidentifiedImageError) as exc:
            raise SparseCNNError(f"cannot read image {path}: {exc}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        im = self._open(path).convert("L" if self.channels == 1 else "RGB")
        if im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a)), label

    def info(self) -> DataInfo:
        return DataInfo(str(self.root), len(self.classes), self.channels, self.size, self.classes)


def image_folder(
    root: str | os.PathLike[str], size: int | None = None, channels: int | None = None,
) -> DataSplits:
    """An image-folder dataset, split into train and test.

    ``root/train/<class>/...`` and ``root/test/<class>/...`` are used as given; otherwise the images
    of ``root/<class>/...`` are split like digits (stratified, 25% test, ``random_state=0``).
    """
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = ImageFolder(root / "train", size, channels)
        test = ImageFolder(root / "test", train.size, train.channels, classes=train.classes)
        return DataSplits(train, test, train.info())
    full = ImageFolder(root, size, channels)
    labels = np.asarray(full.targets)
    if len(labels) < 2 * len(full.classes) or np.bincount(labels).min() < 2:
        raise SparseCNNError(
            f"image folder {root} needs at least 2 images per class to split into train and test"
        )
    tr, te = _stratified_split(labels)
    return DataSplits(Subset(full, tr.tolist()), Subset(full, te.tolist()), full.info())


def load(spec: str, size: int | None = None, channels: int | None = None) -> DataSplits:
    """``"digits"`` or the path of an image folder."""
    if spec == "digits":
        if size not in (None, 8) or channels not in (None, 1):
            raise SparseCNNError("digits images are 8x8 grey; drop the size/channels options")
        return digits()
    if os.path.isdir(spec):
        return image_folder(spec, size, channels)
    raise SparseCNNError(f"unknown dataset {spec!r}; give 'digits' or the path of an image folder")
