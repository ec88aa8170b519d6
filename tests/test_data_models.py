"""Datasets (IDX reader, normalisation, label noise, landscapes) and the paper's models."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from nonlocal_opt.landscapes import Riemann
from nonlocal_opt.training.data import (
    FASHION_MNIST_DIR,
    DatasetNotFoundError,
    ImageDataset,
    LandscapeDataset,
    load_dataset,
    read_idx,
    with_label_noise,
)
from nonlocal_opt.training.models import LandscapeModel, build_model


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    """A 6-image Fashion-MNIST lookalike in IDX format: (directory, pixels, labels)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 28, 28))
    labels = np.array([0, 1, 2, 3, 4, 9])
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", pixels)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path, pixels, labels


def test_idx_files_are_read_and_normalised(tiny_fashion):
    directory, pixels, labels = tiny_fashion
    dataset = load_dataset("fashion-mnist", "test", data_dir=directory)
    assert len(dataset) == 6 and dataset.input_shape == (1, 28, 28) and dataset.num_classes == 10
    x, y = dataset[5]
    expected = (torch.tensor(pixels[5], dtype=torch.float32) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[0], expected)
    assert y == 9 and isinstance(y, int)
    np.testing.assert_array_equal(read_idx(directory / "train-labels-idx1-ubyte.gz"), labels)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_has_the_published_sizes_and_statistics():
    train = load_dataset("fashion-mnist", "train")
    assert len(train) == 60000 and len(load_dataset("fashion-mnist", "test")) == 10000
    assert abs(float(train.images.mean())) < 1e-2 and abs(float(train.images.std()) - 1) < 1e-2
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_missing_dataset_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "dataset-fashion-mnist" in str(info.value) and "--data-dir" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="--download"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="available: fashion-mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="choose one of: train, test"):
        load_dataset("fashion-mnist", split="val")
    with pytest.raises(ValueError, match="available: mlp"):
        build_model("resnet50", (1, 28, 28), 10)


def test_label_noise_flips_the_requested_fraction_to_other_classes_reproducibly():
    labels = torch.arange(20000) % 10
    dataset = ImageDataset(torch.zeros(20000, 1, 1, 1), labels, 10)
    noisy = with_label_noise(dataset, 0.3, seed=4)
    flipped = noisy.labels != labels
    assert abs(flipped.float().mean().item() - 0.3) < 0.015
    assert torch.equal(noisy.labels, with_label_noise(dataset, 0.3, seed=4).labels)
    assert not torch.equal(noisy.labels, with_label_noise(dataset, 0.3, seed=5).labels)
    # symmetric: a flipped label is uniform over the 9 other classes
    counts = torch.bincount((noisy.labels[flipped] - labels[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and (counts[1:].float() / counts[1:].sum() - 1 / 9).abs().max() < 0.02
    assert torch.equal(with_label_noise(dataset, 0.0, seed=0).labels, labels)


def test_landscape_dataset_and_model_give_f_of_theta():
    dataset = load_dataset("landscape:riemann")
    assert isinstance(dataset, LandscapeDataset) and dataset.input_shape == (1,)
    model = LandscapeModel("riemann", theta0=[0.7])
    x = torch.stack([dataset[i][0] for i in range(4)])
    k = torch.arange(1, 101, dtype=torch.float32)
    expected = (torch.sin(k**2 * 0.7) / k**2).sum()
    torch.testing.assert_close(model(x), expected.expand(4))
    assert isinstance(model.landscape, Riemann)


def count_layers(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_mlp_has_the_papers_784_256_256_10_layers():
    model = build_model("mlp", (1, 28, 28), 10)
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(256, 784), (256, 256), (10, 256)]
    assert sum(p.numel() for p in model.parameters()) == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


@pytest.mark.parametrize(
    ("name", "convs_on_main_path", "linears"),
    [("resnet6", 1 + 2 * 2, 1), ("resnet8", 1 + 2 * 3, 1), ("vgg9", 6, 3), ("logreg", 0, 1)],
)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_models_have_their_documented_depth_and_output_shape(name, convs_on_main_path, linears, shape):
    model = build_model(name, shape, 7)
    shortcut_convs = sum(
        isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()
    )
    assert count_layers(model, torch.nn.Conv2d) - shortcut_convs == convs_on_main_path
    assert count_layers(model, torch.nn.Linear) == linears
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_conv_models_reject_flat_inputs():
    with pytest.raises(ValueError, match="needs images"):
        build_model("resnet8", (1,), 10)
