"""Datasets for the trainer: Fashion-MNIST (IDX files), MNIST / CIFAR (torchvision), analytic landscapes.

Every image dataset is an :class:`ImageDataset` of ``(x, y)`` pairs: ``x`` a float tensor ``C×H×W``
normalised per channel to zero mean and unit variance (training-set statistics), ``y`` an int label.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from nonlocal_opt.landscapes import LANDSCAPES

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_TORCHVISION_ROOT = Path(os.environ.get("NONLOCAL_OPT_DATA", Path.home() / ".cache" / "nonlocal-opt"))
LANDSCAPE_PREFIX = "landscape:"
LANDSCAPE_SIZES = {"train": 1024, "test": 256}

# Per-channel mean and standard deviation of the training split (pixel values scaled to [0, 1]).
NORMALISATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}
IMAGE_SHAPES = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}  # C×H×W
DATASETS = (*NORMALISATION, *(LANDSCAPE_PREFIX + name for name in LANDSCAPES))
SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the path looked at and the fix."""


class DataFileError(ValueError):
    """A dataset file is damaged or inconsistent; the message names the file and the fix."""


def _fix(path: Path) -> str:
    if Path(path).parent == FASHION_MNIST_DIR:
        return "reinstall it (apt-get install --reinstall dataset-fashion-mnist)"
    return "replace it with an intact copy (or pass another --data-dir)"


def check_labels(labels: torch.Tensor, count: int, num_classes: int, images_path, labels_path) -> None:
    """Image and label counts agree and every label is a class index in ``[0, num_classes)``."""
    if len(labels) != count:
        raise DataFileError(f"{labels_path} has {len(labels)} labels for the {count} images of {images_path}; "
                            f"the files do not belong together: {_fix(Path(labels_path))}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DataFileError(f"{labels_path} has label {bad}, outside the {num_classes} classes 0..{num_classes - 1}: "
                            f"{_fix(Path(labels_path))}")


def check_images(pixels: torch.Tensor, name: str, path) -> None:
    """A split holds at least one image, each of the dataset's shape ``IMAGE_SHAPES[name]`` (so the
    training and validation splits fit the same model).

    Args:
        pixels: the split's images, ``N×C×H×W``.
        name: the dataset.
        path: the file (or directory) they came from, for the message.
    """
    if len(pixels) == 0:
        raise DataFileError(f"{path} holds no images: {_fix(Path(path))}")
    shape = tuple(pixels.shape[1:])
    if shape != IMAGE_SHAPES[name]:
        shown = "×".join(map(str, IMAGE_SHAPES[name]))
        raise DataFileError(f"{path} holds images of shape {'×'.join(map(str, shape))}, not {name}'s {shown}: {_fix(Path(path))}")


