import subprocess
import sys

CORE = ["config", "models", "augment", "schedules", "optim", "evaluate", "step", "sources"]


def test_core_imports_with_ray_unimportable():
    # sys.modules["ray"] = None makes any `import ray` raise ImportError.
    code = (
        "import sys; sys.modules['ray'] = None\n"
        + "".join(f"import pipeline.{m}\n" for m in CORE)
        + "assert not any(k == 'ray' or k.startswith('ray.') for k, v in sys.modules.items() if v is not None)\n"
        + "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
