"""The ``byol`` command line. Every command validates its config before any Ray resource starts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pipeline.cli.parser import build_parser
from pipeline.config import dump_config, load_config
from pipeline.errors import ConfigError, UserError


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2) if args.json else dump_config(cfg), end="" if not args.json else "\n")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import prepare

    manifest = prepare(
        args.source,
        args.out,
        val_fraction=args.val_fraction,
        shard_mb=args.shard_mb,
        min_shards=args.min_shards,
        row_group_rows=args.row_group_rows,
        overwrite=args.overwrite,
        seed=args.seed,
        on_bad_record=args.on_bad_record,
        parallel=args.parallel,
        log=(lambda *a: None) if args.json else print,
    )
    summary = {
        "out": args.out,
        "splits": {k: v["rows"] for k, v in manifest["splits"].items()},
        "classes": len(manifest["classes"]),
        "unreadable_skipped": {k: v["unreadable_skipped"]["count"] for k, v in manifest["splits"].items()},
    }
    print(json.dumps(summary) if args.json else f"wrote {args.out}/manifest.json: {summary['splits']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # validated before any Ray resource starts
    from pipeline.train import pretrain

    summary = pretrain(cfg, resume=args.resume)
    summary.pop("history", None)
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


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tune.space import load_study

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("byol tune --resume continues a study with its own config: leave out --config and --set")
        from pipeline.tune.study import resume_study

        summary = resume_study(args.resume)
    else:
        cfg, study = load_study(args.config, args.overrides) if args.config else (None, None)
        if cfg is None:
            raise ConfigError("byol tune needs --config (a pretraining config with a tune: section) or --resume")
        from pipeline.tune.study import run_study

        summary = run_study(cfg, study)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"best config: {summary['best_config']} (val kNN top-1 {summary['best_knn_top1']:.4f})")
        print(f"MLflow: parent run {summary['parent_run_id']} in {summary['tracking_uri']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluation.checkpoint_eval import evaluate_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint, args.run, args.tracking_uri)
    result = evaluate_checkpoint(
        checkpoint,
        args.data,
        splits=args.splits,
        linear=not args.no_linear,
        max_train_images=args.max_train_images,
        run_id=args.run,
        tracking_uri=args.tracking_uri,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for split, r in result["splits"].items():
            lin = f", linear probe {r['linear_top1']:.4f}" if "linear_top1" in r else ""
            print(f"{split}: kNN top-1 {r['knn_top1']:.4f}{lin} ({r['images']} images)")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from pipeline.evaluation.checkpoint_eval import resolve_checkpoint
    from pipeline.evaluation.embed import embed

    checkpoint = resolve_checkpoint(args.checkpoint, args.run, args.tracking_uri)
    summary = embed(checkpoint, args.data, args.out, args.splits, args.batch_size, args.parallel)
    print(
        json.dumps(summary)
        if args.json
        else f"wrote {summary['rows']} embeddings to {summary['out']} ({summary['skipped']} records skipped; "
        f"{summary['images_per_s']:.0f} images/s in {summary['where']})"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.core.export import export_backbone

    written = export_backbone(args.checkpoint, args.out, args.format)
    print(f"wrote {written['out']}")
    if written["loader"]:
        print(f"load it without byol-ray (also in {written['out']}.load.py):\n{written['loader']}", end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Prepare Fashion-MNIST if missing -> pretrain on a local Ray with 2 workers -> evaluate on test."""
    from pathlib import Path

    from pipeline.core.step import cpu_description

    cfg = load_config(args.config, ["train.num_workers=2", *args.overrides])
    # First: which kind of CPU this is; the README gives the demo's measured minutes on each kind.
    print(f"[demo] CPU: {cpu_description(cfg.train.precision)}", flush=True)
    from pipeline.data.prepare import prepare
    from pipeline.evaluation.checkpoint_eval import evaluate_checkpoint
    from pipeline.train import pretrain

    if not (Path(cfg.data.path) / "manifest.json").exists():
        print(f"[demo] preparing Fashion-MNIST shards in {cfg.data.path}", flush=True)
        prepare("fashion-mnist", cfg.data.path)
    start = time.time()
    summary = pretrain(cfg)
    summary.pop("history", None)
    minutes = (time.time() - start) / 60
    print(f"[demo] pretraining took {minutes:.1f} min; evaluating the online encoder on test", flush=True)
    result = evaluate_checkpoint(
        summary["checkpoint"],
        cfg.data.path,
        splits=["test"],
        run_id=summary["run_id"],
        tracking_uri=summary["tracking_uri"],
    )
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
    from pipeline.cli.submit import submit

    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not job:
        print(
            "byol submit: name the job after --, e.g. byol submit -- pretrain --config configs/x.yaml", file=sys.stderr
        )
        return 2
    return submit(args.address, job[0], job[1:], wait=args.wait, env_names=args.env, pip=args.pip or None)


def cmd_jobs(args: argparse.Namespace) -> int:
    from pipeline.cli.submit import jobs_command

    return jobs_command(args.address, args.action, args.job_id)


COMMANDS = {
    "config": cmd_config,
    "prepare": cmd_prepare,
    "pretrain": cmd_pretrain,
    "tune": cmd_tune,
    "demo": cmd_demo,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "eval": cmd_eval,
    "export": cmd_export,
    "embed": cmd_embed,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:  # read where Ray's loggers are set up (pipeline.train.cluster), here and in Ray's workers
        os.environ["BYOL_VERBOSE"] = "1"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"byol {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        # The last line names what went wrong and what to do: no traceback for errors with a message of their own.
        print(f"byol {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


# Commands whose process ends right after its output: everything they started (Ray, the MLflow run) is closed,
# and the interpreter's own teardown of torch, Ray and MLflow modules took seconds of a run's shut-down.
FAST_EXIT = {"pretrain", "demo"}


def run() -> None:
    """The ``byol`` console script (``main`` is for calling in-process)."""
    code = main()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in FAST_EXIT:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a cluster joined, not started, by us
            sys.modules["ray"].shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def is_user_error(err: Exception) -> bool:
    """Errors the user can fix (and files that cannot be read or written) end with one line, not a traceback."""
    return isinstance(err, UserError | OSError)


def one_line(err: Exception) -> str:
    text = str(err).strip()
    return text if "\n" not in text or isinstance(err, ConfigError) else " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
