"""The core is plain PyTorch: no module under pipeline/core (found by walking the package, so a new one is
covered without editing a list) imports Ray or MLflow; evaluation and the no-Ray data readers import no Ray."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline.core

NO_RAY_OUTSIDE_CORE = [
    "pipeline.config",
    "pipeline.evaluation.metrics",
    "pipeline.evaluation.checkpoint_eval",
    "pipeline.data.labelled",
    "pipeline.data.prepare",
    "pipeline.data.manifest",
    "pipeline.data.sources",
    "pipeline.errors",
    "pipeline.data.bad_records",
    "pipeline.data.deterministic_reader",
]


def core_modules():
    return [f"pipeline.core.{m.name}" for m in pkgutil.iter_modules([str(Path(pipeline.core.__file__).parent)])]


def imports_with_blocked(modules, blocked):
    # sys.modules[name] = None makes any `import name` raise ImportError.
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked)
        + "".join(f"import {m}\n" for m in modules)
        + f"bad = [k for k, v in sys.modules.items() if v is not None and k.split('.')[0] in {blocked!r}]\n"
        + "assert not bad, bad\nprint('ok')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_core_is_found_by_walking_the_package():
    found = core_modules()
    assert {"pipeline.core.models", "pipeline.core.step", "pipeline.core.checkpoint", "pipeline.core.plan"} <= set(
        found
    )


def test_core_imports_neither_ray_nor_mlflow():
    out = imports_with_blocked(core_modules(), ["ray", "mlflow"])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_evaluation_and_readers_import_no_ray():
    out = imports_with_blocked(NO_RAY_OUTSIDE_CORE, ["ray"])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
