"""Decoding encoded image bytes into uint8 tensors, with a named reason for every bad record (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


class BadRecord(ValueError):
    """A record that cannot be used: undecodable, truncated, empty, too small or of the wrong size."""


def decode(
    data: bytes | bytearray | memoryview | np.ndarray,
    channels: int,
    expected_hw: tuple[int, int] | None = None,
    min_side: int = 8,
) -> torch.Tensor:
    """JPEG/PNG/GIF/WebP bytes -> uint8 [channels, H, W]. 16-bit images are scaled to 8 bits, CMYK to RGB.

    Raises :class:`BadRecord` with the reason; never returns a blank placeholder.
    """
    if data is None or len(data) == 0:
        raise BadRecord("empty record")
    # Imported on first use: ``import torchvision`` costs ~1.7 s (torch._dynamo), paid by every Ray process that
    # loads this module (the driver, Train's controller and workers) though only data tasks decode.
    from torchvision.io import ImageReadMode, decode_image

    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        image = decode_image(buffer, mode=mode)
    except (RuntimeError, ValueError) as exc:
        image = _decode_with_pil(bytes(data), channels, exc)
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) // 257).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise BadRecord(f"unsupported pixel type {image.dtype}")
    h, w = image.shape[-2:]
    if expected_hw is not None and (h, w) != tuple(expected_hw):
        raise BadRecord(f"wrong size {h}x{w}, the dataset's images are {expected_hw[0]}x{expected_hw[1]}")
    if min(h, w) < min_side:
        raise BadRecord(f"too small ({h}x{w} < {min_side} px)")
    return image


def _decode_with_pil(data: bytes, channels: int, first_error: Exception) -> torch.Tensor:
    """Formats torchvision does not read (BMP, TIFF...). Truncated files still fail: PIL is not lenient here."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            array = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except Exception as exc:  # PIL raises many types for garbage
        raise BadRecord(f"undecodable ({str(first_error).splitlines()[0][:120]})") from exc
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def encode_png(array: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, C] -> PNG bytes (lossless: raw arrays are stored this way)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
