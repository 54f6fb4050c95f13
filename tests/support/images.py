"""Small helpers shared by tests: images as bytes and base64."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_bytes(
    color: tuple[int, int, int] = (200, 30, 30),
    size: tuple[int, int] = (40, 40),
    seed: int | None = None,
    fmt: str = "PNG",
) -> bytes:
    if seed is None:
        image = Image.new("RGB", size, color)
    else:
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"
