"""A video in a classify request: its frames (sent as images, or decoded from a video file with PyAV),
the frames a request samples from them, and the checks against ``TTA_MAX_FRAMES``.

A video is classified as one answer: its sampled frames are encoded and pooled (``pooling``: the mean
of their embeddings, or the max over their logits; ``server.engine.runner``). Adapting methods see the
clip through views made of temporal subsets under one spatial augmentation each
(``adapters.views.make_clip_views``).

Runs on the decode thread pool, never on the event loop.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from adapters import Method
from server.errors import InvalidInput
from server.service.decoding import ImageInput, decode_base64, decode_images

SAMPLINGS = ("segment", "uniform", "all")
POOLINGS = ("mean", "max")
DEFAULT_NUM_FRAMES = 8  # TSN-style clips: 8 segments


@dataclass(frozen=True)
class VideoInput:
    """A video as a caller sends it: ``frames`` (images, in time order) or ``file`` (a video file)."""

    frames: Sequence[ImageInput] | None = None
    file: bytes | str | None = None  # encoded bytes, or base64 / a data: URI
    num_frames: int | None = None  # frames to sample (default 8); ignored by sampling "all"
    sampling: str = "segment"
    pooling: str = "mean"


def sample_indices(available: int, num_frames: int, sampling: str) -> list[int]:
    """Which of ``available`` frames a clip of ``num_frames`` keeps, in time order.

    ``segment`` (TSN at test time): the centre frame of each of ``num_frames`` equal segments;
    ``uniform``: evenly spaced from the first frame to the last; ``all``: every frame. When fewer
    frames are available than asked for, every frame is kept.
    """
    if sampling == "all" or available <= num_frames:
        return list(range(available))
    if sampling == "segment":
        return [int((i + 0.5) * available / num_frames) for i in range(num_frames)]
    if num_frames == 1:
        return [available // 2]
    return [int(i * (available - 1) / (num_frames - 1) + 0.5) for i in range(num_frames)]  # halves round up


def clip_length(video: VideoInput, max_frames: int) -> int:
    """The frames a video request will encode, at most; checked before anything is decoded."""
    check_video(video, max_frames)
    if video.sampling == "all":
        return len(video.frames) if video.frames is not None else max_frames
    wanted = video.num_frames or DEFAULT_NUM_FRAMES
    return min(wanted, len(video.frames)) if video.frames is not None else wanted


def check_video(video: VideoInput, max_frames: int) -> None:
    """The request's shape against the limits: frames or a file, sampling and pooling known, counts."""
    if (video.frames is None) == (video.file is None):
        raise InvalidInput(
            "video: give frames (images in time order) or file (a video file), one of them", code="invalid_video"
        )
    if video.sampling not in SAMPLINGS:
        raise InvalidInput(f"video.sampling must be one of {', '.join(SAMPLINGS)}", code="invalid_video")
    if video.pooling not in POOLINGS:
        raise InvalidInput(f"video.pooling must be one of {', '.join(POOLINGS)}", code="invalid_video")
    if video.frames is not None:
        if not video.frames:
            raise InvalidInput("video.frames is empty: send at least one frame", code="no_images")
        if len(video.frames) > max_frames:
            raise InvalidInput(
                f"video has {len(video.frames)} frames; the limit is {max_frames} (TTA_MAX_FRAMES)",
                code="too_many_frames",
            )
    if video.num_frames is not None and not 1 <= video.num_frames <= max_frames:
        raise InvalidInput(
            f"video.num_frames={video.num_frames}; it must be between 1 and {max_frames} (TTA_MAX_FRAMES)",
            code="too_many_frames",
        )


def select_frames(
    video: VideoInput, max_frames: int, max_pixels: int, max_aspect_ratio: float = float("inf")
) -> list[ImageInput]:
    """The sampled frames: picked from those sent (only they are decoded later), or decoded from the file."""
    num_frames = video.num_frames or DEFAULT_NUM_FRAMES
    if video.frames is not None:
        frames = list(video.frames)
        return [frames[i] for i in sample_indices(len(frames), num_frames, video.sampling)]
    assert video.file is not None
    data = decode_base64(video.file, 0) if isinstance(video.file, str) else video.file
    return list(decode_video_file(data, num_frames, video.sampling, max_frames, max_pixels, max_aspect_ratio))


