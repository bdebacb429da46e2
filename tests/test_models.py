import math

import pytest
import torch
import torchvision

from pipeline.config import ModelConfig
from pipeline.core.checkpoint import backbone_state
from pipeline.core.models import (
    MLPHead,
    OnlineNetwork,
    SmallResNet,
    adapt_resnet,
    build_backbone,
    build_networks,
    byol_loss,
    collapse_monitor,
    regression_loss,
    state_checksum,
    update_target,
)

SMALL = ModelConfig(backbone="small_cnn", proj_hidden=32, proj_dim=16, pred_hidden=32)


def test_loss_is_summed_2_minus_2cos_on_hand_vectors():
    p1 = torch.tensor([[1.0, 0.0]])
    p2 = torch.tensor([[0.0, 2.0]])
    z1 = torch.tensor([[3.0, 3.0]])  # target projection of view 1
    z2 = torch.tensor([[0.0, -1.0]])  # target projection of view 2
    # p1 vs z2: cos = 0 -> 2; p2 vs z1: cos = 1/sqrt(2) -> 2 - sqrt(2)
    expected = 2.0 + (2.0 - math.sqrt(2.0))
    assert byol_loss(p1, p2, z1, z2).item() == pytest.approx(expected, abs=1e-6)
    # the per-sample term equals the squared distance of the normalised vectors
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    dist = ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).sum(1)
    torch.testing.assert_close(regression_loss(a, b), dist)


def test_no_gradient_reaches_target_and_target_has_no_predictor():
    online, target = build_networks(SMALL, in_channels=1)
    assert not hasattr(target, "predictor")
    assert all(not p.requires_grad for p in target.parameters())
    v1, v2 = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    # even with a target projection that tracks gradients, the loss detaches it
    p1, p2, _, _ = online(v1, v2)
    zt = torch.randn(4, 16, requires_grad=True)
    byol_loss(p1, p2, zt, zt).backward()
    assert zt.grad is None
    t1, t2 = target(v1, v2)
    assert not t1.requires_grad and not t2.requires_grad
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in online.predictor.parameters())


def test_target_starts_as_copy_of_online():
    online, target = build_networks(SMALL, in_channels=1)
    online_sd = online.state_dict()
    for name, p in target.named_parameters():
        assert torch.equal(p, online_sd[name])


def test_ema_step_is_exact():
    online, target = build_networks(SMALL, in_channels=1)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    tau = 0.996
    before = {n: p.clone() for n, p in target.named_parameters()}
    online_p = dict(online.named_parameters())
    update_target(target, online, tau)
    for n, p in target.named_parameters():
        assert torch.equal(p, tau * before[n] + (1 - tau) * online_p[n]), n


def test_ema_tau_one_keeps_target_and_tau_zero_copies_online():
    online, target = build_networks(SMALL, in_channels=1)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    snapshot = state_checksum(target)
    update_target(target, online, 1.0)
    assert state_checksum(target) == snapshot
    update_target(target, online, 0.0)
    online_p = dict(online.named_parameters())
    for n, p in target.named_parameters():
        assert torch.equal(p, online_p[n])


def test_target_batchnorm_uses_batch_statistics_and_keeps_no_buffers():
    online, target = build_networks(SMALL, in_channels=1)
    assert list(target.buffers()) == []
    x1, x2 = torch.randn(8, 1, 16, 16) * 3 + 1, torch.randn(8, 1, 16, 16)
    train_out = target(x1, x2)
    target.eval()  # still batch statistics: there are no running statistics to fall back on
    eval_out = target(x1, x2)
    torch.testing.assert_close(train_out[0], eval_out[0])


@pytest.mark.parametrize(
    "name, dim", [("small_cnn", 256), ("small_resnet", 256), ("resnet18", 512), ("resnet50", 2048)]
)
@pytest.mark.parametrize("channels", [1, 3])
def test_backbones_feature_dims(name, dim, channels):
    net, feature_dim = build_backbone(name, channels, small_stem=True)
    assert feature_dim == dim
    assert net(torch.randn(2, channels, 32, 32)).shape == (2, dim)


def test_exported_small_resnet_loads_into_a_bare_small_resnet():
    cfg = ModelConfig(backbone="small_resnet", cnn_width=8, proj_hidden=32, proj_dim=16, pred_hidden=32)
    online, _ = build_networks(cfg, 1)
    exported = backbone_state({"online": online.state_dict()})  # what `byol export` writes
    bare = SmallResNet(1, 8)
    bare.load_state_dict(exported, strict=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(bare.eval()(x), online.encoder.eval()(x))


def test_small_stem_resnet_state_dict_loads_into_torchvision():
    net, _ = build_backbone("resnet18", 1, small_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    fresh = adapt_resnet(torchvision.models.resnet18(), in_channels=1, small_stem=True)
    fresh.load_state_dict(net.state_dict(), strict=True)


def test_mlp_head_shape():
    head = MLPHead(8, 4096, 256)
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head(torch.randn(3, 8)).shape == (3, 256)


def test_collapse_monitor_distinguishes_collapse():
    assert collapse_monitor(torch.randn(512, 64)) == pytest.approx(1.0, abs=0.1)
    assert collapse_monitor(torch.ones(512, 64) + 1e-4 * torch.randn(512, 64)) < 0.01


def test_online_forward_returns_predictions_and_projections():
    online, _ = build_networks(SMALL, in_channels=1)
    assert isinstance(online, OnlineNetwork)
    p1, p2, z1, z2 = online(torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16))
    assert p1.shape == p2.shape == z1.shape == z2.shape == (4, 16)


def test_predictor_none_is_the_collapsing_ablation_the_identity():
    online, target = build_networks(SMALL.model_copy(update={"predictor": "none"}), in_channels=1)
    p1, p2, z1, z2 = online(torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16))
    assert torch.equal(p1, z1) and torch.equal(p2, z2)
    assert not hasattr(target, "predictor")
