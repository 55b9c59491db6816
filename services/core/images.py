"""Image inputs and outputs on numpy: decode and normalise encoded images, validate raw tensors.

Every model here takes float32 pixels in [0, 1] shaped [N, 1, 28, 28], light object on a dark
background, as Fashion-MNIST looks. Errors are :class:`InvalidInput` naming the request field.
"""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.core.errors import InvalidInput, scrub
from services.core.settings import available_cpus

SIZE = 28
# Refuse decompression bombs early: far above any sensible input, far below what exhausts memory.
MAX_PIXELS = 40_000_000
# Longest side accepted. Pillow keeps a pointer and an allocation per row, so a 1 x 40M strip costs
# ~700 MB to decode however few pixels it has; no sensible input for a 28x28 model is that long.
MAX_SIDE = 16_384
# Default cap on the pixels one request may ask us to decode, summed over its images.
MAX_REQUEST_PIXELS = 64_000_000
# Images are scaled down to at most this side before padding and the final Lanczos resize, so
# the work after decoding is bounded whatever the size or aspect ratio (a 1 x 40M strip included),
# while images up to this size go through exactly the same path as before.
_WORK_SIDE = 512

T = TypeVar("T")
_decode_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _decode_pool
    if _decode_pool is None:
        # Bounded: decoding competes with inference for the same cores; more threads only queue.
        _decode_pool = ThreadPoolExecutor(max_workers=max(2, available_cpus()), thread_name_prefix="decode")
    return _decode_pool


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """Run CPU-bound request conversion (image decoding) in the bounded decode pool.

    Decoding a large PNG takes seconds; on the event loop it would stall every other call,
    health checks included.
    """
    return await asyncio.get_running_loop().run_in_executor(_pool(), function, *args)


_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class TensorInput:
    """A raw tensor as a request carried it: dtype name ('uint8' or 'float32'), shape and bytes."""

    dtype: str
    shape: list[int]
    data: bytes