class ImageDataset(Dataset):
    """Images held in memory as one normalised float tensor ``N×C×H×W`` with int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.images, self.labels, self.num_classes = images, labels, num_classes

    @classmethod
    def from_uint8(cls, pixels: torch.Tensor, labels, name: str) -> ImageDataset:
        """``pixels``: uint8 ``N×C×H×W``; normalised with ``NORMALISATION[name]``."""
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALISATION[name])
        images = (pixels.float() / 255 - mean) / std
        labels = torch.as_tensor(labels, dtype=torch.int64)
        return cls(images, labels, NUM_CLASSES[name])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


class LandscapeDataset(Dataset):
    """An analytic landscape as a toy dataset: every sample is the zero shift ``x = 0 ∈ R^dim``, so the
    loss of a batch is ``f(θ)`` (see :class:`nonlocal_opt.training.models.LandscapeModel`)."""

    num_classes = 0

    def __init__(self, name: str, size: int):
        if name not in LANDSCAPES:
            raise ValueError(f"unknown landscape {name!r}; available: {', '.join(LANDSCAPES)}")
        self.landscape, self.size = name, size
        self.input_shape = (LANDSCAPES[name]().dim,)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        return torch.zeros(self.input_shape), 0


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataFileError(f"{path} is damaged ({' '.join(str(error).split()) or type(error).__name__}): {_fix(path)}") from None
    if len(data) < 4:
        raise DataFileError(f"{path} is empty or truncated ({len(data)} bytes): {_fix(path)}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DataFileError(f"{path} is not an unsigned-byte IDX file: {_fix(path)}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataFileError(f"{path} is truncated or padded: {len(data)} bytes, its header {tuple(shape)} needs {expected}: {_fix(path)}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist(split: str, data_dir: str | os.PathLike | None) -> ImageDataset:
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: no {prefix}-images-idx3-ubyte.gz / {prefix}-labels-idx1-ubyte.gz in "
            f"{directory}; install the Debian package dataset-fashion-mnist (apt-get install "
            "dataset-fashion-mnist) or pass --data-dir DIR holding these IDX files"
        )
    pixel_array, label_array = read_idx(images), read_idx(labels)
    if pixel_array.ndim != 3:
        raise DataFileError(f"{images} holds an array of shape {pixel_array.shape}, not N×H×W images: {_fix(images)}")
    if label_array.ndim != 1:
        raise DataFileError(f"{labels} holds an array of shape {label_array.shape}, not N labels: {_fix(labels)}")
    label_tensor = torch.from_numpy(label_array.astype(np.int64))
    check_labels(label_tensor, len(pixel_array), NUM_CLASSES["fashion-mnist"], images, labels)
    pixels = torch.from_numpy(pixel_array.copy()).unsqueeze(1)
    check_images(pixels, "fashion-mnist", images)
    return ImageDataset.from_uint8(pixels, label_tensor, "fashion-mnist")


def _torchvision(name: str, split: str, data_dir, download: bool) -> ImageDataset:
    from torchvision import datasets

    root = Path(data_dir) if data_dir is not None else DEFAULT_TORCHVISION_ROOT
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        raw = cls(root=str(root), train=split == "train", download=download)
    except RuntimeError as error:
        raise DatasetNotFoundError(
            f"{name} not found under {root} (torchvision {cls.__name__} layout): pass --download to fetch it "
            f"(needs internet) or --data-dir DIR where it was downloaded before ({error})"
        ) from error
    pixels = torch.as_tensor(raw.data)
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    targets = torch.as_tensor(raw.targets, dtype=torch.int64)
    check_labels(targets, len(pixels), NUM_CLASSES[name], root, root)
    check_images(pixels, name, root)
    return ImageDataset.from_uint8(pixels.contiguous(), targets, name)


def load_dataset(name: str = "fashion-mnist", split: str = "train", data_dir=None, download: bool = False) -> Dataset:
    """The dataset ``name`` (see ``DATASETS``) for ``split`` in ``{"train", "test"}``.

    Fashion-MNIST is read from the IDX files in ``data_dir`` (default: the Debian package's
    ``/usr/share/datasets/fashion-mnist``); MNIST and CIFAR come from torchvision (``download=True``
    fetches them); ``"landscape:NAME"`` is an analytic landscape of ``nonlocal_opt.landscapes``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if name.startswith(LANDSCAPE_PREFIX):
        return LandscapeDataset(name[len(LANDSCAPE_PREFIX) :], LANDSCAPE_SIZES[split])
    if name not in NORMALISATION:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if name == "fashion-mnist":
        return _fashion_mnist(split, data_dir)
    return _torchvision(name, split, data_dir, download)


def with_label_noise(dataset: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """Symmetric label noise: each label, with probability ``fraction``, is replaced by one of the other
    ``C − 1`` classes drawn uniformly (seeded by ``seed``). Returns a new dataset sharing the images."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"label noise must be a probability in [0, 1], got {fraction}")
    if not isinstance(dataset, ImageDataset):
        raise ValueError("label noise needs a classification dataset, not an analytic landscape")
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(dataset), generator=gen) < fraction
    shift = torch.randint(1, dataset.num_classes, (len(dataset),), generator=gen)
    labels = torch.where(flip, (dataset.labels + shift) % dataset.num_classes, dataset.labels)
    return ImageDataset(dataset.images, labels, dataset.num_classes)
