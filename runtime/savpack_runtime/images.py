"""Open images safely and bring every file to the same RGB picture, for the builder and the runtime alike."""

from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageSizeError, InputError
from .files import check_file

# 8000 x 8000: far above what any vision tower resizes to, far below what would exhaust memory (a decompression
# bomb declares a huge size in a few bytes).
MAX_IMAGE_PIXELS = 64_000_000
# An uncompressed 8000 x 8000 RGBA picture is 256 MB; no image file within the pixel limit needs more.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageBytes:
    """An encoded image held in memory (a Parquet or `datasets` cell, an upload to the service); `name` says where it
    came from, for messages."""

    data: bytes = field(repr=False)
    name: str = field(compare=False)  # the same bytes are the same image wherever they came from

    def __str__(self) -> str:
        return self.name


ImageSource = Union[str, os.PathLike, ImageBytes]


def _opened(source: ImageSource) -> Image.Image:
    return Image.open(io.BytesIO(source.data) if isinstance(source, ImageBytes) else source)


@contextmanager
def _image_errors(path: ImageSource):
    """PIL's many failure types, as one InputError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSizeError(f"{path}: image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file PIL can read (empty, corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: image is corrupt or truncated: {exc}") from None


def check_image(path: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Cheap early check (header only): the file exists, PIL knows its format, its size is within the limit.

    Returns (width, height). Damage further inside the file shows when load_image decodes it.
    """
    if not isinstance(path, ImageBytes):
        path = Path(path)
        check_file(path, InputError, "image file", MAX_IMAGE_BYTES)
    with _image_errors(path), _opened(path) as opened:
        width, height = opened.size
    if width * height > max_pixels:
        raise ImageSizeError(f"{path}: image declares {width}x{height} pixels, more than the limit of {max_pixels}")
    return width, height


def load_image(path: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image (a file, or ImageBytes) as 8-bit RGB, upright as its EXIF orientation says; transparency is laid
    on white."""
    check_image(path, max_pixels)  # before decoding: a bomb must not be decoded at all
    with _image_errors(path), _opened(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float greys are scaled, alpha is composited on white.

    Transparency given as a key colour (`transparency` in the info of an RGB, L or P image) counts as alpha, as in the
    Hugging Face image processors' convert_to_rgb: the runtime's preprocessing must see the picture the builder sees.
    """
    has_key_colour = image.info.get("transparency") is not None
    if image.mode == "RGB" and not has_key_colour:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    if image.mode in ("P", "L", "RGB") and has_key_colour:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
