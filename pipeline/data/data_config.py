"""A config's data keys resolved from the data it will read (no Ray): ``data.channels``, ``data.mean``,
``data.std`` and ``data.image_size`` left unset are taken from the train split's image statistics, and a value the
user set that contradicts the data is refused before any Ray resource starts.

The statistics come from the manifest ``byol prepare`` wrote (``splits.train.images``), or, for an image folder
given directly as ``data.path`` or a manifest written before they existed, from a seeded sample read now
(``pipeline.data.image_stats``). ``data.accept_mismatch: true`` lets a contradicting value through on purpose
(grayscale training of colour photos, say).
"""

from __future__ import annotations

from pipeline.config import Config, config_from_dict
from pipeline.core.storage import filesystem
from pipeline.data.image_stats import SAMPLE_SIZE, measure, sample_indices
from pipeline.data.manifest import iter_row_groups, read_manifest, sample_row_groups
from pipeline.data.read_units import list_units
from pipeline.errors import ConfigError, DataError

PHOTO_SIZE = 224  # data.image_size for photos at least this large (the usual ImageNet-style input)
MIN_SIZE, MAX_SIZE = 8, 1024  # data.image_size's bounds in the config


def resolve_data_config(cfg: Config) -> tuple[Config, str]:
    """(``cfg`` with every data key set, one line saying what was resolved and from what)."""
    stats, origin = train_image_stats(cfg.data.path)
    if "channels" not in stats:
        raise DataError(
            f"data.path {cfg.data.path}: no readable image in a sample of {stats.get('sampled', 0)}; "
            "check the files (or re-run `byol prepare`, which skips and names unreadable ones)"
        )
    data, notes = cfg.data, []
    channels = _resolve_channels(data, stats, notes)
    mean, std = _resolve_stats(data, stats, channels, notes)
    image_size = _resolve_image_size(data, stats, notes)
    resolved = cfg.model_copy(
        update={
            "data": data.model_copy(update={"channels": channels, "mean": mean, "std": std, "image_size": image_size})
        }
    )
    # the resolved values pass the config's own checks (errors name keys) and settle model.small_stem
    resolved = config_from_dict(resolved.model_dump())
    modes = ", ".join(f"{m} {n}" for m, n in stats["modes"].items())
    line = (
        f"data {cfg.data.path}: {stats['rows']} train images ({modes} in a sample of {stats['sampled']}; {origin}); "
        + "; ".join(notes)
    )
    return resolved, line


def _resolve_channels(data, stats: dict, notes: list[str]) -> int:
    found = stats["channels"]
    if data.channels is None:
        notes.append(f"data.channels={found} (the majority mode; other modes are converted)")
        return found
    if data.channels != found and not data.accept_mismatch:
        raise ConfigError(
            f"data.channels={data.channels} but data.path {data.path} holds {_kind(found)} images "
            f"({_modes(stats)}): remove data.channels to use {found}, or set data.accept_mismatch=true to train "
            f"with {data.channels} channel(s) on purpose"
        )
    notes.append(f"data.channels={data.channels} (set)")
    return data.channels


def _resolve_stats(data, stats: dict, channels: int, notes: list[str]) -> tuple[list[float], list[float]]:
    mean, std = stats["mean"], stats["std"]
    if len(mean) != channels:  # accept_mismatch across channel counts: the other count's statistics
        mean, std = ([sum(mean) / 3], [sum(std) / 3]) if channels == 1 else (mean * 3, std * 3)
    if data.mean is None or data.std is None:
        notes.append(f"data.mean={[round(m, 3) for m in mean]}, data.std={[round(s, 3) for s in std]} (measured)")
    return (data.mean if data.mean is not None else mean), (data.std if data.std is not None else std)


def _resolve_image_size(data, stats: dict, notes: list[str]) -> int:
    short = stats["short_side"]
    if data.image_size is None:
        size = PHOTO_SIZE if short["median"] >= PHOTO_SIZE else min(max(short["median"], MIN_SIZE), MAX_SIZE)
        why = f"images of at least {PHOTO_SIZE} px" if size == PHOTO_SIZE else "the median short side"
        notes.append(f"data.image_size={size} ({why})")
        return size
    if data.image_size > short["p95"] and not data.accept_mismatch:
        raise ConfigError(
            f"data.image_size={data.image_size} is larger than the short side of nearly every image in "
            f"data.path {data.path} (95% are at most {short['p95']} px, median {short['median']}): remove "
            f"data.image_size to use {min(short['median'], PHOTO_SIZE)}, or set data.accept_mismatch=true to "
            "upsample on purpose"
        )
    notes.append(f"data.image_size={data.image_size} (set)")
    return data.image_size


def _kind(channels: int) -> str:
    return "colour (3-channel)" if channels == 3 else "grayscale (1-channel)"


def _modes(stats: dict) -> str:
    return ", ".join(f"{n} {m}" for m, n in stats["modes"].items()) + f" of {stats['sampled']} sampled"


# ---------------------------------------------------------------------------------------------
# Where the statistics come from
# ---------------------------------------------------------------------------------------------


def train_image_stats(path: str) -> tuple[dict, str]:
    """(the train split's image statistics, where they came from)."""
    try:
        manifest = read_manifest(path)
    except DataError:
        return folder_stats(path), "measured on a sample of the folder now"
    train = manifest["splits"].get("train")
    if train is None:
        raise DataError(f"data.path {path}: the manifest has no train split; re-run `byol prepare`")
    if "images" in train:
        return train["images"], "from the manifest"
    print(
        f"[byol] {path}: the manifest has no image statistics (written by an older `byol prepare`): measuring a "
        "sample now; re-run `byol prepare` to store them",
        flush=True,
    )
    groups = sample_row_groups(path, "train", SAMPLE_SIZE)
    payloads = [
        b
        for table in iter_row_groups(path, groups, ["image"], skip_unreadable=True)
        for b in table.column(0).to_pylist()
    ]
    return measure(payloads, train["rows"]), "measured on a sample of the shards now"


def folder_stats(path: str) -> dict:
    """Statistics of a seeded sample of an image folder's files."""
    files = [f for unit in list_units(path) for f in unit.files]
    fs, _ = filesystem(path)

    def read(file: str) -> bytes:
        with fs.open_input_stream(file) as f:
            return f.read()

    return measure([read(files[i]) for i in sample_indices(len(files))], len(files))
