"""Reading images and masks with errors that name the file, and atomic writes.

torch is imported inside the readers: plugins import this module when `wsss-domains domains`
only lists what they read, which must not load torch.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from torch import Tensor

Image.MAX_IMAGE_PIXELS = None  # whole-slide-sized tiles are legitimate input here


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(path, f"unreadable image ({exc})") from exc
    return image


# Single-channel modes holding more than 8 bits (PIL's convert("RGB") would clip them to white).
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def read_rgb(path: Path | str) -> Tensor:
    """An image file as float32 ``3xHxW`` in [0, 1].

    8-bit images of any mode (grey, palette, RGBA, CMYK, ...) go through PIL's RGB conversion;
    16-bit, 32-bit integer and float greyscale images are scaled from their own value range
    (minimum to maximum) to [0, 1] and repeated on three channels.
    """
    import torch

    image = _open(Path(path))
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            raise DataError(path, f"holds no finite pixel value (mode {image.mode})")
        lo, hi = float(finite.min()), float(finite.max())
        scaled = np.nan_to_num((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values), nan=0.0)
        grey = torch.from_numpy(scaled.astype(np.float32)).clamp_(0.0, 1.0)
        return grey[None].expand(3, -1, -1).contiguous()
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_index_mask(path: Path | str) -> Tensor:
    """A single-channel (palette or grey) mask as int64 ``HxW`` holding the stored indices."""
    import torch

    image = _open(Path(path))
    if image.mode not in ("P", "L", "I", "I;16", "1"):
        raise DataError(path, f"expected a palette or greyscale mask, got mode {image.mode}")
    return torch.from_numpy(np.asarray(image).astype(np.int64))


def read_color_mask(
    path: Path | str, colors: Mapping[tuple[int, int, int], int], unknown: int | None = None
) -> Tensor:
    """An RGB-coded mask mapped to class ids; unknown colours are an error unless ``unknown`` is set."""
    import torch

    rgb = np.asarray(_open(Path(path)).convert("RGB"), dtype=np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    out = np.full(code.shape, -1, dtype=np.int64)
    for (r, g, b), cls in colors.items():
        out[code == ((r << 16) | (g << 8) | b)] = cls
    missing = out < 0
    if missing.any():
        if unknown is None:
            y, x = np.argwhere(missing)[0]
            colour = tuple(int(v) for v in rgb[y, x])
            raise DataError(path, f"colour {colour} at ({int(y)}, {int(x)}) is not a known class colour")
        out[missing] = unknown
    return torch.from_numpy(out)


def read_mask(path: Path | str, colors: Mapping[tuple[int, int, int], int]) -> Tensor:
    """A mask stored either way datasets ship them: class ids in a palette / grey PNG, or an RGB
    rendering in the class colours (``colors`` maps each colour to its id)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
    except (OSError, SyntaxError) as exc:
        raise DataError(path, f"unreadable mask ({exc})") from exc
    if mode in ("RGB", "RGBA"):
        return read_color_mask(path, colors)
    return read_index_mask(path)


def check_same_size(image: Tensor, mask: Tensor, path: Path | str) -> None:
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        raise DataError(
            path, f"mask size {tuple(mask.shape[-2:])} does not match image size {tuple(image.shape[-2:])}"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


PART_SUFFIX = ".part"
# A temporary file younger than this may belong to a live writer on another machine sharing the folder.
STALE_PART_SECONDS = 600.0


def _part_prefix(path: Path) -> str:
    """Temporary names carry the writer's process id, so a later job can tell a dead writer's leftovers."""
    return f".{path.stem}.pid{os.getpid()}."


# Temporary files of atomic_write; a resumable raster's own ``.NAME.part`` does not match.
_ATOMIC_PART = re.compile(r"^\..*\.pid(\d+)\..*\.part$")


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_parts(folder: Path | str) -> int:
    """Delete the temporary files that killed writers left in ``folder`` (and its sub-folders).

    Only :func:`atomic_write`'s, whose writing process is gone and that are older than ten
    minutes: sharded jobs write into one folder at the same time, and a resumable raster's partial
    output is kept for its resume. Returns how many were removed.
    """
    removed = 0
    now = time.time()
    for part in Path(folder).rglob(f".*{PART_SUFFIX}"):
        match = _ATOMIC_PART.match(part.name)
        if match is None:
            continue
        try:
            old = now - part.stat().st_mtime > STALE_PART_SECONDS
        except FileNotFoundError:
            continue
        if old and not _writer_alive(int(match.group(1))):
            part.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def output_folder(path: Path | str) -> Iterator[Path]:
    """The folder a job writes into: created when absent, cleared of killed writers' temporary files.

    A job that fails before writing anything leaves no empty folder behind it (one it created).
    """
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(path)
    try:
        yield path
    except BaseException:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A killed process leaves either the old file or none, never half a file. The file gets the
    permissions of an ordinary new file under the user's umask (a temporary file is private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_part_prefix(path), suffix=path.suffix + PART_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_palette_png(path: Path | str, ids: np.ndarray, palette: list[int]) -> None:
    """Write class ids as a palette PNG, atomically."""
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(palette)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
