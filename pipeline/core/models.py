"""BYOL networks (Grill et al. 2020): backbones, MLP heads, online and target networks, EMA, loss.

    online:  x -> encoder f_theta -> projector g_theta -> predictor q_theta -> p
    target:  x -> encoder f_xi    -> projector g_xi                        -> z   (no predictor, no gradient)
    loss  =  (2 - 2 cos(p(v1), sg z(v2))) + (2 - 2 cos(p(v2), sg z(v1)))       (summed, batch-averaged)
    after every optimizer step: xi <- tau * xi + (1 - tau) * theta

BatchNorm policy of the target: its BatchNorm layers always normalise with the statistics of the
batch they see (DeepMind's choice: the target runs "in training mode") and keep no running
buffers. Nothing is averaged into them, so nothing can drift between data-parallel ranks, and the
target's state is exactly its parameters.
"""

from __future__ import annotations

import copy
import hashlib
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import BACKBONES, ModelConfig
from pipeline.errors import ConfigError


class SmallCNN(nn.Module):
    """A fast CNN for CPU runs on small images: 4 stages of two 3x3 convs, global average pool.

    Stage widths ``width * (1, 2, 4, 8)``; features ``8 * width``-d (256 at the default 32).
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i in range(4):
            w = width * 2**i
            layers += [
                nn.Conv2d(prev, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            prev = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs and a shortcut (a strided 1x1 conv where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class SmallResNet(nn.Module):
    """SmallCNN's stages as residual blocks: a 3x3 stem, then one basic block per stage (widths w, 2w, 4w, 8w)."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        prev = width
        for i in range(4):
            layers.append(BasicBlock(prev, width * 2**i, 1 if i == 0 else 2))
            prev = width * 2**i
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


SMALL_NETS: dict[str, type[SmallCNN | SmallResNet]] = {"small_cnn": SmallCNN, "small_resnet": SmallResNet}


def adapt_resnet(model: nn.Module, in_channels: int, small_stem: bool) -> nn.Module:
    """The documented stem change for small images / grayscale, and ``fc`` removed (features out).

    Apply the same function to ``torchvision.models.resnetXX()`` to load an exported backbone with
    ``strict=True``.
    """
    if small_stem or in_channels != 3:
        kernel, stride, padding = (3, 1, 1) if small_stem else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=padding, bias=False)
    if small_stem:
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def build_backbone(
    name: str, in_channels: int = 3, small_stem: bool = False, cnn_width: int = 32
) -> tuple[nn.Module, int]:
    """A randomly initialised encoder (nothing downloaded) and its feature dimension."""
    if name in SMALL_NETS:
        net = SMALL_NETS[name](in_channels, cnn_width)
        return net, net.feature_dim
    if ":" in name:  # torchvision:<model>, timm:<model>
        from pipeline.core.backbones import build_library_backbone

        net, feature_dim, _ = build_library_backbone(name, in_channels, small_stem)
        return net, feature_dim
    if name in ("resnet18", "resnet34", "resnet50"):
        import torchvision  # here: importing it costs seconds in every process (torch._dynamo); small CNNs need none

        resnet = getattr(torchvision.models, name)(weights=None)
        feature_dim = resnet.fc.in_features
        return adapt_resnet(resnet, in_channels, small_stem), feature_dim
    raise ValueError(f"unknown backbone {name!r} (allowed: {', '.join(BACKBONES)})")


class MLPHead(nn.Sequential):
    """Projector / predictor: Linear -> BatchNorm1d -> ReLU -> Linear (output not normalised)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class OnlineNetwork(nn.Module):
    """Encoder + projector + predictor; the only part that receives gradients (and the DDP unit)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Each view is its own batch so BatchNorm statistics are per view, as in the paper's anchors.
        z1 = self.projector(self.encoder(view1))
        z2 = self.projector(self.encoder(view2))
        return self.predictor(z1), self.predictor(z2), z1, z2


class TargetNetwork(nn.Module):
    """Encoder + projector, an EMA of the online ones. No predictor, no gradients."""

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    @torch.no_grad()
    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projector(self.encoder(view1)), self.projector(self.encoder(view2))


