"""Every shipped KubeRay RayJob runs its own command: its entrypoint and runtime env as written, submitted to a local
token-auth Ray head (conftest's ``ray_head``), in the order a user runs them (prepare, then the jobs that read what it
wrote).

What the test changes, and nothing else:
- ``working_dir``: the local project instead of the release archive (the image's installs are this venv);
- the PersistentVolumeClaim the prepare job mounts (``/data/photos``): a folder of generated RGB photos;
- object storage: a moto server on loopback, its endpoint and keys given as env vars (on Kubernetes the
  ``byol-secrets`` Secret puts the keys in every Ray container's environment); the MLflow server likewise;
- sizes: a few steps of a smaller network on CPU, appended as ``--set`` overrides after the manifest's own.
"""

import shlex
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from tests.imagegen import hue_classes

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "jobs" / "k8s"
BUCKET = "my-bucket"  # the manifests' placeholder bucket, created on the local S3
MOUNT = "/data/photos"  # the prepare job's PersistentVolumeClaim mount

CPU_SIZES = [  # the GPU configs scaled to seconds on CPU: a small CNN (its checkpoints go through a local S3 at every
    # report), few steps; the optimizer, schedules, data, storage and tracking settings are as shipped
    "model.backbone=small_cnn",
    "model.cnn_width=8",
    "train.use_gpu=false",
    "train.cpus_per_worker=1",
    "train.batch_size=16",
    "data.image_size=32",
    "model.proj_hidden=128",
    "model.pred_hidden=128",
    "eval.max_train_images=200",
    "eval.max_val_images=100",
    "checkpoint.every_steps=2",
]
SIZES = {
    "jobs/pretrain.py": [*CPU_SIZES, "train.num_workers=2", "train.max_steps=2"],
    "jobs/tune.py": [
        *CPU_SIZES,
        "train.epochs=1",
        "tune.num_samples=1",
        "tune.max_concurrent_trials=1",
        "tune.report_every_epochs=0.5",
        "tune.pbt.interval_epochs=0.5",
    ],
}


def rayjobs() -> dict[str, dict]:
    docs = {f.name: yaml.safe_load(f.read_text()) for f in sorted(MANIFESTS.glob("*.yaml"))}
    return {name: doc["spec"] for name, doc in docs.items() if doc["kind"] == "RayJob"}


def entrypoint_as_run(spec: dict, photos: Path) -> str:
    words = shlex.split(spec["entrypoint"].replace(MOUNT, str(photos)))
    assert words[0] == "python", spec["entrypoint"]
    for override in SIZES.get(words[1], []):
        words += ["--set", override]
    return shlex.join(words)


def runtime_env_as_run(spec: dict, env_vars: dict[str, str]) -> dict:
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].startswith("https://"), runtime_env  # a pinned archive on a real cluster
    runtime_env["working_dir"] = str(ROOT)
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
    return runtime_env


def wait_for(client, job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMED OUT"


def data_paths(spec: dict) -> list[str]:
    """The shards a training or tuning job reads: its config's data.path after the entrypoint's overrides."""
    from pipeline.config import load_config

    words = shlex.split(spec["entrypoint"])
    if words[1] == "jobs/prepare.py":
        return []
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    if words[1] == "jobs/tune.py":
        from pipeline.tune.space import load_study

        cfg, _ = load_study(ROOT / words[words.index("--config") + 1], sets)
    else:
        cfg = load_config(ROOT / words[words.index("--config") + 1], sets)
    return [cfg.data.path]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_each_rayjob_runs_its_own_entrypoint_and_runtime_env(ray_head, s3_endpoint, tmp_path):
    import mlflow
    from ray.job_submission import JobSubmissionClient

    address, token = ray_head
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    photos = hue_classes(tmp_path / "photos", per_class=30, height=40, width=40)  # kNN can tell the classes apart
    env_vars = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    tracking = {name: f"sqlite:///{tmp_path / name}.db" for name in ("prepare", "pretrain", "tune")}  # one per job
    jobs = rayjobs()
    assert set(jobs) == {"rayjob-prepare.yaml", "rayjob-imagenet-resnet50.yaml", "rayjob-tune-cifar10.yaml"}

    def submit(spec: dict) -> str:
        script = shlex.split(spec["entrypoint"])[1]  # jobs/<name>.py
        tracking_uri = tracking[Path(script).stem]
        return client.submit_job(
            entrypoint=entrypoint_as_run(spec, photos),
            runtime_env=runtime_env_as_run(spec, {**env_vars, "MLFLOW_TRACKING_URI": tracking_uri}),
            entrypoint_num_cpus=spec.get("entrypointNumCpus", 0),
        )

    def succeeded(name: str, job_id: str) -> None:
        status = wait_for(client, job_id, timeout=300)
        assert status == "SUCCEEDED", f"{name}: {status}\n{client.get_job_logs(job_id)[-4000:]}"
        info = client.get_job_info(job_id)
        print(f"{name}: {(info.end_time - info.start_time) / 1000:.0f} s")

    # prepare first: the others read its shards (copied to where each job's config reads them)
    succeeded("rayjob-prepare.yaml", submit(jobs["rayjob-prepare.yaml"]))
    words = shlex.split(jobs["rayjob-prepare.yaml"]["entrypoint"])
    prepared = words[words.index("--out") + 1].removeprefix("s3://")
    assert s3.get_file_info(f"{prepared}/manifest.json").type == pafs.FileType.File
    readers = {name: spec for name, spec in jobs.items() if name != "rayjob-prepare.yaml"}
    for name, spec in readers.items():
        for path in data_paths(spec):
            assert path.startswith(f"s3://{BUCKET}/"), (name, path)
            pafs.copy_files(prepared, path.removeprefix("s3://"), source_filesystem=s3, destination_filesystem=s3)
    submitted = {name: submit(spec) for name, spec in readers.items()}  # side by side, as on one cluster
    for name, job_id in submitted.items():
        succeeded(name, job_id)

    # what the training and tuning jobs left on object storage and in MLflow
    runs = s3.get_file_info(pafs.FileSelector(f"{BUCKET}/byol-runs", recursive=True))
    assert any(info.path.endswith("state.pt") for info in runs), [i.path for i in runs][:20]
    pretrain_runs = mlflow.MlflowClient(tracking_uri=tracking["pretrain"]).search_runs(
        [mlflow.MlflowClient(tracking_uri=tracking["pretrain"]).get_experiment_by_name("byol-imagenet").experiment_id]
    )
    assert [r.info.status for r in pretrain_runs] == ["FINISHED"]
    study = mlflow.MlflowClient(tracking_uri=tracking["tune"])
    study_runs = study.search_runs([study.get_experiment_by_name("byol-tune-cifar10").experiment_id])
    parents = [r for r in study_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(study_runs) == 2  # the parent and the trial's nested run
