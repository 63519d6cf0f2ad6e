"""Input batches for activation statistics: seeded noise, scikit-learn's digits, or user files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsecnn.errors import SparseCNNError
from sparsecnn.models._memory import check_fits

__all__ = ["IMAGE_SUFFIXES", "load_input"]

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def _fit(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize (N, c, h, w) images in [0, 1] to ``shape`` = (C, H, W): bilinear resampling, and a
    one-channel image is replicated to C channels."""
    c, h, w = shape
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    if images.shape[1] != c:
        images = images.mean(dim=1, keepdim=True).expand(-1, c, -1, -1)
    return images.contiguous()


def _digits(shape: tuple[int, int, int], batch: int) -> torch.Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SparseCNNError(
            "--input digits needs scikit-learn; install it with pip install 'sparsecnn[data]'"
        ) from None
    images = load_digits().images  # (1797, 8, 8), values 0..16
    if batch > len(images):
        raise SparseCNNError(f"the digits data set has {len(images)} images; use a batch of at most that")
    _check_batch_fits(batch, shape)
    x = torch.from_numpy(images[:batch].astype(np.float32) / 16.0)[:, None]
    return _fit(x, shape)


def _pil_images(files: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise SparseCNNError(
                f"cannot read image {f} ({exc}); give a PNG/JPEG file or a folder of them"
            ) from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out.append(torch.from_numpy(np.ascontiguousarray(arr)))
    return _fit(torch.stack(out), shape)


def _npy(path: Path, shape: tuple[int, int, int], batch: int) -> torch.Tensor:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # read only the images used
    except (ValueError, OSError) as exc:
        raise SparseCNNError(
            f"cannot read {path} as a .npy array ({exc}); save one with numpy.save"
        ) from None
    if arr.ndim != 4 or tuple(arr.shape[1:]) != shape:
        raise SparseCNNError(
            f"{path} holds an array of shape {arr.shape}; the model needs (N, {', '.join(map(str, shape))})"
        )
    if arr.dtype.kind not in "iuf" or arr.shape[0] == 0:
        raise SparseCNNError(f"{path} must hold at least one image of real numbers, got dtype {arr.dtype}")
    _check_batch_fits(min(batch, arr.shape[0]), shape)
    arr = arr[:batch].astype(np.float32)
    if not np.isfinite(arr).all():
        raise SparseCNNError(f"{path} contains NaN or infinite values; clean the array first")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _check_batch_fits(n: int, shape: tuple[int, int, int]) -> None:
    # The batch, and one resized or converted copy of it.
    check_fits(2 * 4 * n * shape[0] * shape[1] * shape[2],
               f"an input batch of {n} images of {'x'.join(map(str, shape))}", "use a smaller batch")


def load_input(spec: str, shape: tuple[int, int, int], batch: int = 8, seed: int = 0) -> torch.Tensor:
    """A batch of inputs, shape (N, C, H, W) float32, for the model's input ``shape`` = (C, H, W).

    Parameters
    ----------
    spec : str
        ``"random"``: ``batch`` seeded N(0, 1) images. ``"digits"``: the first ``batch`` images of
        scikit-learn's ``load_digits`` scaled to [0, 1], resized bilinearly to (H, W) and replicated
        to C channels. A folder: its first ``batch`` images (sorted by name) read with Pillow; an image
        file: that one image; both scaled to [0, 1] and resized to (H, W). A ``.npy`` file: an array
        (N, C, H, W) of which the first ``batch`` images are used, unscaled.
    batch : int
        Number of images (fewer when a folder or array holds fewer).
    seed : int
        Seed of the generator for ``"random"``.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise SparseCNNError(f"batch must be a positive integer, got {batch!r}")
    if spec == "random":
        _check_batch_fits(batch, shape)
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *shape), generator=g)
    if spec == "digits":
        return _digits(shape, batch)
    path = Path(os.fspath(spec))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise SparseCNNError(
                f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); put images in it or use "
                f"--input random|digits"
            )
        _check_batch_fits(min(batch, len(files)), shape)
        return _pil_images(files[:batch], shape)
    if path.is_file():
        if path.suffix.lower() == ".npy":
            return _npy(path, shape, batch)
        return _pil_images([path], shape)
    raise SparseCNNError(
        f"input {spec!r} is not 'random', 'digits' or an existing image file, folder or .npy file"
    )
