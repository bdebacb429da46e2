"""Backbones from the libraries users already use (no Ray; nothing is downloaded): ``torchvision:<model>`` (any
torchvision classification model) and ``timm:<model>`` (``pip install -e '.[timm]'``).

The classifier is removed and the feature width found from the model itself: for torchvision the last ``Linear``
layer becomes ``Identity`` (``fc`` of a ResNet or RegNet, ``classifier.2`` of a ConvNeXt, ``classifier.3`` of a
MobileNetV3, ``heads.head`` of a ViT...); timm builds the model with ``num_classes=0``. A grayscale run replaces
the first convolution by one with 1 input channel (same shape otherwise), and ``model.small_stem`` gives torchvision
ResNets the 3x3 stride-1 stem without max-pool. :func:`loader_code` is the Python that loads an exported backbone
with ``strict=True`` from torchvision or timm alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipeline.errors import ConfigError

LIBRARIES = ("torchvision", "timm")


@dataclass(frozen=True)
class LibraryBackbone:
    """How an exported backbone is rebuilt without this package."""

    library: str  # torchvision | timm
    name: str
    in_channels: int
    head: str | None  # torchvision: the classifier layer replaced by Identity
    first_conv: str | None  # replaced for in_channels != 3 (torchvision)
    small_stem: bool  # torchvision ResNets only


AUXILIARY_OUTPUTS = ("googlenet", "inception_v3")  # namedtuples of logits in train mode, not features


def build_library_backbone(spec: str, in_channels: int, small_stem: bool) -> tuple[nn.Module, int, LibraryBackbone]:
    """(encoder, feature width, how to rebuild it) for ``torchvision:<name>`` or ``timm:<name>``."""
    library, _, name = spec.partition(":")
    if library == "timm":
        return _timm(name, in_channels)
    if library != "torchvision":
        raise ConfigError(f"model.backbone {spec!r}: unknown library (allowed: {', '.join(LIBRARIES)})")
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        examples = "resnet50, convnext_tiny, efficientnet_b0, mobilenet_v3_small, regnet_y_400mf, vit_b_16, swin_t"
        raise ConfigError(
            f"model.backbone {spec!r}: not a torchvision classification model ({_close(name, known, examples)}; "
            "all: torchvision.models.list_models(module=torchvision.models))"
        )
    if name in AUXILIARY_OUTPUTS:
        raise ConfigError(
            f"model.backbone {spec!r}: returns auxiliary classifier outputs in training and is not supported; "
            "choose another torchvision model (e.g. torchvision:resnet50, torchvision:efficientnet_b0)"
        )
    model = torchvision.models.get_model(name, weights=None)
    head = _last_linear(model, spec)
    feature_dim = model.get_submodule(head).in_features
    _replace(model, head, nn.Identity())
    resnet_stem = small_stem and hasattr(model, "conv1") and hasattr(model, "maxpool")
    if resnet_stem:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    first = None if resnet_stem or in_channels == 3 else _first_conv(model, spec)
    if first is not None:
        conv = model.get_submodule(first)
        _replace(model, first, _conv_like(conv, in_channels))
    return model, feature_dim, LibraryBackbone("torchvision", name, in_channels, head, first, resnet_stem)


def _timm(name: str, in_channels: int) -> tuple[nn.Module, int, LibraryBackbone]:
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"model.backbone 'timm:{name}' needs timm: pip install -e '.[timm]' (or pip install timm)"
        ) from None
    known = timm.list_models()
    if name not in known:
        raise ConfigError(
            f"model.backbone 'timm:{name}': not a timm model ({_close(name, known)}; all: timm.list_models())"
        )
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    return model, int(model.num_features), LibraryBackbone("timm", name, in_channels, None, None, False)


def loader_code(spec: LibraryBackbone, path: str = "backbone.pt") -> str:
    """Python that loads an exported backbone of ``spec`` with ``strict=True``, without this package."""
    if spec.library == "timm":
        return (
            "import timm, torch\n"
            f"model = timm.create_model({spec.name!r}, pretrained=False, num_classes=0, in_chans={spec.in_channels})\n"
            f"model.load_state_dict(torch.load({path!r}, weights_only=True), strict=True)\n"
        )
    lines = ["import torch, torchvision", f"model = torchvision.models.get_model({spec.name!r}, weights=None)"]
    parent, _, child = spec.head.rpartition(".")
    lines.append(f"setattr(model.get_submodule({parent!r}), {child!r}, torch.nn.Identity())  # the classifier")
    if spec.small_stem:
        conv = f"torch.nn.Conv2d({spec.in_channels}, model.conv1.out_channels, 3, 1, 1, bias=False)"
        lines.append(f"model.conv1 = {conv}")
        lines.append("model.maxpool = torch.nn.Identity()  # the small-image stem")
    if spec.first_conv is not None:
        parent, _, child = spec.first_conv.rpartition(".")
        lines.append(f"conv = model.get_submodule({spec.first_conv!r})  # {spec.in_channels} input channel(s)")
        lines.append(
            f"setattr(model.get_submodule({parent!r}), {child!r}, torch.nn.Conv2d({spec.in_channels}, "
            "conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, "
            "conv.bias is not None))"
        )
    lines.append(f"model.load_state_dict(torch.load({path!r}, weights_only=True), strict=True)")
    return "\n".join(lines) + "\n"


def _close(name: str, known: list[str], fallback: str = "") -> str:
    import difflib

    matches = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return f"close: {', '.join(matches)}" if matches else (f"e.g. {fallback}" if fallback else "no close match")


def _last_linear(model: nn.Module, spec: str) -> str:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"model.backbone {spec!r}: no Linear classifier to remove (not a classification model)")
    return linears[-1]


def _first_conv(model: nn.Module, spec: str) -> str:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            return name
    raise ConfigError(f"model.backbone {spec!r}: no 3-channel input convolution to adapt to grayscale")


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
