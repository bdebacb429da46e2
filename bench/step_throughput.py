"""Images/s of one BYOL training step: this project's ``train_step`` against byol-pytorch, same work.

    python bench/step_throughput.py [--device cuda] [--steps 20]   # -> bench/results/step_throughput/<stamp>.json

Same backbone (torchvision ResNet, the small-image stem at 32 px), projector/predictor 4096-256, batch, optimizer
(SGD, momentum 0.9) and precision (bf16 autocast on CUDA, fp32 on CPU); byol-pytorch (PyPI ``byol-pytorch``, the
``bench`` extra) with ``use_simplicial_embeddings=False`` and its augmentation off (identity), so both time
forward + backward + optimizer step + EMA update on the same two views. One image = one input image (two views).
byol-pytorch runs both views as one batch (BatchNorm statistics shared across views); ours runs each view as its
own batch, as the paper's implementations do.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import write_result  # noqa: E402  (bench/, this script's directory)

from pipeline.config import ModelConfig, OptimConfig  # noqa: E402
from pipeline.core.models import adapt_resnet, build_networks  # noqa: E402
from pipeline.core.optim import build_optimizer  # noqa: E402
from pipeline.core.schedules import Schedule  # noqa: E402
from pipeline.core.step import train_step  # noqa: E402

CASES = {  # name: (backbone, image size, batch on cpu, batch on cuda)
    "resnet18-32px": ("resnet18", 32, 64, 512),
    "resnet50-224px": ("resnet50", 224, 8, 128),
}


def load_byol_pytorch():
    """byol_pytorch.BYOL without the package __init__ (which imports its accelerate-based trainer)."""
    spec = importlib.util.find_spec("byol_pytorch")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "byol_pytorch.py"
    module_spec = importlib.util.spec_from_file_location("byol_pytorch_core", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.BYOL


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    return time.perf_counter() - start


def ours(backbone: str, size: int, batch: int, device: torch.device, steps: int, warmup: int) -> float:
    cfg = ModelConfig(backbone=backbone, small_stem=size <= 64, proj_hidden=4096, proj_dim=256, pred_hidden=4096)
    online, target = build_networks(cfg, 3)
    online = online.to(device, memory_format=torch.channels_last)
    target = target.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(online, OptimConfig(name="sgd", weight_decay=0.0), 0.05)
    schedule = Schedule(
        total_steps=10_000, peak_lr=0.05, warmup_steps=0, lr_schedule="cosine", tau_base=0.99, tau_schedule="cosine"
    )
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def step(i: int) -> None:
        train_step(online, target, optimizer, [(images, images)], i, schedule, autocast, check_finite=False)

    return batch * steps / time_steps(step, steps, warmup, device)


def theirs(byol_cls, backbone: str, size: int, batch: int, device: torch.device, steps: int, warmup: int) -> float:
    import torchvision

    net = adapt_resnet(getattr(torchvision.models, backbone)(weights=None), 3, size <= 64).to(device)
    learner = byol_cls(
        net,
        image_size=size,
        hidden_layer="avgpool",
        projection_size=256,
        projection_hidden_size=4096,
        augment_fn=lambda x: x,
        moving_average_decay=0.99,
        use_simplicial_embeddings=False,
    ).to(device)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=device)
    amp = device.type == "cuda"

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = learner(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_moving_average()

    return batch * steps / time_steps(step, steps, warmup, device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--out", default=None, help="default: bench/results/step_throughput/<stamp>-<kind>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    byol_cls = load_byol_pytorch()
    rows = []
    for name in args.cases:
        backbone, size, cpu_batch, gpu_batch = CASES[name]
        batch = gpu_batch if device.type == "cuda" else cpu_batch
        row = {"case": name, "batch": batch, "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}
        row["ours_images_per_s"] = round(ours(backbone, size, batch, device, args.steps, args.warmup), 1)
        if byol_cls is not None:
            row["byol_pytorch_images_per_s"] = round(
                theirs(byol_cls, backbone, size, batch, device, args.steps, args.warmup), 1
            )
            row["ratio"] = round(row["ours_images_per_s"] / row["byol_pytorch_images_per_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'case':<16}{'batch':>6}{'ours img/s':>12}{'byol-pytorch':>14}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['case']:<16}{r['batch']:>6}{r['ours_images_per_s']:>12}"
            f"{r.get('byol_pytorch_images_per_s', '-'):>14}{r.get('ratio', '-'):>8}"
        )
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.machine()} CPU",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "byol_pytorch": "installed" if byol_cls is not None else "not installed (pip install byol-pytorch)",
        "rows": rows,
    }
    print(f"wrote {write_result('step_throughput', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