def _use_batch_statistics_only(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


def load_init(encoder: nn.Module, cfg: ModelConfig) -> None:
    """``model.init``: a local state_dict of this encoder (``byol export``'s, or torchvision's/timm's)."""
    try:
        state = torch.load(cfg.init, map_location="cpu", weights_only=True)
        encoder.load_state_dict(state, strict=True)
    except FileNotFoundError:
        raise ConfigError(f"model.init={cfg.init}: no such file; give a local state_dict file of the encoder") from None
    except (RuntimeError, TypeError, AttributeError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.init={cfg.init} does not load into model.backbone={cfg.backbone} with strict=True ({first}); "
            "give a state_dict of that encoder (byol export writes one), or remove model.init"
        ) from None


def check_networks(cfg: ModelConfig, in_channels: int, image_size: int) -> None:
    """Build the encoder (and load ``model.init``) and run it on two blank images of the configured size, so a
    backbone that cannot be built, a missing extra or an input size the backbone refuses (a ViT made for 224 px)
    stops the command before any Ray resource starts."""
    encoder, _ = build_backbone(cfg.backbone, in_channels, bool(cfg.small_stem), cfg.cnn_width)
    if cfg.init:
        load_init(encoder, cfg)
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(2, in_channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.backbone={cfg.backbone} does not take {image_size}x{image_size} images ({first}); "
            "set data.image_size to a size it accepts (e.g. 224), or choose another backbone"
        ) from None


def make_target(online: OnlineNetwork) -> TargetNetwork:
    """The target starts as an exact copy of the online encoder+projector (never pretrained, never reset)."""
    target = TargetNetwork(copy.deepcopy(online.encoder), copy.deepcopy(online.projector))
    _use_batch_statistics_only(target)
    target.requires_grad_(False)
    return target


def build_networks(cfg: ModelConfig, in_channels: int) -> tuple[OnlineNetwork, TargetNetwork]:
    """Online and target networks; the encoder from ``model.init`` (a local state_dict) when given. The target is
    a copy of the online network, never loaded from anywhere else."""
    encoder, feature_dim = build_backbone(cfg.backbone, in_channels, bool(cfg.small_stem), cfg.cnn_width)
    if cfg.init:
        load_init(encoder, cfg)
    projector = MLPHead(feature_dim, cfg.proj_hidden, cfg.proj_dim)
    # "none" is the paper's ablation that collapses (Table 5); it exists to show and test collapse handling.
    predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim) if cfg.predictor == "mlp" else nn.Identity()
    online = OnlineNetwork(encoder, projector, predictor)
    return online, make_target(online)


def regression_loss(prediction: torch.Tensor, target_projection: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) per sample = ||p/|p| - z/|z|||^2, with z treated as a constant."""
    p = F.normalize(prediction, dim=-1)
    z = F.normalize(target_projection.detach(), dim=-1)
    return 2 - 2 * (p * z).sum(dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1_target: torch.Tensor, z2_target: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss: both directions SUMMED (not averaged), each averaged over the batch."""
    return regression_loss(p1, z2_target).mean() + regression_loss(p2, z1_target).mean()


@torch.no_grad()
def update_target(target: TargetNetwork, online: OnlineNetwork, tau: float) -> None:
    """xi <- tau * xi + (1 - tau) * theta for every target parameter, as fused foreach ops.

    Computed as the two products then their sum (no fused multiply-add), so the result is bit-equal
    to the formula on every rank and every device.
    """
    target_params = list(target.parameters())
    online_params = [p for _, p in _matching_online_params(online, target)]
    torch._foreach_mul_(target_params, tau)
    torch._foreach_add_(target_params, torch._foreach_mul(online_params, 1.0 - tau))


def _matching_online_params(online: OnlineNetwork, target: TargetNetwork) -> list[tuple[str, torch.Tensor]]:
    online_named = dict(online.named_parameters())
    return [(name, online_named[name]) for name, _ in target.named_parameters()]


def collapse_monitor(z: torch.Tensor) -> torch.Tensor:
    """std over the batch of L2-normalised projections, averaged over dims, times sqrt(d) (a 0-dim tensor).

    About 1 for healthy representations, 0 when every image maps to the same point.
    """
    z = F.normalize(z.detach().float(), dim=-1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5


def state_checksum(module: nn.Module) -> str:
    """A bit-exact SHA-256 over parameters and buffers in name order (cross-rank EMA check)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor is None:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
