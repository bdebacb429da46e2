"""bench/report.py: docs/benchmarks.md is generated from bench/results, and --check fails on a figure in the README
or docs that no result backs (CI runs this file with the rest of the suite). No Ray, no torch work: seconds."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "bench" / "report.py"


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), *args], capture_output=True, text=True, timeout=120)


def copy_checkout(tmp_path: Path, readme: str | None = None) -> Path:
    """README.md, docs/ and bench/results/ of this checkout (or ``readme`` as README.md) under tmp_path."""
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "bench" / "results", root / "bench" / "results")
    shutil.copytree(ROOT / "docs", root / "docs")
    (root / "README.md").write_text((ROOT / "README.md").read_text() if readme is None else readme)
    return root


def test_repository_passes_check():
    """Every figure in README.md and docs/*.md has a result behind it, and docs/benchmarks.md is current."""
    done = report("--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_benchmarks_md_regenerates_identically(tmp_path):
    root = copy_checkout(tmp_path)
    (root / "docs" / "benchmarks.md").unlink()
    for _ in range(2):  # the same results give the same file, every time
        assert report("--root", str(root)).returncode == 0
        assert (root / "docs" / "benchmarks.md").read_text() == (ROOT / "docs" / "benchmarks.md").read_text()


def test_check_fails_on_a_planted_figure(tmp_path):
    readme = (ROOT / "README.md").read_text().rstrip("\n").split("\n")
    readme.append("In the end a run took 99.7 min.")
    root = copy_checkout(tmp_path, "\n".join(readme) + "\n")
    done = report("--check", "--root", str(root))
    assert done.returncode == 1
    assert f"README.md:{len(readme)}: 99.7 min: its paragraph cites no result file" in done.stdout, done.stdout


def test_check_rules(tmp_path):
    """Figures backed by the results their paragraph cites pass (as recorded, x100 for %, seconds/60 for min);
    code, bounds and opted-out lines are no figures; a figure its cited results do not hold fails, and so does one
    whose paragraph cites nothing; a stale benchmarks.md fails."""
    quality = "bench/results/quality/20261202-demo15-20261202f-bf16.json"
    step = "bench/results/step_throughput/20261128-h200.json"
    backed = (
        f"The demo took 12.7 min and reached 84.56% kNN / 88.62% linear ([result]({quality}));\n"
        f"the step ran 19,922 img/s (2.14× byol-pytorch) ([result]({step})).\n"
        "\n"
        f"| run | minutes |\n|---|---|\n| demo | 12.7 min ([r]({quality})) |\n"
        "\n"
        "```\nbyol demo  # 55.5 min in a code block is no figure\n```\n"
        "`77.7%` inline is none, nor a goal of ≥ 99.1% or ≤ 3.3 s.\n"
        "k=200 neighbours, 88.8 s of nothing <!-- not a measurement -->\n"
    )
    root = copy_checkout(tmp_path, backed)
    for doc in (root / "docs").glob("*.md"):
        if doc.name != "benchmarks.md":
            doc.unlink()
    done = report("--check", "--root", str(root))
    assert done.returncode == 0, done.stdout
    invented = (
        backed + f"\nA rerun took 14 min: 85.0% kNN, 90.0% linear ([result]({quality})).\n\nAnd 12.7 min uncited.\n"
    )
    (root / "README.md").write_text(invented)
    done = report("--check", "--root", str(root))
    assert done.returncode == 1
    for figure in ("14 min", "85.0%", "90.0%"):
        assert f": {figure}: not in {quality}" in done.stdout, done.stdout
    assert "12.7 min: its paragraph cites no result file" in done.stdout
    (root / "README.md").write_text(backed)
    (root / "docs" / "benchmarks.md").write_text("stale\n")
    done = report("--check", "--root", str(root))
    assert done.returncode == 1 and "docs/benchmarks.md" in done.stdout
