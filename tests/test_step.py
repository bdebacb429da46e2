import pytest
import torch

from pipeline.config import ModelConfig, OptimConfig
from pipeline.core import step as step_module
from pipeline.core.models import build_networks
from pipeline.core.optim import build_optimizer
from pipeline.core.schedules import Schedule
from pipeline.core.step import autocast_dtype, compile_forwards, train_step
from pipeline.errors import NonFiniteLossError

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


def fixed_batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randn(8, 3, 16, 16, generator=gen)


def loss_after_two_steps(fast: str, backbone: str, autocast: torch.dtype | None = None):
    """The loss of step 2 from the same start and the same batch: the fast path must not change the numbers."""
    torch.manual_seed(0)
    online, target = build_networks(SMALL.model_copy(update={"backbone": backbone, "small_stem": True}), 3)
    v1, v2 = fixed_batch()
    if fast == "channels_last":
        online, target = online.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
        v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
    if fast == "compile":
        compile_forwards(online, target)
    opt = build_optimizer(online, OptimConfig(name="sgd"), 0.5)
    losses = [float(train_step(online, target, opt, [(v1, v2)], s, SCHEDULE, autocast)["loss"]) for s in range(3)]
    return losses, [p.detach().clone() for p in target.parameters()]


@pytest.mark.parametrize("fast", ["channels_last", "compile"])
def test_fast_path_changes_nothing(fast):
    # channels_last: a ResNet (residual adds, BN); compile: the small CNN (compiling a ResNet costs a minute here)
    backbone = "small_cnn" if fast == "compile" else "resnet18"
    plain_losses, plain_target = loss_after_two_steps("plain", backbone)
    fast_losses, fast_target = loss_after_two_steps(fast, backbone)
    # The first loss is a forward pass of the same weights on the same batch: equal to float rounding. Later
    # steps (lr 0.5) amplify the kernels' different summation orders a little.
    assert fast_losses[0] == pytest.approx(plain_losses[0], rel=1e-5)
    assert fast_losses == pytest.approx(plain_losses, rel=2e-3)
    plain_vector, fast_vector = (
        torch.cat([p.flatten() for p in plain_target]),
        torch.cat([p.flatten() for p in fast_target]),
    )
    assert (plain_vector - fast_vector).norm() <= 1e-3 * plain_vector.norm()  # the EMA targets after 3 steps


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_a_step_never_waits_for_the_device(optimizer):
    # Meta tensors have shapes but no values: anything in the step that reads a value back to the host (.item(),
    # bool(), nonzero) raises. Forward, loss, backward, optimizer, EMA and the metrics must all stay on the device.
    online, target = build_networks(SMALL, 1)
    online, target = online.to("meta"), target.to("meta")
    opt = build_optimizer(online, OptimConfig(name=optimizer), 0.5)
    batch = (torch.empty(8, 1, 12, 12, device="meta"), torch.empty(8, 1, 12, 12, device="meta"))
    metrics = train_step(online, target, opt, [batch, batch], 3, SCHEDULE, check_finite=False)
    assert metrics["loss"].device.type == metrics["collapse_std"].device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):  # the single-process finite check reads the loss: detected
        train_step(online, target, opt, [batch], 4, SCHEDULE, check_finite=True)


def one_update(autocast: torch.dtype | None):
    torch.manual_seed(0)
    online, target = build_networks(SMALL.model_copy(update={"cnn_width": 8}), 3)
    before = torch.cat([p.detach().flatten().clone() for p in online.parameters()])
    opt = build_optimizer(online, OptimConfig(name="sgd", momentum=0.9, weight_decay=0.0), 0.5)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(64, 3, 16, 16, generator=gen), torch.randn(64, 3, 16, 16, generator=gen))
    loss = float(train_step(online, target, opt, [batch], 5, SCHEDULE, autocast)["loss"])
    update = torch.cat([p.detach().flatten() for p in online.parameters()]) - before
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in online.parameters() if p.grad is not None]
    return loss, update, state + grads + list(target.parameters())


def test_bf16_autocast_keeps_fp32_state_and_the_same_update():
    plain_loss, plain_update, _ = one_update(None)
    bf16_loss, bf16_update, bf16_state = one_update(torch.bfloat16)
    # bf16 keeps 8 bits of mantissa: the loss differs by ~1e-3 relative and the step points the same way
    # (cosine 0.93 on this machine: at initialisation on noise BYOL's gradient is small next to bf16 rounding;
    # the bound leaves room for other CPUs' kernels). Gradients, optimizer state and the EMA target stay fp32.
    # What bf16 costs in quality is measured end to end (bench/quality.py).
    assert bf16_loss == pytest.approx(plain_loss, rel=1e-2) and bf16_loss != plain_loss
    assert torch.nn.functional.cosine_similarity(plain_update, bf16_update, dim=0) > 0.8
    assert len(bf16_state) > 20 and all(t.dtype == torch.float32 for t in bf16_state)


def test_precision_resolves_per_device(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("fp32", gpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("auto", gpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype("auto", gpu) is None  # a pre-Ampere GPU would emulate it
    monkeypatch.setattr(step_module, "cpu_has_bf16_matmul", lambda: False)
    assert autocast_dtype("auto", cpu) is None  # emulated bf16 is slower than fp32
    monkeypatch.setattr(step_module, "cpu_has_bf16_matmul", lambda: True)
    assert autocast_dtype("auto", cpu) is torch.bfloat16


@pytest.mark.parametrize(
    "flags, found",
    [
        ("fpu avx512f amx_bf16 amx_tile", ["amx_bf16"]),  # Intel Sapphire Rapids on
        ("fpu avx512f avx512_bf16", ["avx512_bf16"]),  # AMD Zen 4 on, Intel Cooper Lake
        ("fpu avx2 avx512f", []),  # bf16 emulated: fp32
    ],
)
def test_cpu_bf16_flags_read_from_cpuinfo(monkeypatch, tmp_path, flags, found):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\nbugs\t\t: none\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(step_module, "open", fake_open, raising=False)  # the module's open only
    assert step_module.cpu_bf16_flags() == found
