"""``byol export``: a checkpoint's online encoder (what BYOL keeps) in a form that loads without this package.

    state_dict   ``torch.save`` of the encoder's weights, loaded with ``strict=True`` into the model built by
                 torchvision or timm alone: the Python that does it is written next to it (``<out>.load.py``)
                 and printed (``pipeline.core.backbones.loader_code``). This package's small networks
                 (``small_cnn``, ``small_resnet``) load into ``SmallCNN`` / ``SmallResNet`` of
                 ``pipeline.core.models``; export them as TorchScript to load them anywhere.
    torchscript  the encoder traced in eval mode (``torch.jit.load`` loads it with torch alone).

Checkpoint and output may be local paths or URIs (s3://, gs://, file://).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.core.backbones import LibraryBackbone, build_library_backbone, loader_code
from pipeline.core.checkpoint import load_encoder
from pipeline.core.storage import upload_file

FORMATS = ("state_dict", "torchscript")
RESNETS = ("resnet18", "resnet34", "resnet50")


def library_spec(cfg: Config) -> LibraryBackbone | None:
    """How the run's encoder is rebuilt by torchvision or timm alone (None: one of this package's networks)."""
    name, channels, small_stem = cfg.model.backbone, cfg.data.channels, cfg.model.small_stem
    if ":" in name:
        return build_library_backbone(name, channels, small_stem)[2]
    if name in RESNETS:  # adapt_resnet: the same changes, under the same names
        first = "conv1" if channels != 3 and not small_stem else None
        return LibraryBackbone("torchvision", name, channels, "fc", first, small_stem)
    return None


def export_backbone(checkpoint: str | Path, out: str | Path, fmt: str = "state_dict") -> dict[str, str | None]:
    """Write the encoder of ``checkpoint`` to ``out``; returns {"out", "loader" (the Python that loads a
    state_dict without this package, None for TorchScript or this package's own networks)}."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (allowed: {', '.join(FORMATS)})")
    encoder, cfg, _ = load_encoder(checkpoint)
    encoder = encoder.to(memory_format=torch.contiguous_format)
    out = str(out)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "backbone"
        if fmt == "torchscript":
            size = cfg.data.image_size
            example = torch.zeros(1, cfg.data.channels, size, size)
            with torch.no_grad():
                torch.jit.trace(encoder, example).save(str(local))
            return {"out": upload_file(local, out), "loader": None}
        torch.save(encoder.state_dict(), local)
        spec = library_spec(cfg)
        loader = loader_code(spec, Path(out.partition("?")[0]).name) if spec is not None else None
        if loader is not None:
            (Path(tmp) / "load.py").write_text(loader)
            upload_file(Path(tmp) / "load.py", _sibling(out, ".load.py"))
        return {"out": upload_file(local, out), "loader": loader}


def _sibling(location: str, suffix: str) -> str:
    """``backbone.pt`` -> ``backbone.pt.load.py``, a URI's query kept at the end."""
    root, sep, query = location.partition("?")
    return f"{root}{suffix}{sep}{query}"
