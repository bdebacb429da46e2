"""The ``byol`` command line. Every command validates its config before any Ray resource starts."""

from __future__ import annotations

import argparse
import json
import sys

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
        manifest = prepare(args.source, args.out, val_fraction=args.val_fraction, shard_mb=args.shard_mb,
                           min_shards=args.min_shards, row_group_rows=args.row_group_rows,
                           overwrite=args.overwrite, seed=args.seed,
                           log=(lambda *a: None) if args.json else print)
    except PrepareError as err:
        print(f"byol prepare: {err}", file=sys.stderr)
        return 2
    summary = {"out": args.out, "splits": {k: v["rows"] for k, v in manifest["splits"].items()},
               "classes": len(manifest["classes"])}
    print(json.dumps(summary) if args.json else f"wrote {args.out}/manifest.json: {summary['splits']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byol", description="BYOL pretraining on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="validate a config with its overrides and print the resolved result")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare", help="write Parquet image shards (+ manifest) from an image collection")
    p.add_argument("--source", required=True,
                   help="fashion-mnist[:DIR] | imagefolder:PATH (PATH/<class>/<img> or flat) | cifar:PATH")
    p.add_argument("--out", required=True, help="output folder or filesystem URI (s3://..., gs://...)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified labelled hold-out (default 0.1)")
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MB (default 64)")
    p.add_argument("--min-shards", type=int, default=8, help="at least this many shards per split (parallel reads)")
    p.add_argument("--row-group-rows", type=int, default=1024, help="Parquet row-group size (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    p.add_argument("--json", action="store_true", help="print a JSON summary only")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"byol {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
