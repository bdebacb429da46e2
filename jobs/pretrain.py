"""Ray job entry point: `ray job submit --working-dir . -- python jobs/pretrain.py --config configs/... [--set k=v]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
