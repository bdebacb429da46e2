"""The kNN monitor reads only the rows it samples: on the 54k-image Fashion-MNIST train split with
eval.max_train_images=1000, its peak memory (Arrow buffers + Python objects, measured in a fresh process)
stays under a bound that reading the split whole (what it did before) exceeds."""

import json
import subprocess
import sys

BOUND_BYTES = 8 * 2**20

MEASURE = r"""
import json, sys, tracemalloc
import numpy as np
import pyarrow as pa
import torch
from pipeline.config import load_config
from pipeline.data.labelled import load_labelled
from pipeline.data.manifest import read_split_table
from pipeline.evaluation.monitor import KnnMonitor

mode, path = sys.argv[1], sys.argv[2]
cfg = load_config("configs/fashion_mnist_cpu.yaml",
                  [f"data.path={path}", "eval.max_train_images=1000", "eval.max_val_images=1000"])
load_labelled(path, "test", cfg, 10)  # warm up: lazy imports inside decoders and pyarrow are not the data
pool = pa.default_memory_pool()
tracemalloc.start()
if mode == "monitor":
    monitor = KnnMonitor(cfg, torch.device("cpu"))
    n = len(monitor.bank_y)
else:  # the whole split as one table, then a sample (the old monitor)
    table = read_split_table(path, "train", ["image", "label"])
    n = table.take(np.sort(np.random.default_rng(0).choice(table.num_rows, 1000, replace=False))).num_rows
_, python_peak = tracemalloc.get_traced_memory()
print(json.dumps({"images": n, "peak": pool.max_memory() + python_peak}))
"""


def peak(mode, path):
    out = subprocess.run([sys.executable, "-c", MEASURE, mode, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_monitor_reads_only_its_sample(fmnist_full_shards):
    sampled = peak("monitor", fmnist_full_shards)
    whole = peak("whole", fmnist_full_shards)
    assert sampled["images"] == 1000 and whole["images"] == 1000
    assert sampled["peak"] < BOUND_BYTES < whole["peak"], (sampled, whole)
