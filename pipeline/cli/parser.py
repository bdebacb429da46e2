"""The ``byol`` argument parser (no command code: ``submit`` validates a job's arguments with it)."""

from __future__ import annotations

import argparse

VERBOSE_HELP = "Ray's own INFO lines on the console (worker group, checkpoints, Ray Data plans); also BYOL_VERBOSE=1"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    # Also after the command (`byol pretrain --verbose`, what a job runs); SUPPRESS keeps `byol --verbose pretrain`.
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.add_argument("--config", help="YAML config file (defaults for every key not in it)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key, e.g. --set optim.base_lr=0.3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byol", description="BYOL pretraining on Ray.")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="validate a config with its overrides and print the resolved result")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")

    p = sub.add_parser("prepare", help="write Parquet image shards (+ manifest) from an image collection")
    p.add_argument(
        "--source",
        required=True,
        help="fashion-mnist[:DIR] | imagefolder:PATH (PATH/<class>/<img> or flat) | cifar:PATH",
    )
    p.add_argument("--out", required=True, help="output folder or filesystem URI (s3://..., gs://...)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified labelled hold-out (default 0.1)")
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MB (default 64)")
    p.add_argument("--min-shards", type=int, default=8, help="at least this many shards per split (parallel reads)")
    p.add_argument("--row-group-rows", type=int, default=1024, help="Parquet row-group size (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    p.add_argument(
        "--parallel",
        choices=("auto", "ray", "off"),
        default="auto",
        help="write shards as Ray tasks (ray), in this process (off), or auto: Ray on a cluster (RAY_ADDRESS) or "
        "from 20,000 images on 4 or more cores. An interrupted prepare of the same source and settings resumes "
        "where it stopped.",
    )
    p.add_argument(
        "--on-bad-record",
        choices=("skip", "fail"),
        default="skip",
        help="unreadable image files: skip and count them (default; the first few are named) or stop",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary only")

    p = sub.add_parser("pretrain", help="BYOL pretraining on Ray Train (local Ray, or the cluster in RAY_ADDRESS)")
    _add_config_args(p)
    p.add_argument("--resume", metavar="CHECKPOINT_DIR", help="continue from a checkpoint (same schedules, same step)")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")

    p = sub.add_parser(
        "tune",
        help="search EMA (tau) and learning-rate schedules with Ray Tune, scored by val kNN top-1",
        description="A tune config is a pretraining config plus a tune: section (search space, searcher, "
        "scheduler); --set tune.num_samples=8 overrides the study, other keys the pretraining. Writes the best "
        "trial's config as YAML (runs with `byol pretrain --config`), a trials table and a plot, logged to MLflow.",
    )
    _add_config_args(p)
    p.add_argument(
        "--resume",
        metavar="STUDY_PATH",
        help="continue a study whose driver stopped: <run.storage_path>/<study name> (its config is kept there)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")

    p = sub.add_parser("demo", help="prepare Fashion-MNIST, pretrain on a local Ray (2 workers), evaluate on test")
    _add_config_args(p)
    p.set_defaults(config="configs/fashion_mnist_cpu.yaml")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "submit",
        help="run pretrain|tune|eval|embed|prepare|check as a Ray job on a cluster (uploads the project), stream logs",
        description="Uploads the project root (not the current directory; excludes data, runs, venvs, caches; "
        "refuses more than BYOL_SUBMIT_MAX_MB=100) and runs the job there. Only non-secret settings "
        "(MLFLOW_TRACKING_URI, AWS region...) are forwarded; credentials must come from the cluster. Token "
        "authentication: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token).",
    )
    p.add_argument("--address", help="job server, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    p.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream logs and exit with the job's status (default) or return after submitting",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="forward this environment variable's value to the job (repeatable). The value is stored in the "
        "job's runtime_env, readable by everyone with access to the cluster's job API: a warning is printed",
    )
    p.add_argument("--pip", action="append", metavar="PACKAGE", help="extra pip package for the job's runtime_env")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- pretrain|tune|eval|prepare ARGS... or -- check [NAME...]")

    p = sub.add_parser("jobs", help="list, inspect, read logs of or stop Ray jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="job server (default: RAY_ADDRESS)")

    _add_checkpoint_commands(sub)
    return parser


def _add_checkpoint_commands(sub) -> None:  # noqa: ANN001  (argparse's private subparsers action)
    """The commands that use a trained checkpoint: eval, embed, export."""
    p = sub.add_parser("eval", help="kNN and linear-probe top-1 of a checkpoint's online encoder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory")
    src.add_argument("--run", help="MLflow run id (its recorded checkpoint)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI for --run (default: MLFLOW_TRACKING_URI or runs/mlflow.db)"
    )
    p.add_argument("--data", required=True, help="prepared shards (labelled train + val/test splits)")
    p.add_argument("--splits", nargs="+", default=["val", "test"], help="splits to score (default: val test)")
    p.add_argument("--no-linear", action="store_true", help="kNN only")
    p.add_argument("--max-train-images", type=int, default=None, help="cap the labelled training images used")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "embed", help="L2-normalised embeddings of a dataset by a checkpoint's encoder (Ray Data on a cluster)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint path or URI")
    src.add_argument("--run", help="MLflow run id whose recorded checkpoint to use")
    p.add_argument("--tracking-uri", default=None, help="MLflow store of --run (default: MLFLOW_TRACKING_URI or runs/)")
    p.add_argument("--data", required=True, help="prepared shards (all splits unless --splits) or an image folder")
    p.add_argument("--splits", nargs="+", default=None)
    p.add_argument("--out", required=True, help="Parquet output (a folder of files): local path or s3://...")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--parallel",
        choices=["auto", "ray", "off"],
        default="auto",
        help="Ray Data batch inference (ray), this process (off), or auto: Ray Data on a cluster (RAY_ADDRESS) or "
        "with several GPUs here, else this process",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write a checkpoint's online backbone (state_dict or TorchScript)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--format",
        choices=["state_dict", "torchscript"],
        default="state_dict",
        help="state_dict: loads into the torchvision/timm model (the loading code is printed); torchscript: torch.jit",
    )