def decode_video_file(
    data: bytes,
    num_frames: int,
    sampling: str,
    max_frames: int,
    max_pixels: int,
    max_aspect_ratio: float = float("inf"),
) -> list[Image.Image]:
    """The sampled frames of a video file, as RGB images. Needs PyAV (``pip install 'ttaserve[video]'``).

    The packets are counted first (no decoding), the frames to keep chosen, then the stream decoded
    once, keeping only those: memory holds the sampled frames, whatever the video's length.
    """
    try:
        import av
    except ImportError as exc:
        raise InvalidInput(
            "this server cannot decode video files (PyAV is not installed: pip install 'ttaserve[video]'); "
            "send the frames as images instead",
            code="video_unsupported",
        ) from exc
    if not data:
        raise InvalidInput("the video file is empty (0 bytes)", code="invalid_video")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise InvalidInput("the video file has no video stream", code="invalid_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise InvalidInput(
                    f"the video's frames are {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                    "(TTA_MAX_IMAGE_PIXELS)",
                    code="image_too_large",
                )
            if width and height and max(width, height) > max_aspect_ratio * min(width, height):
                raise InvalidInput(
                    f"the video's frames are {width}x{height}; the limit is {max_aspect_ratio:g}:1 "
                    "(TTA_MAX_ASPECT_RATIO)",
                    code="extreme_aspect_ratio",
                )
            available = sum(1 for packet in container.demux(stream) if packet.size)
        if available == 0:
            raise InvalidInput("the video file holds no frames", code="invalid_video")
        if sampling == "all" and available > max_frames:
            raise InvalidInput(
                f"the video has {available} frames and sampling 'all' keeps them all; the limit is {max_frames} "
                "(TTA_MAX_FRAMES): use sampling 'segment' or 'uniform'",
                code="too_many_frames",
            )
        wanted = sample_indices(available, num_frames, sampling)
        kept: dict[int, Image.Image] = {}
        with av.open(io.BytesIO(data), mode="r") as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    kept[index] = Image.fromarray(frame.to_ndarray(format="rgb24"))
                if len(kept) == len(wanted):
                    break
    except InvalidInput:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise InvalidInput(f"the video file cannot be decoded: {exc}", code="invalid_video") from exc
    if not kept:
        raise InvalidInput("the video file holds no decodable frames", code="invalid_video")
    # A stream may decode fewer frames than it has packets; keep what it gave, in time order.
    return [kept[i] for i in sorted(kept)]


def check_video_method(method: Method[Any], video: VideoInput) -> None:
    """An adapting method takes a video when it adapts on view features: a clip's view is a pooled embedding."""
    if type(method).encode_views is not Method.encode_views:
        raise InvalidInput(
            f"method {method.name!r} re-runs the vision tower on each view's pixels, and a video's view is a "
            "pooled embedding of several frames; use zero_shot, tpt, ctpt, tps, zero or mta for video",
            code="video_unsupported",
        )
    if video.pooling != "mean":
        raise InvalidInput(
            f"video.pooling {video.pooling!r} takes the max over each frame's logits, which only zero_shot makes; "
            "adapting methods pool the frames' embeddings: use pooling 'mean'",
            code="invalid_video",
        )


def decode_video(
    video: VideoInput,
    max_frames: int,
    preprocess: Callable[[Image.Image], torch.Tensor],
    input_size: tuple[int, int],
    max_pixels: int,
    keep_originals: bool,
    max_aspect_ratio: float = float("inf"),
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``decode_images`` for a video's sampled frames: their base views [T, 3, h, w] and, to cut views
    from, one [T, 3, H0, W0] tensor of the frames (a clip's view crops all its frames alike)."""
    frames = select_frames(video, max_frames, max_pixels, max_aspect_ratio)
    images, originals = decode_images(frames, preprocess, input_size, max_pixels, keep_originals, max_aspect_ratio)
    if originals is None:
        return images, None
    sizes = sorted({(int(o.shape[-1]), int(o.shape[-2])) for o in originals})
    if len(sizes) > 1:
        raise InvalidInput(
            f"the video's frames differ in size ({', '.join(f'{w}x{h}' for w, h in sizes[:3])}); an adapting "
            "method crops every frame of a view alike: send frames of one size",
            code="invalid_video",
        )
    return images, [torch.stack(originals)]