def decode_image(data: bytes, field: str, size: int = SIZE, invert_light_background: bool = True) -> np.ndarray:
    """Decode one encoded image into float32 [size, size] in [0, 1].

    Grayscale; padded to a square with its own background colour and resized (Lanczos), so the
    aspect ratio is kept; inverted when its border is light, since the models saw light objects on
    dark backgrounds.
    """
    if not data:
        raise InvalidInput(field, "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise InvalidInput(field, f"image is {width}x{height}, over the limit of {MAX_PIXELS} pixels")
            if max(width, height) > MAX_SIDE:
                raise InvalidInput(field, f"image is {width}x{height}, a side over the limit of {MAX_SIDE} pixels")
            if image.format == "JPEG":
                # Let the JPEG decoder scale by 1/2..1/8 while decoding: far less memory and time.
                image.draft("L", (_WORK_SIDE, _WORK_SIDE))
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # Composite transparent images onto white, as they are usually displayed.
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA"))
            if image.mode != "L":
                image = image.convert("L")
            if max(image.size) > _WORK_SIDE:
                image = _shrink(image)
            gray = np.asarray(image, dtype=np.float32) / 255.0
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(field, f"{len(data)} bytes that are not an image in a format this server reads") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise InvalidInput(field, f"cannot decode image bytes ({len(data)} bytes): {scrub(str(exc))}") from None
    if gray.size == 0:
        raise InvalidInput(field, "image has no pixels")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if invert_light_background and background > 0.5:
        gray = 1.0 - gray
        background = 1.0 - background
    h, w = gray.shape
    if h != w:
        side = max(h, w)
        square = np.full((side, side), background, dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = gray
        gray = square
    if gray.shape != (size, size):
        resized = Image.fromarray((gray * 255.0).round().astype(np.uint8), mode="L").resize(
            (size, size), Image.Resampling.LANCZOS
        )
        gray = np.asarray(resized, dtype=np.float32) / 255.0
    return gray


def _shrink(image: Image.Image) -> Image.Image:
    """Scale so the longer side is ``_WORK_SIDE``, keeping the aspect ratio (each side at least 1)."""
    width, height = image.size
    scale = _WORK_SIDE / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def image_pixels(images: list[bytes] | tuple[bytes, ...], field: str, max_pixels: int) -> int:
    """Pixels the request's images would decode to, read from their headers only.

    Raises :class:`InvalidInput` once the sum passes ``max_pixels``, before anything is decoded.
    Headers that cannot be read are left for the decoder to report.
    """
    total = 0
    for i, data in enumerate(images):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                width, height = Image.open(io.BytesIO(data)).size
        except Exception:  # noqa: BLE001 - reported with a proper message when decoded
            continue
        total += width * height
        if total > max_pixels:
            raise InvalidInput(
                f"{field}[{i}]",
                f"the request's images add up to over {max_pixels} pixels (max_request_pixels); "
                "send fewer or smaller images",
            )
    return total


def decode_images(images: list[bytes] | tuple[bytes, ...], field: str = "images", invert: bool = True) -> np.ndarray:
    """Decode encoded images into float32 [N, 1, 28, 28]."""
    out = np.empty((len(images), 1, SIZE, SIZE), dtype=np.float32)
    for i, data in enumerate(images):
        out[i, 0] = decode_image(data, f"{field}[{i}]", invert_light_background=invert)
    return out


# uint8 pixel -> float32 in [0, 1]: a float32 multiply by the float32 nearest 1/255 (what a lookup
# table of those products holds, but about 4x faster than numpy's take on a 64-image tensor).
_UNIT = np.float32(1.0 / 255.0)


def tensor_to_images(dtype: str, shape: list[int] | tuple[int, ...], data: bytes, field: str = "tensor") -> np.ndarray:
    """Validate a raw image tensor and return float32 [N, 1, 28, 28] in [0, 1].

    Accepts shapes [28,28], [N,28,28] and [N,1,28,28]; uint8 (0-255) or float32 (0-1, finite).
    """
    np_dtype = _DTYPES.get(dtype)
    if np_dtype is None:
        raise InvalidInput(f"{field}.dtype", f"must be UINT8 or FLOAT32, got {dtype}")
    shape = [int(d) for d in shape]
    if len(shape) == 2:
        shape = [1, 1, *shape]
    elif len(shape) == 3:
        shape = [shape[0], 1, shape[1], shape[2]]
    if len(shape) != 4 or shape[1:] != [1, SIZE, SIZE] or shape[0] < 1:
        raise InvalidInput(
            f"{field}.shape", f"must be [N,{SIZE},{SIZE}] or [N,1,{SIZE},{SIZE}] with N >= 1, got {list(shape)}"
        )
    expected = math.prod(shape) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(f"{field}.data", f"has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if np_dtype == np.uint8:
        pixels = array.astype(np.float32)
        pixels *= _UNIT
        return pixels
    if not np.isfinite(array).all():
        raise InvalidInput(f"{field}.data", "contains NaN or infinity")
    if array.min() < 0.0 or array.max() > 1.0:
        raise InvalidInput(f"{field}.data", f"float32 pixels must be in [0, 1], got [{array.min():g}, {array.max():g}]")
    return array.astype(np.float32, copy=False)


def collect_images(
    images: list[bytes],
    tensor: TensorInput | None,
    max_images: int,
    images_field: str = "images",
    tensor_field: str = "tensor",
    invert: bool = True,
    max_pixels: int = MAX_REQUEST_PIXELS,
) -> np.ndarray:
    """A request's encoded images followed by its tensor rows, as float32 [N, 1, 28, 28].

    Counts and the images' total pixels are checked before anything is decoded, so an oversized
    request costs nothing.
    """
    tensor_rows = 0
    if tensor is not None:
        tensor_rows = int(tensor.shape[0]) if len(tensor.shape) > 2 else 1
        if tensor_rows < 1:
            raise InvalidInput(f"{tensor_field}.shape", f"first dimension must be >= 1, got {list(tensor.shape)}")
    count = len(images) + tensor_rows
    if count == 0:
        raise InvalidInput(images_field, f"the request has no images (set {images_field} or {tensor_field})")
    if count > max_images:
        raise InvalidInput(images_field, f"{count} images in one request, over the limit of {max_images}")
    parts = []
    if images:
        image_pixels(images, images_field, max_pixels)
        parts.append(decode_images(images, images_field, invert))
    if tensor is not None:
        parts.append(tensor_to_images(tensor.dtype, tensor.shape, tensor.data, tensor_field))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def encode_png(image: np.ndarray) -> bytes:
    """float32 [H, W] (or [1, H, W]) in [0, 1] -> 8-bit grayscale PNG bytes."""
    pixels = (np.clip(np.squeeze(image), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
