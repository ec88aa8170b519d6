"""In-memory data for a comparison: training set with symmetric label noise, a validation split held
out of the *noisy* training labels, the clean test set, and a seeded stream of mini-batches."""

from __future__ import annotations

import attrs
import torch

from nonlocal_opt.comparison.specs import ComparisonConfig, SpecError
from nonlocal_opt.training.data import DataFileError, DatasetNotFoundError, ImageDataset, load_dataset, with_label_noise

SYNTHETIC = "synthetic"
NOISE_SEED_OFFSET = 7919  # label noise and the validation split draw from different streams


@attrs.frozen
class Splits:
    """``train``/``val``: disjoint parts of the noisy training set; ``test``: clean labels.
    ``train_index``/``val_index``: their rows in the training set (for checks)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_index: torch.Tensor
    val_index: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def synthetic_dataset(split: str, size: int, seed: int = 0) -> ImageDataset:
    """Ten Gaussian classes in ``1×8×8`` images (class means drawn once from seed 0), ``size`` samples."""
    means = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    labels = torch.randint(0, 10, (size,), generator=gen)
    images = means[labels] + 1.5 * torch.randn(size, 1, 8, 8, generator=gen)
    return ImageDataset(images, labels, 10)


def load_splits(config: ComparisonConfig, noise: float) -> Splits:
    """The splits of ``config`` at label noise ``noise`` (noise and split drawn from ``config.split_seed``)."""
    try:
        if config.dataset == SYNTHETIC:
            train = synthetic_dataset("train", config.train_subset or 2048)
            test = synthetic_dataset("test", config.test_subset or 512)
        else:
            train = load_dataset(config.dataset, "train", config.data_dir)
            test = load_dataset(config.dataset, "test", config.data_dir)
    except (DatasetNotFoundError, DataFileError) as error:
        raise SpecError(str(error)) from None
    if not isinstance(train, ImageDataset):
        raise SpecError(f"dataset {config.dataset!r} is not a classification dataset")
    if config.train_subset is not None:
        train = ImageDataset(train.images[: config.train_subset], train.labels[: config.train_subset], train.num_classes)
    if config.test_subset is not None:
        test = ImageDataset(test.images[: config.test_subset], test.labels[: config.test_subset], test.num_classes)
    if config.val_size >= len(train):
        raise SpecError(f"val_size {config.val_size} leaves no training data ({len(train)} training samples)")
    noisy = with_label_noise(train, noise, config.split_seed + NOISE_SEED_OFFSET) if noise > 0 else train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.split_seed))
    val_index, train_index = order[: config.val_size].sort().values, order[config.val_size :].sort().values
    return Splits(noisy.images[train_index], noisy.labels[train_index], noisy.images[val_index], noisy.labels[val_index],
                  test.images, test.labels, train_index, val_index, train.num_classes)


def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image of ``x`` (``N×C×H×W``): pad every side with ``P = max(1, H // 8)`` zeros, keep an
    ``H×W`` window at an offset drawn uniformly from ``{0, …, 2P}²``, and mirror it left to right with
    probability ½ (``P = 3`` for 28×28, ``4`` for 32×32).

    Args:
        x: a batch of images.
        generator: the source of the offsets and flips.
    """
    n, _, height, width = x.shape
    pad = max(1, height // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator) for _ in range(2))
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.arange(width)
    cols = torch.where(flip.unsqueeze(1), cols.flip(0), cols) + dx.unsqueeze(1)  # a flip reverses the window's columns
    rows = torch.arange(height) + dy.unsqueeze(1)
    picked = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # N×H×W×C
    return picked.permute(0, 3, 1, 2).contiguous()


class BatchStream:
    """Mini-batches of ``(x, y)`` from in-memory tensors: a fresh permutation per epoch from ``generator``,
    the last incomplete batch of an epoch dropped; ``augment`` passes each batch through :func:`crop_flip`
    with the same generator. ``read`` counts the batches handed out."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator, augment: bool = False):
        if batch_size > len(y):
            raise SpecError(f"batch_size {batch_size} is larger than the {len(y)} training samples")
        self.x, self.y, self.batch_size, self.generator, self.augment = x, y, batch_size, generator, augment
        self.per_epoch = len(y) // batch_size
        self.read, self._position, self._order = 0, self.per_epoch, None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._position == self.per_epoch:
            self._order = torch.randperm(len(self.y), generator=self.generator)
            self._position = 0
        index = self._order[self._position * self.batch_size : (self._position + 1) * self.batch_size]
        self._position += 1
        self.read += 1
        x = self.x[index]
        return (crop_flip(x, self.generator) if self.augment else x), self.y[index]
