"""The ``byol`` command line. Every command validates its config before any Ray resource starts."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.config import ConfigError, dump_config, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults for every key not in it)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key, e.g. --set optim.base_lr=0.3 (repeatable)",
    )


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2) if args.json else dump_config(cfg), end="" if not args.json else "\n")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.shards import PrepareError, prepare

    try:
        manifest = prepare(
            args.source,
            args.out,
            val_fraction=args.val_fraction,
            shard_mb=args.shard_mb,
            min_shards=args.min_shards,
            row_group_rows=args.row_group_rows,
            overwrite=args.overwrite,
            seed=args.seed,
            log=(lambda *a: None) if args.json else print,
        )
    except PrepareError as err:
        print(f"byol prepare: {err}", file=sys.stderr)
        return 2
    summary = {
        "out": args.out,
        "splits": {k: v["rows"] for k, v in manifest["splits"].items()},
        "classes": len(manifest["classes"]),
    }
    print(json.dumps(summary) if args.json else f"wrote {args.out}/manifest.json: {summary['splits']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # validated before any Ray resource starts
    from pipeline.train import pretrain

    summary = pretrain(cfg, resume=args.resume)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"run {summary['run_name']}: {summary['steps']} steps, kNN top-1 {summary['knn_top1']}")
        print(f"  checkpoint: {summary['checkpoint']}")
        print(f"  backbone:   {summary.get('backbone')}")
        print(
            f"  MLflow:     run {summary['run_id']} in {summary['tracking_uri']} (experiment {summary['experiment']})"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaljob import evaluate_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint, args.run, args.tracking_uri)
    result = evaluate_checkpoint(
        checkpoint, args.data, splits=args.splits, linear=not args.no_linear, max_train_images=args.max_train_images
    )
    if args.json:
        print(json.dumps(result))
    else:
        for split, r in result["splits"].items():
            lin = f", linear probe {r['linear_top1']:.4f}" if "linear_top1" in r else ""
            print(f"{split}: kNN top-1 {r['knn_top1']:.4f}{lin} ({r['images']} images)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.train import export_backbone

    out = export_backbone(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare Fashion-MNIST if missing -> pretrain on a local Ray with 2 workers -> evaluate on test."""
    from pathlib import Path

    cfg = load_config(args.config, ["train.num_workers=2", *args.overrides])
    from pipeline.evaljob import evaluate_checkpoint
    from pipeline.shards import prepare
    from pipeline.train import pretrain

    if not (Path(cfg.data.path) / "manifest.json").exists():
        print(f"[demo] preparing Fashion-MNIST shards in {cfg.data.path}", flush=True)
        prepare("fashion-mnist", cfg.data.path)
    start = time.time()
    summary = pretrain(cfg)
    minutes = (time.time() - start) / 60
    print(f"[demo] pretraining took {minutes:.1f} min; evaluating the online encoder on test", flush=True)
    result = evaluate_checkpoint(summary["checkpoint"], cfg.data.path, splits=["test"])
    test = result["splits"]["test"]
    summary.update(
        pretrain_minutes=round(minutes, 2), test_knn_top1=test["knn_top1"], test_linear_top1=test["linear_top1"]
    )
    print(
        json.dumps(summary, indent=2)
        if args.json
        else (
            f"\nFashion-MNIST test: kNN top-1 {test['knn_top1']:.4f}, linear probe {test['linear_top1']:.4f}\n"
            f"MLflow run:  {summary['run_id']}  (mlflow ui --backend-store-uri {summary['tracking_uri']})\n"
            f"backbone:    {summary.get('backbone')}\ncheckpoint:  {summary['checkpoint']}"
        )
    )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import submit

    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not job:
        print(
            "byol submit: name the job after --, e.g. byol submit -- pretrain --config configs/x.yaml", file=sys.stderr
        )
        return 2
    return submit(args.address, job[0], job[1:], wait=args.wait, env_names=args.env, pip=args.pip or None)


def cmd_jobs(args: argparse.Namespace) -> int:
    from pipeline.submit import jobs_command

    return jobs_command(args.address, args.action, args.job_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byol", description="BYOL pretraining on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="validate a config with its overrides and print the resolved result")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=cmd_config)

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
    p.add_argument("--json", action="store_true", help="print a JSON summary only")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="BYOL pretraining on Ray Train (local Ray, or the cluster in RAY_ADDRESS)")
    _add_config_args(p)
    p.add_argument("--resume", metavar="CHECKPOINT_DIR", help="continue from a checkpoint (same schedules, same step)")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="prepare Fashion-MNIST, pretrain on a local Ray (2 workers), evaluate on test")
    _add_config_args(p)
    p.set_defaults(config="configs/fashion_mnist_cpu.yaml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("submit", help="run pretrain|eval|prepare as a Ray job on a cluster, stream its logs")
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
        help="forward this environment variable's value to the job (repeatable; for secrets)",
    )
    p.add_argument("--pip", action="append", metavar="PACKAGE", help="extra pip package for the job's runtime_env")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- pretrain|eval|prepare ARGS...")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, read logs of or stop Ray jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="job server (default: RAY_ADDRESS)")
    p.set_defaults(func=cmd_jobs)

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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint's online backbone as a state_dict")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"byol {args.command}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # Errors with a clear message of their own (bad paths, unreachable cluster...) without a traceback.
        from pipeline.shards import PrepareError
        from pipeline.submit import SubmitError

        if isinstance(err, PrepareError | SubmitError | FileNotFoundError):
            print(f"byol {args.command}: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
