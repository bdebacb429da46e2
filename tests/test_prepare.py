import io
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli.main import main as cli
from pipeline.data.manifest import read_manifest, read_split_table
from pipeline.data.prepare import prepare
from pipeline.data.sources import load_fashion_mnist
from pipeline.errors import DataError
from tests.imagegen import make_class_folder, random_array

QUIET = dict(log=lambda *a: None)


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "shards"
    assert cli(["prepare", "--source", "fashion-mnist", "--out", str(out), "--json"]) == 0
    return out


def test_fashion_mnist_counts_add_up(fmnist_shards):
    m = read_manifest(str(fmnist_shards))
    assert sum(s["rows"] for s in m["splits"].values()) == 70_000
    assert m["splits"]["test"]["rows"] == 10_000 and m["splits"]["val"]["rows"] == 6_000
    assert len(m["classes"]) == 10
    for split in m["splits"].values():
        assert sum(split["class_counts"].values()) == split["rows"]
        assert sum(s["rows"] for s in split["shards"]) == split["rows"]
        assert len(split["shards"]) >= 8
    # stratified: each class is 10% of the val split
    assert set(m["splits"]["val"]["class_counts"].values()) == {600}


def test_fashion_mnist_pixels_and_labels_match_idx(fmnist_shards):
    idx = {s: load_fashion_mnist(split=s) for s in ("train", "test")}
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        table = read_split_table(str(fmnist_shards), split)
        rows = rng.choice(table.num_rows, size=200, replace=False)
        for r in rows:
            key = table["key"][int(r)].as_py()
            source_split, index = key.rsplit("-", 1)
            images, labels = idx[source_split]
            assert np.array_equal(decode_png(table["image"][int(r)].as_py()), images[int(index)]), key
            assert table["label"][int(r)].as_py() == labels[int(index)], key
    keys = [read_split_table(str(fmnist_shards), s, ["key"])["key"].to_pylist() for s in ("train", "val", "test")]
    assert len(set(keys[0]) | set(keys[1]) | set(keys[2])) == 70_000  # no key in two splits


