"""Datasets: the fixed digits split and image folders read with Pillow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sparsecnn import data
from sparsecnn.cli import main
from sparsecnn.errors import SparseCNNError


def test_digits_fixed_split_scaled_to_unit_interval() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = data.digits()
    assert (len(d.train), len(d.test)) == (1347, 450)
    assert d.info.num_classes == 10 and d.info.in_channels == 1 and d.info.input_size == 8
    X, y = load_digits(return_X_y=True)
    _, X_te, _, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    xs, ys = d.test.tensors
    assert xs.shape == (450, 1, 8, 8) and xs.dtype == torch.float32
    np.testing.assert_allclose(xs.reshape(450, 64).numpy(), X_te / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ys.numpy(), y_te)
    xt, _ = d.train.tensors
    assert float(xt.min()) == 0.0 and float(xt.max()) == 1.0
    assert np.bincount(ys.numpy()).min() >= 43  # stratified: each class ~25% of its 174-183 images


def _write(path, size, mode, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, colour).save(path)


def test_image_folder_reads_resizes_and_labels(tmp_path) -> None:
    for i in range(4):
        _write(tmp_path / "cat" / f"{i}.png", (12, 12), "L", 10 + i)
        _write(tmp_path / "dog" / f"{i}.png", (20, 16), "L", 200 + i)  # other size: resized
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(tmp_path, size=8)
    assert ds.classes == ("cat", "dog") and len(ds) == 8 and ds.channels == 1
    x, label = ds[0]
    assert x.shape == (1, 8, 8) and label == 0
    assert float(x.max()) == pytest.approx(10 / 255, abs=1e-6)
    x, label = ds[7]
    assert label == 1 and float(x.mean()) == pytest.approx(203 / 255, abs=1e-6)
    assert data.ImageFolder(tmp_path).size == 12  # no size: the first image's (cat/0.png, square)
    _write(tmp_path / "wide" / "a" / "0.png", (20, 16), "L", 1)
    with pytest.raises(SparseCNNError, match="not square"):
        data.ImageFolder(tmp_path / "wide")


def test_image_folder_colour_and_split(tmp_path) -> None:
    for c in range(3):
        for i in range(4):
            _write(tmp_path / f"class{c}" / f"{i}.png", (10, 10), "RGB" if c == 2 else "L", 30 * c + i)
    splits = data.image_folder(tmp_path, size=6)
    assert splits.info.in_channels == 3  # one colour image makes the folder RGB
    assert (len(splits.train), len(splits.test)) == (9, 3)
    labels = sorted(int(splits.test[i][1]) for i in range(3))
    assert labels == [0, 1, 2]  # stratified
    x, _ = splits.train[0]
    assert x.shape == (3, 6, 6)
    grey = data.image_folder(tmp_path, size=6, channels=1)
    assert grey.train[0][0].shape == (1, 6, 6)


def test_image_folder_with_train_and_test_subfolders(tmp_path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _write(tmp_path / split / c / f"{i}.png", (8, 8), "L", i)
    s = data.load(str(tmp_path))
    assert (len(s.train), len(s.test)) == (6, 4) and s.info.classes == ("a", "b")
    _write(tmp_path / "test" / "zebra" / "0.png", (8, 8), "L", 0)
    with pytest.raises(SparseCNNError, match="zebra"):
        data.load(str(tmp_path))


def test_bad_folders_and_specs(tmp_path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(SparseCNNError, match="no images"):
        data.ImageFolder(tmp_path / "empty")
    with pytest.raises(SparseCNNError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing")
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "cat" / "x.png").write_bytes(b"not a png")
    with pytest.raises(SparseCNNError, match="cannot read image"):
        data.ImageFolder(tmp_path / "bad")
    for i in range(2):
        _write(tmp_path / "one" / "a" / f"{i}.png", (8, 8), "L", i)
    _write(tmp_path / "one" / "b" / "0.png", (8, 8), "L", 0)
    with pytest.raises(SparseCNNError, match="at least 2 images per class"):
        data.image_folder(tmp_path / "one")
    with pytest.raises(SparseCNNError, match="unknown dataset"):
        data.load("mnist")
    with pytest.raises(SparseCNNError, match="8x8"):
        data.load("digits", size=16)


def test_cli_trains_on_an_image_folder_and_rejects_an_empty_one(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(8):
            a = (rng.random((10, 10)) * 60 + (180 if c else 0)).astype(np.uint8)
            path = tmp_path / "imgs" / f"c{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a, "L").save(path)
    out = tmp_path / "run"
    assert main(["train", "lenet5", "--data", str(tmp_path / "imgs"), "--size", "8", "--epochs", "3",
                 "--lr", "0.02", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["build"] == {"num_classes": 2, "in_channels": 1, "input_size": 8}
    (tmp_path / "void" / "a").mkdir(parents=True)
    capsys.readouterr()
    assert main(["train", "lenet5", "--data", str(tmp_path / "void"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no images" in err
