"""User images laid out as ``root/<class name>/<image files>``, as float tensors in [-1, 1].

Class ids follow the sorted sub-folder names (torchvision's ImageFolder convention); hidden folders and
files are skipped, files are found recursively and filtered by extension. Images are resized to
``image_size`` (aspect ratio is not kept) with Lanczos filtering, which Pillow widens when downsampling,
so it also antialiases.

Mode rule: an image is accepted when its Pillow mode equals ``mode`` or converts to it without losing
information: "1" -> "L"; "1" / "L" -> "RGB"; palette "P" without transparency -> "RGB", and -> "L" when
every palette entry is grey. Everything else (RGBA, LA, CMYK, 16-bit, float, RGB -> "L", a colour palette
-> "L") is rejected with an error naming the file, its mode and the expected mode: convert such files
yourself, choosing how to drop alpha or map colours to grey.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from adaln.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MODES = {"L": 1, "RGB": 3}
LOSSLESS_SOURCES = {"L": ("L", "1"), "RGB": ("RGB", "L", "1")}


def _image_size(image_size: object) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)
    ):
        raise ValueError(f"image_size must be a positive int or (H, W) of positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _extensions(extensions: object) -> tuple[str, ...]:
    if isinstance(extensions, str) or not all(isinstance(e, str) and e for e in extensions):
        raise TypeError(f"extensions must be a sequence of suffixes like ('.png', '.jpg'), got {extensions!r}")
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def _lossless(img: Image.Image, mode: str) -> bool:
    """True when ``img`` converts to ``mode`` without losing information (see the module docstring)."""
    if img.mode in LOSSLESS_SOURCES[mode]:
        return True
    if img.mode != "P" or "transparency" in img.info or img.palette is None or img.palette.mode != "RGB":
        return False
    if mode == "RGB":
        return True
    rgb = np.asarray(img.getpalette("RGB"), dtype=np.int64).reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` -> (image float32 (C, H, W) in [-1, 1], class id int).

    Every file is opened once at construction (header only) so that unreadable files and unsupported
    modes fail immediately, with the offending path in the message.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int | tuple[int, int],
        mode: str = "L",
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        self.root = Path(root)
        self.image_size = _image_size(image_size)
        self.mode = mode
        self.extensions = _extensions(extensions)
        if not self.root.exists():
            raise DataError(f"image folder root {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"image folder root {self.root} is not a directory")
        self.classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            raise DataError(f"image folder root {self.root} has no class sub-folders (expected root/<class>/<image>)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        reserved = {os.path.realpath(p) for p in (self.root, *(self.root / c for c in self.classes))}
        for name in self.classes:
            files = self._image_files(self.root / name, reserved)
            if not files:
                raise DataError(
                    f"class folder {self.root / name} contains no images with extensions {self.extensions}"
                )
            for path in files:
                self._check_file(path)
                self.samples.append((path, self.class_to_idx[name]))

    def _image_files(self, folder: Path, reserved: set[str]) -> list[Path]:
        """The images under ``folder``. Symlinked folders are followed, but a real folder is read once in
        the whole data set, and never the root or another class's folder (``reserved``): a link back to
        an ancestor (a loop) or into another class would otherwise load images many times, or under the
        wrong label."""
        found, top = [], True
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            real = os.path.realpath(dirpath)
            if not top and real in reserved:
                dirnames[:] = []
                continue
            top = False
            reserved.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [
                Path(dirpath) / f
                for f in sorted(filenames)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in self.extensions
            ]
        return found

    def _check_file(self, path: Path) -> None:
        try:
            with warnings.catch_warnings():
                # Pillow only warns between MAX_IMAGE_PIXELS and twice that: a training image that large
                # is a mistake or a decompression bomb, so both are refused.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    ok, found = _lossless(img, self.mode), img.mode
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DataError(f"cannot read image {path}: {err}") from err
        if not ok:
            raise DataError(
                f"image {path} has mode {found!r}, which does not convert to mode {self.mode!r} without "
                f"loss; accepted source modes: {LOSSLESS_SOURCES[self.mode]}"
                + (" or a palette 'P' without transparency" if self.mode == "RGB" else " or a grey palette 'P'")
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.load_image(path), label

    def load_image(self, path: Path) -> Tensor:
        """Open, convert, resize and scale one file -> float32 (C, H, W) in [-1, 1]."""
        h, w = self.image_size
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
                if img.size != (w, h):
                    img = img.resize((w, h), resample=Image.Resampling.LANCZOS)
                pixels = np.asarray(img, dtype=np.float32)
        except (OSError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot decode image {path}: {err}") from err
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        # uint8 [0, 255] -> [-1, 1]; Pillow clips the resampled values to [0, 255] already.
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)) / 127.5 - 1.0)


def load_image_folder(
    root: str | os.PathLike,
    *,
    image_size: int | tuple[int, int],
    mode: str = "L",
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> tuple[Tensor, Tensor, list[str]]:
    """Load a whole (small) image folder: images float32 (N, C, H, W), labels int64 (N,), class names."""
    dataset = ImageFolderDataset(root, image_size=image_size, mode=mode, extensions=extensions)
    images = torch.stack([dataset.load_image(path) for path, _ in dataset.samples])
    labels = torch.tensor([label for _, label in dataset.samples], dtype=torch.int64)
    return images, labels, list(dataset.classes)
