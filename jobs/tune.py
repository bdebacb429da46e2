"""Ray job entry point: `byol submit -- tune --config configs/tune_....yaml [--set k=v]` (or `ray job submit ... --
python jobs/tune.py --config ...`). The study's trials run on the cluster the job runs in."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
