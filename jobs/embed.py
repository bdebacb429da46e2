"""Ray job entry point (Ray Data batch inference on the cluster):
`ray job submit --working-dir . -- python jobs/embed.py --checkpoint CKPT --data DATA --out s3://...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
