import pytest
import torch

from pipeline.config import ModelConfig, OptimConfig
from pipeline.core.models import build_networks
from pipeline.core.optim import build_optimizer
from pipeline.core.schedules import Schedule
from pipeline.core.step import NonFiniteLossError, train_step

SMALL = ModelConfig(cnn_width=4, proj_hidden=16, pred_hidden=16, proj_dim=8)
SCHEDULE = Schedule(
    total_steps=10, peak_lr=0.5, warmup_steps=2, lr_schedule="cosine", tau_base=0.9, tau_schedule="cosine"
)


def views(n=8):
    return torch.randn(n, 1, 12, 12), torch.randn(n, 1, 12, 12)


def test_step_uses_the_schedule_of_its_step_and_moves_the_target():
    online, target = build_networks(SMALL, 1)
    opt = build_optimizer(online, OptimConfig(name="sgd"), 0.5)
    before = [p.clone() for p in target.parameters()]
    m = train_step(online, target, opt, [views()], step=5, schedule=SCHEDULE)
    assert m["lr"] == SCHEDULE.lr(5) and m["tau"] == SCHEDULE.tau(5)
    assert opt.param_groups[0]["lr"] == SCHEDULE.lr(5)
    assert any(not torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))


def test_gradient_accumulation_is_one_optimizer_step():
    online, target = build_networks(SMALL, 1)
    opt = build_optimizer(online, OptimConfig(name="sgd", momentum=0.0), 0.5)
    calls = []
    real_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]
    m = train_step(online, target, opt, [views(), views(), views()], step=3, schedule=SCHEDULE)
    assert len(calls) == 1 and m["lr"] == SCHEDULE.lr(3)


def test_non_finite_loss_stops_without_applying_the_step():
    online, target = build_networks(SMALL, 1)
    opt = build_optimizer(online, OptimConfig(name="sgd"), 0.5)
    snapshot = {k: v.clone() for k, v in online.state_dict().items()}
    v1, v2 = views()
    v1[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 4"):
        train_step(online, target, opt, [(v1, v2)], step=4, schedule=SCHEDULE)
    for k, v in online.named_parameters():
        assert torch.equal(v, snapshot[k])