def test_manifest_checksums_match_shards(fmnist_shards):
    import hashlib

    m = read_manifest(str(fmnist_shards))
    for shard in m["splits"]["val"]["shards"]:
        data = (fmnist_shards / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        assert pq.read_metadata(fmnist_shards / shard["path"]).num_rows == shard["rows"]


def test_imagefolder_round_trip_keeps_bytes(tmp_path):
    written = make_class_folder(tmp_path / "src", classes=3, per_class=10)
    m = prepare(f"imagefolder:{tmp_path / 'src'}", str(tmp_path / "out"), val_fraction=0.2, min_shards=2, **QUIET)
    assert m["classes"] == ["class0", "class1", "class2"]
    assert m["splits"]["train"]["rows"] == 24 and m["splits"]["val"]["rows"] == 6
    for split in ("train", "val"):
        for row in read_split_table(str(tmp_path / "out"), split).to_pylist():
            data, label = written[row["key"]]
            assert row["image"] == data and row["label"] == label  # JPEG/PNG bytes untouched


def test_flat_folder_has_no_labels(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(random_array(rng, 20, 20)).save(src / f"{i}.png")
    (src / "notes.txt").write_text("ignored")
    m = prepare(f"imagefolder:{src}", str(tmp_path / "out"), **QUIET)
    assert m["splits"]["train"]["unlabelled"] == 5 and "val" not in m["splits"]
    assert read_split_table(str(tmp_path / "out"), "train")["label"].null_count == 5


def test_cifar_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    batches = {}
    for name, n in [("data_batch_1", 20), ("data_batch_2", 20), ("test_batch", 10)]:
        batches[name] = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": list(rng.integers(0, 10, n)),
        }
        (src / name).write_bytes(pickle.dumps(batches[name]))
    (src / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    out = tmp_path / "out"
    m = prepare(f"cifar:{src}", str(out), val_fraction=0.0, **QUIET)
    assert m["splits"]["train"]["rows"] == 40 and m["splits"]["test"]["rows"] == 10
    assert m["image"] == {"height": 32, "width": 32, "mode": "RGB"}
    table = read_split_table(str(out), "test").to_pylist()
    for row in table:
        i = int(row["key"].rsplit("-", 1)[1])
        expected = batches["test_batch"]["data"][i].reshape(3, 32, 32).transpose(1, 2, 0)
        assert np.array_equal(decode_png(row["image"]), expected)
        assert row["label"] == batches["test_batch"]["labels"][i]


@pytest.mark.parametrize(
    "source, message",
    [
        ("imagefolder:{tmp}/missing", "not found"),
        ("imagefolder:{tmp}/empty", "no images"),
        ("cifar:{tmp}/empty", "no CIFAR"),
        ("fashion-mnist:{tmp}/empty", "missing"),
        ("mnist", "unknown source"),
    ],
)
def test_bad_sources_give_clear_errors(tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=message):
        prepare(source.format(tmp=tmp_path), str(tmp_path / "out"), **QUIET)


def test_refuses_existing_output_unless_overwrite(tmp_path):
    make_class_folder(tmp_path / "src", per_class=4)
    src, out = f"imagefolder:{tmp_path / 'src'}", str(tmp_path / "out")
    prepare(src, out, **QUIET)
    with pytest.raises(DataError, match="--overwrite"):
        prepare(src, out, **QUIET)
    assert cli(["prepare", "--source", src, "--out", out]) == 2
    prepare(src, out, overwrite=True, **QUIET)


def test_crash_midway_leaves_no_manifest(tmp_path, monkeypatch):
    import pipeline.data.shard_jobs as shards

    make_class_folder(tmp_path / "src", per_class=6)
    src, out = f"imagefolder:{tmp_path / 'src'}", str(tmp_path / "out")
    prepare(src, out, **QUIET)
    calls = {"n": 0}
    real = shards.write_shard

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", failing)
    with pytest.raises(OSError):
        prepare(src, out, overwrite=True, min_shards=4, **QUIET)
    assert not (tmp_path / "out" / "manifest.json").exists()  # the old one went first, no new one written


def test_cli_json_summary(tmp_path, capsys):
    make_class_folder(tmp_path / "src", per_class=4)
    assert cli(["prepare", "--source", f"imagefolder:{tmp_path / 'src'}", "--out", str(tmp_path / "o"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"] + summary["splits"].get("val", 0) == 12 and summary["classes"] == 3


def test_filesystem_uri_output(tmp_path):
    make_class_folder(tmp_path / "src", per_class=4)
    uri = f"file://{tmp_path / 'uri-out'}"
    m = prepare(f"imagefolder:{tmp_path / 'src'}", uri, val_fraction=0.25, **QUIET)
    assert (tmp_path / "uri-out" / "manifest.json").is_file()
    assert read_manifest(uri)["splits"]["train"]["rows"] == m["splits"]["train"]["rows"] == 9
    assert read_split_table(uri, "val").num_rows == 3


def test_unreadable_files_are_skipped_counted_and_named(tmp_path, capsys):
    make_class_folder(tmp_path / "src", per_class=4)
    (tmp_path / "src" / "class0" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "src" / "class1" / "empty.jpg").write_bytes(b"")
    src = f"imagefolder:{tmp_path / 'src'}"
    m = prepare(src, str(tmp_path / "out"), val_fraction=0.0)
    log = capsys.readouterr().out
    assert "skipped 2 unreadable image(s): class0/broken.png, class1/empty.jpg" in log
    assert m["splits"]["train"]["rows"] == 12
    skipped = m["splits"]["train"]["unreadable_skipped"]
    assert skipped == {"count": 2, "first": ["class0/broken.png", "class1/empty.jpg"]}
    keys = set(read_split_table(str(tmp_path / "out"), "train").column("key").to_pylist())
    assert "class0/broken.png" not in keys and len(keys) == 12
    with pytest.raises(DataError, match=r"unreadable image .*(broken\.png|empty\.jpg).*--on-bad-record skip"):
        prepare(src, str(tmp_path / "out2"), on_bad_record="fail", **QUIET)
    assert cli(["prepare", "--source", src, "--out", str(tmp_path / "out3"), "--on-bad-record", "fail"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "broken.png" in last or "empty.jpg" in last, last  # the first its shards met


def test_an_empty_class_folder_is_named(tmp_path):
    make_class_folder(tmp_path / "src", per_class=2)
    (tmp_path / "src" / "aaa_empty").mkdir()
    (tmp_path / "src" / "aaa_empty" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=r"class folder\(s\) aaa_empty in .* hold no images.*remove them"):
        prepare(f"imagefolder:{tmp_path / 'src'}", str(tmp_path / "out"), **QUIET)
