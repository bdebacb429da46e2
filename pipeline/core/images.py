"""Decoding encoded image bytes into uint8 tensors, with a named reason for every bad record (no Ray)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from pipeline.errors import BadRecord


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without the host waiting: a CPU tensor bound for a GPU is copied from page-locked
    memory (from pageable memory, CUDA first waits for the work queued on the stream, i.e. the running step)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=True)


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
    # Imported on first use: ``import torchvision`` costs seconds (torch._dynamo), paid by every Ray process that
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
    return check_size(image, expected_hw, min_side)


def check_size(image: torch.Tensor, expected_hw: tuple[int, int] | None, min_side: int = 8) -> torch.Tensor:
    h, w = image.shape[-2:]
    if expected_hw is not None and (h, w) != tuple(expected_hw):
        raise BadRecord(f"wrong size {h}x{w}, the dataset's images are {expected_hw[0]}x{expected_hw[1]}")
    if min(h, w) < min_side:
        raise BadRecord(f"too small ({h}x{w} < {min_side} px)")
    return image


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_many(
    records: list, channels: int, expected_hw: tuple[int, int] | None, device: torch.device
) -> list[torch.Tensor | BadRecord]:
    """``decode`` for a batch of records, the images on ``device``; a record's BadRecord in its place.

    On a GPU the JPEGs are decoded there, in one batched nvJPEG call (``torchvision.io.decode_jpeg(device=
    "cuda")``): the host only reads bytes. If the batch call fails, each JPEG is tried alone on the GPU, and one
    that still fails (truncated, CMYK...) goes to :func:`decode` on the CPU, which converts what it can and names
    the reason for the rest (nvJPEG and libjpeg may disagree on a damaged file: a record is judged by whichever
    decoded it). If nvJPEG fails every JPEG of a batch, it is not used again in this process (one warning).
    Other formats, and everything on a CPU, go through :func:`decode`.
    """
    global _nvjpeg_broken
    out: list[torch.Tensor | BadRecord | None] = [None] * len(records)
    use_gpu = device.type == "cuda" and not _nvjpeg_broken
    on_gpu = [i for i, r in enumerate(records) if use_gpu and r is not None and r[:3] == JPEG_MAGIC]
    if on_gpu:
        images = _decode_jpegs_on_gpu([records[i] for i in on_gpu], channels, device)
        if all(image is None for image in images):
            _nvjpeg_broken = True
            warnings.warn("nvJPEG failed on every JPEG of a batch: decoding on the CPU from now on", stacklevel=2)
        for i, image in zip(on_gpu, images, strict=True):
            if image is not None:
                try:
                    out[i] = check_size(image, expected_hw)
                except BadRecord as exc:
                    out[i] = exc
    for i, record in enumerate(records):
        if out[i] is None:
            try:
                out[i] = to_device(decode(record, channels, expected_hw), device)
            except BadRecord as exc:
                out[i] = exc
    return out  # type: ignore[return-value]


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


_nvjpeg_broken = False


def _decode_jpegs_on_gpu(records: list, channels: int, device: torch.device) -> list[torch.Tensor | None]:
    """nvJPEG, batched; None for a JPEG it cannot decode.

    On a side stream: torchvision's CUDA decoder allocates its outputs on the current stream but writes them from
    its own stream without waiting for the work queued there, so memory the previous training step freed (and
    still reads) could be overwritten (pytorch/vision#9606). The side stream first waits for the current one,
    and the current stream waits for the decode before anything reads the images.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    buffers = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in records]
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg(buffers, mode=mode, device=device))
        except RuntimeError:  # one bad JPEG fails the batch: each alone
            images = [_decode_jpeg_or_none(decode_jpeg, buffer, mode, device) for buffer in buffers]
    current.wait_stream(side)
    for image in images:
        if image is not None:
            image.record_stream(current)  # allocated on the side stream, used on the current one
    return images


def _decode_jpeg_or_none(decode_jpeg, buffer: torch.Tensor, mode, device: torch.device) -> torch.Tensor | None:  # noqa: ANN001
    try:
        return decode_jpeg(buffer, mode=mode, device=device)
    except RuntimeError:
        return None  # decoded on the CPU instead
