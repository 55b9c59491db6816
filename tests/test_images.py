"""Image decoding and raw-tensor validation (services/core/images.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.core.errors import InvalidInput
from services.core.images import decode_image, encode_png, tensor_to_images


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_png_round_trip_is_lossless_at_28x28() -> None:
    pixels = np.random.default_rng(0).integers(0, 100, size=(28, 28)).astype(np.uint8)
    pixels[8:20, 8:20] = 240
    decoded = decode_image(encode_png(pixels.astype(np.float32) / 255.0), "x")
    np.testing.assert_array_equal((decoded * 255).round().astype(np.uint8), pixels)


def test_light_background_is_inverted_and_aspect_ratio_kept() -> None:
    page = Image.new("L", (200, 100), 255)  # wide, white page with a black square in the middle
    page.paste(0, (75, 25, 125, 75))
    decoded = decode_image(encoded(page), "x")
    assert decoded.shape == (28, 28)
    assert decoded[0, 0] < 0.05 and decoded[14, 14] > 0.95  # inverted: dark background, light object
    # padded to a square: the 2:1 page becomes a 28x14 band of background in the middle rows only
    assert decoded[:6].max() < 0.05 and decoded[-6:].max() < 0.05


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "1", "CMYK"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_any_mode_and_format_decodes(mode: str, fmt: str) -> None:
    image = Image.new("RGB", (40, 30), (10, 10, 10)).convert(mode)
    try:
        data = encoded(image, fmt)
    except (OSError, KeyError, ValueError):
        pytest.skip(f"PIL cannot write {mode} as {fmt}")
    decoded = decode_image(data, "x")
    assert decoded.shape == (28, 28) and decoded.dtype == np.float32
    assert 0.0 <= decoded.min() <= decoded.max() <= 1.0


def test_decompression_bomb_is_refused() -> None:
    data = encoded(Image.new("1", (7_000, 7_000)))  # 49M pixels: tiny file, huge bitmap
    with pytest.raises(InvalidInput, match="over the limit"):
        decode_image(data, "images[3]")


@pytest.mark.parametrize(
    "dtype, shape, data, message",
    [
        ("int16", [28, 28], bytes(1568), "tensor.dtype"),
        ("uint8", [27, 28], bytes(756), "tensor.shape"),
        ("uint8", [2, 2, 28, 28], bytes(3136), "tensor.shape"),
        ("uint8", [2, 28, 28], bytes(10), "tensor.data: has 10 bytes"),
    ],
)
def test_tensor_errors_name_the_field(dtype: str, shape: list[int], data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace(".", r"\.")):
        tensor_to_images(dtype, shape, data)


def test_tensor_shapes_are_normalised() -> None:
    one = tensor_to_images("uint8", [28, 28], bytes(784))
    many = tensor_to_images("float32", [3, 28, 28], np.full((3, 28, 28), 0.5, np.float32).tobytes())
    assert one.shape == (1, 1, 28, 28) and many.shape == (3, 1, 28, 28)
    assert many.dtype == np.float32 and float(many.max()) == 0.5


def test_uint8_pixels_become_the_float32_nearest_their_value_over_255() -> None:
    pixels = np.resize(np.arange(256, dtype=np.uint8), (2, 28, 28))
    unit = tensor_to_images("uint8", [2, 28, 28], pixels.tobytes())
    assert unit.dtype == np.float32 and unit.flags.writeable
    # float32(v) * float32(1/255) is within one float32 step (at 1.0) of v / 255 for every byte value
    exact = np.arange(256, dtype=np.float64) / 255.0
    error = np.abs(unit.ravel()[:256].astype(np.float64) - exact)
    assert float(error.max()) <= float(np.spacing(np.float32(1.0))), error.max()
    assert unit.ravel()[0] == 0.0 and unit.ravel()[255] == 1.0
