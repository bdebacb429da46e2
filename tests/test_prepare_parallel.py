"""`byol prepare` at cluster scale: shards written as Ray tasks are the same bytes as in one process, an image
folder on S3 is a source like a local one, and an interrupted prepare resumes, keeping the shards it finished."""

import json

import pyarrow.fs as pafs
import pytest

import pipeline.data.shard_jobs as shard_jobs
from pipeline.data.manifest import read_manifest, read_split_table
from pipeline.data.prepare import prepare
from pipeline.errors import DataError
from tests.imagegen import make_class_folder


def shard_digests(manifest: dict) -> dict[str, str]:
    return {s["path"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


def test_an_interrupted_prepare_resumes_keeping_its_finished_shards(tmp_path, monkeypatch):
    make_class_folder(tmp_path / "src", classes=3, per_class=8)
    (tmp_path / "src" / "class1" / "broken.png").write_bytes(b"\x89PNG not really")
    src, out = f"imagefolder:{tmp_path / 'src'}", str(tmp_path / "out")
    written: list[str] = []
    real = shard_jobs.write_shard

    def lost_at_the_fourth(out_, job, *args):
        if len(written) == 3:
            raise OSError("node lost")
        written.append(job.rel)
        return real(out_, job, *args)

    monkeypatch.setattr(shard_jobs, "write_shard", lost_at_the_fourth)
    with pytest.raises(OSError, match="node lost"):
        prepare(src, out, min_shards=4, parallel="off", log=lambda *a: None)
    assert not (tmp_path / "out" / "manifest.json").exists() and len(written) == 3
    finished = {rel: (tmp_path / "out" / rel).stat().st_mtime_ns for rel in written}

    monkeypatch.setattr(shard_jobs, "write_shard", real)
    with pytest.raises(DataError, match="--overwrite"):  # another plan (another split seed) is not mixed in
        prepare(src, out, min_shards=4, seed=1, parallel="off", log=lambda *a: None)
    lines: list[str] = []
    manifest = prepare(src, out, min_shards=4, parallel="off", log=lines.append)
    shards = len(manifest["splits"]["train"]["shards"]) + len(manifest["splits"]["val"]["shards"])
    resumed = f"3 of {shards} shards already written, {shards - 3} to go"
    assert any(line.startswith("[prepare] resuming") and resumed in line for line in lines), lines
    assert {rel: (tmp_path / "out" / rel).stat().st_mtime_ns for rel in written} == finished  # not rewritten
    assert not (tmp_path / "out" / shard_jobs.PROGRESS_DIR).exists()
    # the same manifest as one uninterrupted run (the skipped file counted once, in whichever shard held it)
    whole = prepare(src, str(tmp_path / "whole"), min_shards=4, parallel="off", log=lambda *a: None)
    assert shard_digests(manifest) == shard_digests(whole)
    for split in ("train", "val"):
        entry, expected = manifest["splits"][split], whole["splits"][split]
        assert {k: entry[k] for k in ("rows", "class_counts", "unreadable_skipped", "images")} == {
            k: expected[k] for k in ("rows", "class_counts", "unreadable_skipped", "images")
        }
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"] == 24


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ray_tasks_write_the_same_shards_from_a_folder_on_s3(ray_local, s3_endpoint, tmp_path):
    written = make_class_folder(tmp_path / "src", classes=3, per_class=12, size=36)
    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint)
    for rel, (data, _) in written.items():
        with s3.open_output_stream(f"byol-test/prepare-src/{rel}") as f:
            f.write(data)
    lines: list[str] = []
    local = prepare(f"imagefolder:{tmp_path / 'src'}", str(tmp_path / "local"), min_shards=4, parallel="off")
    source = "imagefolder:s3://byol-test/prepare-src"
    on_s3 = prepare(source, "s3://byol-test/prepared", min_shards=4, parallel="ray", log=lines.append)
    shards = len(shard_digests(on_s3))
    assert f"[prepare] {shards}/{shards} shards, 36/36 images" in "\n".join(lines), lines  # the progress line
    assert shard_digests(on_s3) == shard_digests(local)  # byte for byte: keys are paths under either folder
    assert on_s3["classes"] == local["classes"] == ["class0", "class1", "class2"]
    assert read_manifest("s3://byol-test/prepared") == json.loads(json.dumps(on_s3))
    assert read_split_table("s3://byol-test/prepared", "val").num_rows == local["splits"]["val"]["rows"] == 3
