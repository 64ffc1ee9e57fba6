"""Digits loader (split, scaling) and image folders (layout, modes, resizing, errors)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits as sklearn_load_digits

from adaln.data import DIGITS_NUM_CLASSES, ImageFolderDataset, load_digits, load_image_folder
from adaln.data.digits import digits_split_indices
from adaln.errors import DataError

# ---------------------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_scaling():
    images, labels = load_digits("all")
    raw = sklearn_load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    # Independent float64 reference: [0, 16] -> [-1, 1] is x * 2 / 16 - 1.
    ref = torch.from_numpy(raw.images.astype(np.float64) * 2.0 / 16.0 - 1.0)
    assert torch.equal(images[:, 0].double(), ref)
    assert torch.equal(labels, torch.from_numpy(raw.target).long())
    assert images.min() == -1.0 and images.max() == 1.0


def test_digits_split_is_stratified_disjoint_and_stable():
    all_x, all_y = load_digits("all")
    train_idx, held_idx = digits_split_indices(all_y.numpy(), 0.2, 0)
    assert np.intersect1d(train_idx, held_idx).size == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, held_idx])), np.arange(all_y.shape[0]))
    train_x, train_y = load_digits("train")
    held_x, held_y = load_digits("heldout")
    assert torch.equal(train_x, all_x[train_idx]) and torch.equal(held_y, all_y[held_idx])
    assert abs(held_x.shape[0] / all_x.shape[0] - 0.2) < 0.01
    for c in range(DIGITS_NUM_CLASSES):
        n_c, n_held = int((all_y == c).sum()), int((held_y == c).sum())
        assert n_held > 0 and int((train_y == c).sum()) == n_c - n_held
        assert abs(n_held - 0.2 * n_c) <= 0.5
    again_x, again_y = load_digits("heldout")
    assert torch.equal(again_x, held_x) and torch.equal(again_y, held_y)
    other_x, _ = load_digits("heldout", seed=1)
    assert not torch.equal(other_x, held_x)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"split": "test"}, ValueError),
        ({"heldout_fraction": 0.0}, ValueError),
        ({"heldout_fraction": 1.0}, ValueError),
        ({"heldout_fraction": "0.2"}, TypeError),
    ],
)
def test_digits_bad_arguments(kwargs, error):
    split = kwargs.pop("split", "train")
    with pytest.raises(error, match="split|heldout_fraction"):
        load_digits(split, **kwargs)


# ----------------------------------------------------------------------------------------- image folder


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if mode is not None:
        img = img.convert(mode)
    img.save(path)
    return path


def test_image_folder_classes_labels_and_scaling(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    b = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    _save(tmp_path / "zebra" / "0.png", a)
    _save(tmp_path / "apple" / "x.png", b)
    _save(tmp_path / "apple" / "nested" / "y.png", a)
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    ds = ImageFolderDataset(tmp_path, image_size=(6, 5), mode="L")
    assert ds.classes == ["apple", "zebra"] and len(ds) == 3
    image, label = ds[0]
    assert label == 0 and image.shape == (1, 6, 5) and image.dtype == torch.float32
    # No resize needed: exact affine map of the uint8 pixels, checked against float64.
    assert torch.allclose(image[0].double(), torch.from_numpy(b.astype(np.float64) / 127.5 - 1.0), atol=1e-7)
    images, labels, classes = load_image_folder(tmp_path, image_size=(6, 5))
    assert images.shape == (3, 1, 6, 5) and labels.tolist() == [0, 0, 1] and classes == ["apple", "zebra"]
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0


def test_image_folder_resize_rgb_and_lossless_modes(tmp_path):
    rng = np.random.default_rng(1)
    _save(tmp_path / "a" / "grey.png", rng.integers(0, 256, (32, 20), dtype=np.uint8))
    _save(tmp_path / "a" / "bits.png", rng.integers(0, 2, (10, 10)) * 255, mode="1")
    _save(tmp_path / "b" / "rgb.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    _save(tmp_path / "b" / "pal.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), mode="P")
    images, labels, _ = load_image_folder(tmp_path, image_size=8, mode="RGB")
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1]
    # An L image loaded as RGB has three identical channels.
    grey = ImageFolderDataset(tmp_path, image_size=8, mode="RGB").load_image(tmp_path / "a" / "grey.png")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    # Resizing a constant image keeps the constant (a normalised filter).
    flat_file = _save(tmp_path / "flat" / "c" / "flat.png", np.full((30, 17), 200, dtype=np.uint8))
    flat = ImageFolderDataset(tmp_path / "flat", image_size=(4, 9), mode="L").load_image(flat_file)
    assert flat.shape == (1, 4, 9) and torch.allclose(flat, torch.full_like(flat, 200 / 127.5 - 1), atol=1e-6)


def test_image_folder_grey_palette_accepted_as_L(tmp_path):
    ramp = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _save(tmp_path / "a" / "p.png", ramp, mode="P")
    assert Image.open(tmp_path / "a" / "p.png").mode == "P"
    images, _, _ = load_image_folder(tmp_path, image_size=8, mode="L")
    assert torch.allclose(images[0, 0].double(), torch.from_numpy(ramp / 127.5 - 1.0), atol=1e-7)


@pytest.mark.parametrize("bad_mode, target", [("RGBA", "RGB"), ("CMYK", "RGB"), ("RGB", "L"), ("LA", "L")])
def test_image_folder_rejects_lossy_modes(tmp_path, bad_mode, target):
    _save(tmp_path / "ok" / "fine.png", np.zeros((4, 4, 3) if target == "RGB" else (4, 4)))
    bad = tmp_path / "ok" / ("bad.jpg" if bad_mode == "CMYK" else "bad.png")
    Image.new(bad_mode, (4, 4)).save(bad)
    with pytest.raises(ValueError, match=rf"bad\.(png|jpg).*mode '{bad_mode}'.*'{target}'"):
        ImageFolderDataset(tmp_path, image_size=4, mode=target)


def test_image_folder_errors_name_the_path(tmp_path):
    assert issubclass(DataError, ValueError)  # callers that caught ValueError still do
    with pytest.raises(DataError, match="missing.*does not exist"):
        ImageFolderDataset(tmp_path / "missing", image_size=8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="file.png is not a directory"):
        ImageFolderDataset(tmp_path / "file.png", image_size=8)
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path, image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no images"):
        ImageFolderDataset(tmp_path, image_size=8)
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_image_folder_link_back_to_an_ancestor_loads_each_image_once(tmp_path):
    _save(tmp_path / "a" / "one.png", np.zeros((4, 4)))
    _save(tmp_path / "a" / "sub" / "two.png", np.full((4, 4), 255))
    _save(tmp_path / "b" / "three.png", np.full((4, 4), 128))
    (tmp_path / "a" / "sub" / "up").symlink_to(tmp_path / "a", target_is_directory=True)  # sub/up -> a: a loop
    (tmp_path / "b" / "self").symlink_to(tmp_path / "b", target_is_directory=True)  # a class folder's own link
    ds = ImageFolderDataset(tmp_path, image_size=4, mode="L")
    assert ds.classes == ["a", "b"]
    assert sorted(p.name for p, _ in ds.samples) == ["one.png", "three.png", "two.png"]
    assert len({os.path.realpath(p) for p, _ in ds.samples}) == len(ds) == 3
    images, labels, _ = load_image_folder(tmp_path, image_size=4, mode="L")
    assert images.shape == (3, 1, 4, 4) and sorted(labels.tolist()) == [0, 0, 1]


def test_image_folder_class_link_to_its_parent_loads_each_image_once(tmp_path):
    _save(tmp_path / "a" / "one.png", np.zeros((4, 4)))
    _save(tmp_path / "b" / "two.png", np.full((4, 4), 255))
    (tmp_path / "a" / "parent").symlink_to(tmp_path, target_is_directory=True)  # a/parent -> root: a loop
    ds = ImageFolderDataset(tmp_path, image_size=4, mode="L")
    assert ds.classes == ["a", "b"]
    real = [(os.path.realpath(p), label) for p, label in ds.samples]
    assert sorted(real) == [(os.path.realpath(tmp_path / "a" / "one.png"), 0),
                            (os.path.realpath(tmp_path / "b" / "two.png"), 1)]


def test_image_over_the_pixel_limit_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    _save(tmp_path / "a" / "small.png", np.zeros((4, 4)))
    _save(tmp_path / "a" / "huge.png", np.zeros((40, 40)))  # 1,600 pixels
    ImageFolderDataset(tmp_path, image_size=4, mode="L")  # loads under Pillow's default limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above this, errors above twice it
    with pytest.raises(DataError, match=r"cannot read image .*huge\.png"):
        ImageFolderDataset(tmp_path, image_size=4, mode="L")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x over: Pillow's own DecompressionBombError
    with pytest.raises(DataError, match=r"cannot read image .*huge\.png"):
        ImageFolderDataset(tmp_path, image_size=4, mode="L")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image_size": 0}, ValueError, "image_size"),
        ({"image_size": (8,)}, ValueError, "image_size"),
        ({"image_size": 8.0}, ValueError, "image_size"),
        ({"image_size": 8, "mode": "RGBA"}, ValueError, "mode"),
        ({"image_size": 8, "extensions": ".png"}, TypeError, "extensions"),
    ],
)
def test_image_folder_bad_arguments(tmp_path, kwargs, error, match):
    _save(tmp_path / "a" / "x.png", np.zeros((4, 4)))
    with pytest.raises(error, match=match):
        ImageFolderDataset(tmp_path, **kwargs)
