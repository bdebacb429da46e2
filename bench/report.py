"""docs/benchmarks.md from bench/results/, and a check that the docs cite no figure without a result behind it.

    python bench/report.py [--root DIR]           # writes DIR/docs/benchmarks.md (DIR: this checkout)
    python bench/report.py --check [--root DIR]   # exit 1 if benchmarks.md is stale or a figure has no result

docs/benchmarks.md holds the current figures: for each script, the latest result per machine (CPU model, cores,
precision kind, GPU) and command (less --out); git keeps the history. Same results, same file.

--check fails (a) when docs/benchmarks.md differs from what this script would write now, and (b) for every figure
in README.md and docs/*.md (benchmarks.md aside) that no result backs. A figure is a number with a unit in prose:
84.6%, 13.7 min, 1,471 images/s, 540 img/s, 2.3 s, 25 ms, 1.72× or 1.72x, and both ends of a range (13-14 min).
Not figures: numbers in fenced code blocks or inline code, bounds and goals (after ≤ ≥ < >), and any number on a
line that ends with <!-- not a measurement --> (defaults, config values, thresholds). A figure cites its results:
the paragraph (or table row) it stands in links the result files (bench/results/<script>/<file>.json), and one of
their numbers, outside the logs and curves (SKIP_KEYS), equals it at the figure's precision (rounded half up): as
it is, or x100 for %, /60 for min (seconds), x1000 for ms (seconds). A figure whose paragraph links no result is
unbacked.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OPT_OUT = "<!-- not a measurement -->"
NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
FIGURE = re.compile(
    rf"(?<![\w.,:/-])(?P<bound>[≤≥<>]\s*)?(?P<a>{NUM})(?:\s?[-–]\s?(?P<b>{NUM}))?"
    r"(?:(?P<unit>%| (?:min(?:utes?)?|ms|s|seconds?|images?/s|img/s)(?![\w/]))|(?P<times>[×x])(?![\w.]))"
)
TRANSFORMS = {"direct": Decimal(1), "pct": Decimal(100), "min": Decimal(1) / Decimal(60), "ms": Decimal(1000)}
UNIT_TRANSFORMS = {"%": ("direct", "pct"), "min": ("direct", "min"), "ms": ("direct", "ms")}
SKIP_KEYS = {"console", "history", "windows", "per_second", "reports"}  # logs and curves: in the files, not the doc
LABEL_KEYS = ("trial", "case", "shards", "cache", "repeat", "workers")


# ----------------------------------------------------------------------------------------------------- results
def load_results(root: Path) -> list[tuple[str, dict]]:
    files = sorted((root / "bench" / "results").rglob("*.json"))
    return [(p.relative_to(root).as_posix(), json.loads(p.read_text())) for p in files]


def variant(command: str) -> str:
    """The command less what names its output (``--out``, ``run.name``): runs of the same measurement share it."""
    command = re.sub(r"\s--out(?:=|\s+)\S+", "", command)
    return re.sub(r"\s--set(?:=|\s+)run\.name=\S+", "", command).strip()


def current(results: list[tuple[str, dict]]) -> dict[str, list[tuple[str, dict]]]:
    """Per script, the latest result per machine and command (less --out), ordered by date."""
    latest: dict[tuple, tuple[str, dict]] = {}
    for path, r in results:
        m = r["machine"]
        key = (r["script"], m.get("cpu"), m.get("cores"), m.get("precision_kind"), m.get("gpu"), variant(r["command"]))
        if key not in latest or (r["date"], path) > (latest[key][1]["date"], latest[key][0]):
            latest[key] = (path, r)
    by_script: dict[str, list[tuple[str, dict]]] = {}
    for path, r in sorted(latest.values(), key=lambda pr: (pr[1]["date"], pr[0])):
        by_script.setdefault(r["script"], []).append((path, r))
    return dict(sorted(by_script.items()))


# ----------------------------------------------------------------------------------------------------- rendering
def show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def flat(value, prefix: str = ""):
    """(dotted path, shown value) of every leaf worth a table cell."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in SKIP_KEYS:
                yield from flat(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        if all(isinstance(v, int | float | str) for v in value):
            text = ", ".join(show(v) for v in value)
            if len(text) <= 160:
                yield prefix, text or "-"
        elif len(value) <= 16:
            seen: set[str] = set()
            for i, v in enumerate(value):  # rows named by what identifies them, so runs line up in the table
                label = " ".join(str(v[k]) for k in LABEL_KEYS if k in v) if isinstance(v, dict) else ""
                label = label if label and label not in seen else f"{label} #{i}".strip()
                seen.add(label)
                yield from flat(v, f"{prefix}[{label}]")
    elif value not in (None, "") and not (isinstance(value, str) and len(value) > 100):
        yield prefix, show(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def machine_text(m: dict) -> str:
    parts = [m.get("cpu") or "?", f"{m.get('cores')} cores", m.get("precision_kind") or "-"]
    return show(", ".join(str(p) for p in parts + ([m["gpu"]] if m.get("gpu") else [])))


def question(script: str) -> str:
    for name in (f"{script}.py", f"{script}_summary.py"):
        path = BENCH / name
        if path.exists():
            return (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0].replace("\n", " ")
    return ""


def section(script: str, runs: list[tuple[str, dict]]) -> list[str]:
    out = [f"## {script}", "", question(script), ""]
    rows = []
    for i, (path, r) in enumerate(runs, 1):
        sha = (r["git_sha"] or "-")[:7] + (" (dirty)" if r.get("git_dirty") else "")
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items() if k != "python") or "-"
        link = f"[{Path(path).name}](../{path})"
        rows.append([str(i), r["date"], f"`{show(r['command'])}`", machine_text(r["machine"]), versions, sha, link])
    out += table(["#", "date", "command", "machine", "versions", "git", "file"], rows)
    notes = [f"- #{i}: {show(r['provenance'])}" for i, (_, r) in enumerate(runs, 1) if r.get("provenance")]
    out += ["", *notes, ""] if notes else [""]
    results = [r["results"] for _, r in runs]
    entries = results[0]
    if len(results) == 1 and len(entries) >= 3 and all(isinstance(v, dict) for v in entries.values()):
        cells = {name: dict(flat(v)) for name, v in entries.items()}  # one row per entry (probes)
        columns = list(dict.fromkeys(c for row in cells.values() for c in row))
        same = [c for c in columns if len({row.get(c) for row in cells.values()}) == 1]
        out += [f"All rows: {'; '.join(f'{c} {next(iter(cells.values()))[c]}' for c in same)}.", ""] if same else []
        varying = [c for c in columns if c not in same]
        out += table(["", *varying], [[n, *(row.get(c, "-") for c in varying)] for n, row in cells.items()])
    else:
        cells = [dict(flat(r)) for r in results]
        paths = list(dict.fromkeys(p for c in cells for p in c))
        out += table(["figure", *(f"#{i}" for i in range(1, len(cells) + 1))],
                     [[f"`{p}`", *(c.get(p, "-") for c in cells)] for p in paths])  # fmt: skip
    return out + [""]


def render(root: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python bench/report.py` from `bench/results/` (do not edit; `python bench/report.py --check`",
        "fails when this file is stale). For each script: the latest result per machine (CPU, cores, precision kind,",
        "GPU) and command; what each script measures and how to run it: `bench/README.md`. Older results: git log.",
        "",
    ]
    for script, runs in current(load_results(root)).items():
        lines += section(script, runs)
    return "\n".join(lines).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------------- check
def canonical(value: Decimal, decimals: int) -> str:
    return str(abs(value).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def numbers(value):
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in SKIP_KEYS:
                yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield Decimal(repr(value))


def backing(results: list[dict]) -> dict[tuple[str, int], set[str]]:
    values = {v for r in results for v in numbers(r)}
    return {(t, d): {canonical(v * f, d) for v in values} for t, f in TRANSFORMS.items() for d in range(5)}


CITED = re.compile(r"bench/results/[\w./-]+?\.json")


def figures(path: Path):
    """(line number, figure text, its numbers, unit, result files its paragraph cites) of every figure in a markdown
    file. A paragraph ends at a blank line; a table row is a paragraph of its own."""
    fenced, paragraph = False, []
    for n, line in [*enumerate(path.read_text().splitlines(), 1), (0, "")]:
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.strip() and not line.lstrip().startswith("|"):
            paragraph.append((n, line))
            continue
        for number, text in paragraph:
            yield from _line_figures(number, text, paragraph)
        if line.strip():  # a table row
            yield from _line_figures(n, line, [(n, line)])
        paragraph = []


def _line_figures(n: int, line: str, paragraph: list[tuple[int, str]]):
    if line.rstrip().endswith(OPT_OUT):
        return
    cited = sorted({c for _, text in paragraph for c in CITED.findall(text)})
    for m in FIGURE.finditer(re.sub(r"`[^`]*`", "``", line)):
        if m.group("bound"):
            continue
        unit = (m.group("unit") or m.group("times")).strip()
        yield n, m.group(0).strip(), [x for x in (m.group("a"), m.group("b")) if x], unit, cited


def unbacked(root: Path, results: list[tuple[str, dict]]) -> list[str]:
    by_path = dict(results)
    docs = [root / "README.md", *(p for p in sorted((root / "docs").glob("*.md")) if p.name != "benchmarks.md")]
    problems, cache = [], {}
    for doc in (d for d in docs if d.exists()):
        for n, text, numbers_, unit, cited in figures(doc):
            where = f"{doc.relative_to(root).as_posix()}:{n}: {text}"
            missing_files = [c for c in cited if c not in by_path]
            if not cited or missing_files:
                problems.append(f"{where}: its paragraph cites no result file" if not cited else
                                f"{where}: cites {', '.join(missing_files)}, which does not exist")  # fmt: skip
                continue
            key = tuple(cited)
            sets = cache.setdefault(key, backing([by_path[c] for c in cited]))
            transforms = UNIT_TRANSFORMS.get("min" if unit.startswith("min") else unit, ("direct",))
            missing = []
            for number in numbers_:
                digits = number.replace(",", "")
                if not any(digits in sets[(t, len(digits.partition(".")[2]))] for t in transforms):
                    missing.append(number)
            if missing:
                which = f" ({', '.join(missing)})" if len(numbers_) > 1 else ""
                problems.append(f"{where}{which}: not in {', '.join(cited)}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="check instead of writing; exit 1 on a problem")
    ap.add_argument("--root", type=Path, default=BENCH.parent, help="the checkout (README.md, docs/, bench/results/)")
    args = ap.parse_args()
    root, target = args.root.resolve(), args.root.resolve() / "docs" / "benchmarks.md"
    text = render(root)
    if not args.check:
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
        return 0
    failed = False
    if not target.exists() or target.read_text() != text:
        print("docs/benchmarks.md is not what bench/report.py writes from bench/results: run python bench/report.py")
        failed = True
    problems = unbacked(root, load_results(root))
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} figure(s) without a result (mark a line that is no measurement with {OPT_OUT})")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
