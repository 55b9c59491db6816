"""Image inputs and outputs on numpy: decode and normalise encoded images, validate raw tensors.

Every model here takes float32 pixels in [0, 1] shaped [N, 1, 28, 28], light object on a dark
background, as Fashion-MNIST looks. Errors are :class:`InvalidInput` naming the request field.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.core.errors import InvalidInput

SIZE = 28
# Refuse decompression bombs early: far above any sensible input, far below what exhausts memory.
MAX_PIXELS = 40_000_000

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
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # Composite transparent images onto white, as they are usually displayed.
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA"))
            gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except InvalidInput:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise InvalidInput(field, f"cannot decode image bytes ({len(data)} bytes): {exc}") from None
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


def decode_images(images: list[bytes] | tuple[bytes, ...], field: str = "images", invert: bool = True) -> np.ndarray:
    """Decode encoded images into float32 [N, 1, 28, 28]."""
    out = np.empty((len(images), 1, SIZE, SIZE), dtype=np.float32)
    for i, data in enumerate(images):
        out[i, 0] = decode_image(data, f"{field}[{i}]", invert_light_background=invert)
    return out


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
    expected = int(np.prod(shape)) * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(f"{field}.data", f"has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if np_dtype == np.uint8:
        return array.astype(np.float32) * np.float32(1.0 / 255.0)
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
) -> np.ndarray:
    """A request's encoded images followed by its tensor rows, as float32 [N, 1, 28, 28].

    Counts are checked before anything is decoded, so an oversized request costs nothing.
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
