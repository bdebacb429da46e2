"""What a finished study leaves: the trials table (console, CSV, ``--json``), the best trial's config as YAML
(it runs with ``byol pretrain --config``) and a plot of kNN against tau and the learning rate, written next to the
study and into its parent MLflow run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.config import Config, dump_config
from pipeline.core.storage import join_location, upload_file
from pipeline.errors import StudyError
from pipeline.tracking import Tracker
from pipeline.tune.monitor import StudyMonitor
from pipeline.tune.space import METRIC, TuneSection, trial_config

TABLE_COLUMNS = ("trial", "tau_base", "tau_schedule", "base_lr", "warmup_epochs", "lr_schedule", METRIC, "status")


def summarize(
    cfg: Config, study: TuneSection, monitor: StudyMonitor, staging: Path, name: str, parent: Tracker
) -> dict[str, Any]:
    """The trials table, the best trial's config as YAML, a plot: written next to the study and to MLflow."""
    rows = []
    for trial_id, row in monitor.rows.items():
        tcfg = trial_config(cfg, monitor.params.get(trial_id, {}))
        rows.append(
            {
                "trial": trial_id,
                "tau_base": tcfg.ema.tau_base,
                "tau_schedule": tcfg.ema.schedule,
                "base_lr": tcfg.optim.base_lr,
                "warmup_epochs": tcfg.optim.warmup_epochs,
                "lr_schedule": tcfg.optim.lr_schedule,
                METRIC: row.get(METRIC),
                "status": row.get("status", "unknown"),
                "epochs": row.get("epoch"),
                "why": row.get("why", ""),
                "exploits": ", ".join(row.get("exploits", [])),
                "values": monitor.values(trial_id),
                "reports": row.get("reports", []),
            }
        )
    usable = [r for r in rows if r[METRIC] is not None and r["status"] not in ("collapsed", "failed")]
    if not usable:
        raise StudyError(
            f"no trial of study {name} produced a usable representation: "
            + "; ".join(f"{r['trial']} {r['status']} {r['why']}".strip() for r in rows)
        )
    best = max(usable, key=lambda r: r[METRIC])
    best_cfg = trial_config(cfg, monitor.params[best["trial"]])
    study_dir = join_location(cfg.run.storage_path, name)

    def publish(local: Path) -> str:
        parent.log_artifact(local)
        return upload_file(local, join_location(study_dir, local.name))

    (staging / "best_config.yaml").write_text(
        f"# byol tune study {name}: best trial {best['trial']}, val kNN top-1 {best[METRIC]:.4f}\n"
        + dump_config(best_cfg)
    )
    best_config = publish(staging / "best_config.yaml")
    with open(staging / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k not in ("values", "reports")])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k not in ("values", "reports")} for r in rows)
    publish(staging / "trials.csv")
    if plot_study(rows, staging / "knn_vs_tau_lr.png"):
        publish(staging / "knn_vs_tau_lr.png")
    parent.set_tag("tune.best_trial", best["trial"])
    return {
        "study": name,
        "best_trial": best["trial"],
        "best_knn_top1": best[METRIC],
        "best_values": best["values"],
        "best_config": best_config,
        "trials": rows,
    }


def plot_study(rows: list[dict[str, Any]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r[METRIC] is not None]
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours = {"finished": "tab:green", "exploited": "tab:blue", "collapsed": "tab:red"}
    for ax, (label, x) in zip(
        axes, (("1 - tau_base", lambda r: 1 - r["tau_base"]), ("optim.base_lr", lambda r: r["base_lr"])), strict=True
    ):
        for r in points:
            ax.scatter(x(r), r[METRIC], color=colours.get(r["status"], "tab:gray"), label=r["status"])
            ax.annotate(r["trial"][-5:], (x(r), r[METRIC]), fontsize=7)
        if all(x(r) > 0 for r in points):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("val kNN top-1")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[1].legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == METRIC:
            return f"{value:.4f}"
        if key == "base_lr":
            return f"{value:.3g}"
        if key == "tau_base":
            return f"{value:.5f}"
        return str(value)

    table = [list(TABLE_COLUMNS)] + [[cell(k, r.get(k)) for k in TABLE_COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
