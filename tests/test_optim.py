import pytest
import torch
from torch import nn

from pipeline.config import OptimConfig
from pipeline.core.optim import LARS, build_optimizer, param_groups


def test_lars_trust_ratio_on_known_tensor():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.0, 0.5])  # with wd 0.1: g' = [0.3, 0.9], ||g'|| = sqrt(0.9)
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1, "lars_exclude": False}], lr=2.0, momentum=0.9, trust_coefficient=0.01
    )
    opt.step()
    g = torch.tensor([0.3, 0.9])
    ratio = 0.01 * 5.0 / g.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 2.0 * ratio * g)
    # second step: momentum buffer carries the first update
    w.grad = torch.tensor([0.0, 0.5])
    before = w.detach().clone()
    opt.step()
    g2 = torch.tensor([0.0, 0.5]) + 0.1 * before
    step2 = 0.9 * (2.0 * ratio * g) + 2.0 * (0.01 * before.norm() / g2.norm()) * g2
    torch.testing.assert_close(w.detach(), before - step2)


def test_lars_excluded_params_get_plain_momentum_sgd():
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    b.grad = torch.tensor([0.5, 0.5])
    opt = LARS([{"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.1, trust_coefficient=1e-3)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.tensor([0.95, -1.05]))


def test_bias_and_batchnorm_excluded_from_decay_and_adaptation():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    decayed, excluded = param_groups(model, 1e-5)
    assert decayed["weight_decay"] == 1e-5 and not decayed["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]
    ids = lambda ps: {id(p) for p in ps}
    assert ids(excluded["params"]) == ids([model[0].bias, model[1].weight, model[1].bias, model[2].bias])
    assert ids(decayed["params"]) == ids([model[0].weight, model[2].weight])


@pytest.mark.parametrize("name, cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=1e-4), lr=0.5)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
