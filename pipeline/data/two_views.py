"""The training stream's map, run in Ray Data tasks: a read unit's records -> decoded -> two augmented views.

A unit's rows come from its shard (or image files), or from the decoded cache once an earlier epoch has filled it
(``pipeline.data.ray_dataset.DecodedCache``); with ``data.decode=worker`` only the encoded bytes travel and the
training worker decodes them (``ray_dataset.decode_and_crop``). Imported only where the map runs
(``pipeline.data.execution.TwoViewBatches``), so the processes that merely load the stream's plan never import torch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import ray
import torch

from pipeline.config import Config
from pipeline.core.augment import TwoViewAugment, fresh_generator, random_resized_crop
from pipeline.core.images import decode
from pipeline.data.read_units import ReadUnit, read_records
from pipeline.errors import BadRecord


def two_view_batches(
    items: dict[str, np.ndarray],
    *,
    cfg: Config,
    units: list[ReadUnit],
    order: np.ndarray,
    expected_hw: tuple[int, int] | None,
    rows: int,
    cache: ray.actor.ActorHandle | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data map: stream item ids -> their unit's rows as two views, ``rows`` rows per output block."""
    for item in items["id"]:
        index = int(order[item])
        unit = units[index]
        cached = cached_unit(cache, index)
        if cached is not None:
            yield from views_from_cache(cached, rows, cfg)
            continue
        decoded_unit, keys_unit = [], []
        for encoded, keys in read_records(cfg.data.path, unit, rows):
            if cfg.data.decode == "worker":  # only bytes travel; the worker decodes, crops and checks them
                yield encoded_rows(encoded, keys, unit.name)
                continue
            decoded = decode_records(encoded, keys, unit, cfg, expected_hw)
            ok = np.array([d is not None for d in decoded], dtype=bool)
            yield two_views([d for d in decoded if d is not None], ok, keys, cfg)
            if cache is not None:
                decoded_unit += decoded
                keys_unit += keys
        if cache is not None:
            cache.add.remote(index, pack_unit(decoded_unit, keys_unit, cfg.data.channels))


def decode_records(
    images: list, keys: list[str], unit: ReadUnit, cfg: Config, expected_hw: tuple[int, int] | None
) -> list[torch.Tensor | None]:
    """Decoded images; None for a bad record under ``data.on_bad_record=skip``, an error naming it under ``fail``."""
    decoded: list[torch.Tensor | None] = []
    for data, key in zip(images, keys, strict=True):
        try:
            decoded.append(decode(data, cfg.data.channels, expected_hw))
        except BadRecord as exc:
            if cfg.data.on_bad_record == "fail":
                raise bad_record_error(exc, unit.name, key) from None
            decoded.append(None)  # counted and logged (first keys only) by the worker
    return decoded


def bad_record_error(reason: BadRecord, shard: str, key: str) -> BadRecord:
    """``data.on_bad_record=fail``: the error that stops the run, naming the record and what to do."""
    return BadRecord(
        f"bad record ({reason}) in shard {shard}, key {key}; re-run `byol prepare` for this data, "
        "or set data.on_bad_record=skip"
    )


def encoded_rows(encoded: list, keys: list[str], unit: str) -> dict[str, np.ndarray]:
    """data.decode=worker: a batch of records as read (``ok`` is decided where they are decoded; ``unit`` names
    the shard in an error under data.on_bad_record=fail)."""
    column = np.empty(len(encoded), dtype=object)
    column[:] = [bytes(e) if e is not None else b"" for e in encoded]
    n = len(encoded)
    return {
        "encoded": column,
        "ok": np.ones(n, dtype=bool),
        "key": np.asarray(keys).astype(str),
        "unit": np.full(n, unit),
    }


def cached_unit(cache: ray.actor.ActorHandle | None, index: int) -> dict | None:
    """A unit from the cache, or None: not cached (yet), or the cache is gone (its node or objects lost), in which
    case the unit is decoded again rather than the run stopped."""
    if cache is None:
        return None
    try:
        stored = ray.get(cache.get.remote(index))
        return ray.get(stored[0]) if stored else None
    except ray.exceptions.RayError:
        return None


def views_from_cache(arrays: dict, rows: int, cfg: Config) -> Iterator[dict[str, np.ndarray]]:
    """A cached unit (read-only views of the object store) as two-view blocks: only augmentation left to do."""
    for start in range(0, len(arrays["keys"]), rows):
        part = slice(start, start + rows)
        ok, images = arrays["ok"][part], arrays["images"][part]
        if isinstance(images, np.ndarray):  # one size: the good rows in one copy
            good = torch.from_numpy(images[ok])
        else:
            good = [torch.from_numpy(np.array(a)) for a, keep in zip(images, ok, strict=True) if keep]
        yield two_views(good, ok, arrays["keys"][part], cfg)


def two_views(
    good: torch.Tensor | list[torch.Tensor], ok: np.ndarray, keys: list[str], cfg: Config
) -> dict[str, np.ndarray]:
    """The decoded good images of a batch (uint8, a [n, C, H, W] tensor or a list) and which rows they are
    (``ok``: False for a bad record) -> the row batch the workers receive.

    augment.device=data: full augmentation here, float32 normalised views.
    augment.device=worker: crop here, uint8 views; colour/blur/solarize run on the training worker.
    """
    n, channels, size = len(ok), cfg.data.channels, cfg.data.image_size
    dtype = np.float32 if cfg.augment.device == "data" else np.uint8
    if len(good):
        images = torch.stack(good) if isinstance(good, list) and len({g.shape for g in good}) == 1 else good
        gen = fresh_generator()
        if cfg.augment.device == "data":
            v1, v2 = TwoViewAugment(cfg.augment, size, cfg.data.mean, cfg.data.std)(images, gen)
        else:
            v1 = random_resized_crop(images, size, cfg.augment, gen).mul_(255).round_().to(torch.uint8)
            v2 = random_resized_crop(images, size, cfg.augment, gen).mul_(255).round_().to(torch.uint8)
        if ok.all():  # the common case: the augmented arrays are the block as they are (no copy)
            return {"view1": v1.numpy(), "view2": v2.numpy(), "ok": ok, "key": np.asarray(keys).astype(str)}
    view1 = np.zeros((n, channels, size, size), dtype=dtype)  # bad rows: placeholders, dropped on the worker
    view2 = np.zeros_like(view1)
    if len(good):
        view1[ok], view2[ok] = v1.numpy(), v2.numpy()
    return {"view1": view1, "view2": view2, "ok": ok, "key": np.asarray(keys).astype(str)}


def pack_unit(decoded: list[torch.Tensor | None], keys: list[str], channels: int) -> dict:
    """A decoded unit as the cache keeps it: images (one uint8 [n, C, H, W] array when they share a size, else a
    list of [C, H, W]), ok (False: a bad record, its image a placeholder) and keys."""
    ok = np.array([d is not None for d in decoded], dtype=bool)
    shapes = {tuple(d.shape) for d in decoded if d is not None}
    blank = torch.zeros((channels, 1, 1), dtype=torch.uint8)
    if len(shapes) == 1:
        blank = torch.zeros(shapes.pop(), dtype=torch.uint8)
        images = torch.stack([d if d is not None else blank for d in decoded]).numpy()
    else:
        images = [(d if d is not None else blank).numpy() for d in decoded]
    return {"images": images, "ok": ok, "keys": keys}
