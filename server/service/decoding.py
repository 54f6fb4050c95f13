"""Turning what a caller sends into the model's inputs: bytes, base64 or PIL images to RGB images, their
base views, and (for methods that make augmented views) the decoded pixels, each kind of bad input
refused with its own error code.

Runs on the decode thread pool, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import InvalidInput

ImageInput = bytes | str | Image.Image  # encoded bytes, base64 / a data: URI, or an image decoded in-process

# Views are cropped from the image with its short side capped at this many times the model's input.
ORIGINAL_SIDE_FACTOR = 4

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


def decode_base64(text: str, index: int) -> bytes:
    """A base64 string or a ``data:`` URI to bytes; ``index`` names the image in error messages."""
    payload = text.strip()
    match = _DATA_URI.match(payload)
    if match:
        if not match.group("b64"):
            raise InvalidInput(f"images[{index}]: data: URIs must be base64-encoded", code="invalid_base64")
        payload = payload[match.end() :]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(
            f"images[{index}] is not valid base64 (nor a data: URI): {exc}", code="invalid_base64"
        ) from exc


def decode_image(data: bytes, index: int, max_pixels: int, max_aspect_ratio: float = float("inf")) -> Image.Image:
    """Bytes to an RGB PIL image, EXIF orientation applied; the first frame of animations."""
    name = f"image {index}"
    if not data:
        raise InvalidInput(f"{name} is empty (0 bytes)", code="empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InvalidInput(f"{name} is not an image in a format Pillow reads", code="invalid_image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(
            f"{name} is too large to decode ({exc}); the limit is {max_pixels} pixels (TTA_MAX_IMAGE_PIXELS)",
            code="image_too_large",
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"{name} cannot be read: {exc}", code="invalid_image") from exc
    width, height = image.size
    # Checked on the header, before any pixel is decoded: a tiny PNG can claim gigapixels.
    if width * height > max_pixels:
        raise InvalidInput(
            f"{name} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (TTA_MAX_IMAGE_PIXELS)",
            code="image_too_large",
        )
    if width == 0 or height == 0:
        raise InvalidInput(f"{name} has zero width or height", code="invalid_image")
    # Preprocessing resizes the short side to the model's input: a thin strip would grow by its aspect ratio.
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise InvalidInput(
            f"{name} is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):.0f}:1; "
            f"the limit is {max_aspect_ratio:g}:1 (TTA_MAX_ASPECT_RATIO)",
            code="extreme_aspect_ratio",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{name} is truncated or corrupt: {exc}", code="truncated_image") from exc
    # A malformed EXIF block should not sink an otherwise fine image.
    oriented: Image.Image = image
    with contextlib.suppress(Exception):
        oriented = ImageOps.exif_transpose(image) or image
    return oriented.convert("RGB")


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 tensor [3, H, W], the form augmented views are cropped from."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def decode_images(
    images: Sequence[ImageInput],
    preprocess: Callable[[Image.Image], torch.Tensor],
    input_size: tuple[int, int],
    max_pixels: int,
    keep_originals: bool,
    max_aspect_ratio: float = float("inf"),
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Decode, check and preprocess every image.

    Returns the base views [N, 3, H, W] (``preprocess`` of each) and, with ``keep_originals``, each
    decoded image as a uint8 tensor [3, H0, W0] to crop views from. A crop keeps at least 8% of the
    area, so capping the short side at four times the model's input loses no detail a view could show,
    and bounds the cost of a 40 MP upload.
    """
    tensors, originals = [], []
    cap = ORIGINAL_SIDE_FACTOR * max(input_size)
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            image = item.convert("RGB")
        else:
            data = decode_base64(item, i) if isinstance(item, str) else item
            image = decode_image(data, i, max_pixels, max_aspect_ratio)
        tensors.append(preprocess(image))
        if keep_originals:
            if min(image.size) > cap:
                scale = cap / min(image.size)
                image = image.resize(
                    (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
                )
            originals.append(to_uint8_tensor(image))  # [3, H0, W0]
    return torch.stack(tensors), (originals if keep_originals else None)
