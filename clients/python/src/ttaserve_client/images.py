"""Images as the server takes them: bytes of an encoded file, from paths, bytes, PIL images or arrays.

Neither PIL nor numpy is imported: a PIL image encodes itself (``save``), and an array (anything with
``shape``, ``dtype`` and ``tobytes``: numpy, or torch on the CPU) is written as a PNG by the standard
library's zlib.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

ImageLike = Union[str, Path, bytes, Any]  # noqa: UP007 (`str | Any` fails at run time on Python 3.10); Any: PIL, arrays
# A video: a folder of frames or a video file (a path), a video file's bytes, or its frames in time order.
VideoLike = Union[str, Path, bytes, Sequence[ImageLike]]  # noqa: UP007 (as ImageLike)

# What a folder walk picks up; anything else in the folder is left alone.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def image_bytes(image: ImageLike) -> bytes:
    """The encoded bytes to upload for ``image``."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    if hasattr(image, "shape") and hasattr(image, "dtype"):
        return array_png(image)
    raise TypeError(f"cannot send {type(image).__name__} as an image: pass a path, bytes, a PIL image or a uint8 array")


def image_name(image: ImageLike, index: int) -> str:
    return Path(image).name if isinstance(image, (str, Path)) else f"image{index}.png"


def array_png(array: Any) -> bytes:
    """PNG bytes of a uint8 array shaped [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA)."""
    shape = tuple(int(n) for n in array.shape)
    if str(array.dtype) not in ("uint8", "torch.uint8"):
        raise TypeError(f"an image array must be uint8 (0-255), not {array.dtype}: convert it first")
    channels = 1 if len(shape) == 2 else shape[2] if len(shape) == 3 else 0
    if channels not in (1, 3, 4) or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], not {list(shape)}")
    height, width = shape[0], shape[1]
    raw = bytes(array.tobytes()) if not hasattr(array, "numpy") else bytes(array.contiguous().numpy().tobytes())
    stride = width * channels
    rows = b"".join(b"\x00" + raw[y * stride : (y + 1) * stride] for y in range(height))  # filter: none
    colour = {1: 0, 3: 2, 4: 6}[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def walk(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Image files among ``paths``, folders searched recursively, in a stable order."""
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")


def _natural(path: Path) -> list[Any]:
    """Sort key reading digit runs as numbers: frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def video_parts(video: VideoLike) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart files for one video: ``frame`` files (a folder of frames, in natural name order, or a
    sequence of frames) or one ``video`` file (a path or bytes)."""
    if isinstance(video, (str, Path)):
        path = Path(video)
        if path.is_dir():
            frames = sorted(walk([path]), key=_natural)
            if not frames:
                raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder {path}")
            return [("frame", (p.name, p.read_bytes(), "application/octet-stream")) for p in frames]
        if path.is_file():
            return [("video", (path.name, path.read_bytes(), "application/octet-stream"))]
        raise FileNotFoundError(f"no such file or folder: {path}")
    if isinstance(video, (bytes, bytearray, memoryview)):
        return [("video", ("video", bytes(video), "application/octet-stream"))]
    frames_ = list(video)
    if not frames_:
        raise ValueError("a video needs at least one frame")
    return [("frame", (image_name(f, i), image_bytes(f), "application/octet-stream")) for i, f in enumerate(frames_)]
