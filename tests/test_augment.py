import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig
from pipeline.core.augment import (
    TwoViewAugment,
    adjust_hue,
    apply_photometric,
    gaussian_blur,
    random_resized_crop,
    sample_crop_boxes,
    sample_photometric,
)

PAPER = AugmentConfig()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_crop_params_differ_between_images_of_one_batch():
    images = torch.rand(1, 3, 64, 64).expand(16, 3, 64, 64).contiguous()  # 16 identical images
    aug = TwoViewAugment(PAPER, 32, [0.5] * 3, [0.25] * 3)
    v1, v2 = aug(images, gen())
    assert v1.shape == v2.shape == (16, 3, 32, 32)
    flat = v1.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat.round(decimals=4)}
    assert len(distinct) == 16  # every image got its own parameters
    assert not torch.allclose(v1, v2)
    boxes = sample_crop_boxes(torch.full((64,), 100), torch.full((64,), 100), (0.08, 1.0), (3 / 4, 4 / 3), gen())
    assert boxes[:, 2].unique().numel() > 20 and boxes[:, 0].unique().numel() > 20


def test_photometric_params_per_image():
    p = sample_photometric(64, PAPER, PAPER.view1, gen())
    for t in (p.brightness, p.contrast, p.saturation, p.hue, p.sigma):
        assert t.unique().numel() == 64
    assert p.order.unique(dim=0).shape[0] > 5  # random order per image


@pytest.mark.parametrize("view, blur, solarize", [("view1", 1.0, 0.0), ("view2", 0.1, 0.2)])
def test_blur_and_solarize_rates_per_view(view, blur, solarize):
    n = 20000
    p = sample_photometric(n, PAPER, getattr(PAPER, view), gen(1))
    assert p.blur.float().mean().item() == pytest.approx(blur, abs=0.01)
    assert p.solarize.float().mean().item() == pytest.approx(solarize, abs=0.01)
    assert p.jitter.float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert p.grayscale.float().mean().item() == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("view, rate", [("view1", 0.0), ("view2", 0.2)])
def test_solarize_rate_observed_in_outputs(view, rate):
    # constant 0.8 images, no jitter/gray/blur: solarized images come out at 0.2
    cfg = AugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur=False)
    aug = TwoViewAugment(cfg, 8, [0.0], [1.0])
    x = torch.full((4000, 1, 8, 8), 0.8)
    v1, v2 = aug.photometric(x, x.clone(), gen(2))
    out = v1 if view == "view1" else v2
    solarized = (out.mean(dim=(1, 2, 3)) < 0.5).float().mean().item()
    assert solarized == pytest.approx(rate, abs=0.02)


def test_blur_applied_exactly_to_the_sampled_images():
    cfg = AugmentConfig(jitter_prob=0.0, grayscale_prob=0.0)
    x = (torch.rand(2000, 1, 32, 32, generator=gen(4)) > 0.5).float()  # noise: blur lowers the variance
    p = sample_photometric(2000, cfg, cfg.view2, gen(3))
    out = apply_photometric(x, p, torch.zeros(1), torch.ones(1))
    changed = (out != x).flatten(1).any(1)
    assert not (changed & ~p.blur & ~p.solarize).any()  # untouched unless sampled
    strong = p.blur & ~p.solarize & (p.sigma > 0.5)
    assert strong.sum() > 50
    assert (out[strong].flatten(1).var(1) < 0.8 * x[strong].flatten(1).var(1)).all()


def test_small_image_preset_has_no_blur():
    cfg = AugmentConfig(blur=False)
    p1 = sample_photometric(1000, cfg, cfg.view1, gen())
    assert not p1.blur.any()


def test_grayscale_inputs_and_value_ranges():
    aug = TwoViewAugment(AugmentConfig(blur=False), 28, [0.286], [0.353])
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    v1, v2 = aug(images, gen())
    assert v1.dtype == torch.float32 and v1.shape == (32, 1, 28, 28)
    lo, hi = (0 - 0.286) / 0.353, (1 - 0.286) / 0.353
    assert v1.min() >= lo - 1e-5 and v1.max() <= hi + 1e-5
    assert torch.isfinite(v2).all()


def test_variable_size_list_input():
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(40, 60), (375, 500), (1, 1)]]
    out = random_resized_crop(images, 24, PAPER, gen())
    assert out.shape == (3, 3, 24, 24) and out.min() >= 0 and out.max() <= 1


def test_full_scale_crop_without_flip_is_identity():
    cfg = AugmentConfig(crop_scale_min=1.0, crop_scale_max=1.0, hflip_prob=0.0)
    x = torch.rand(4, 3, 16, 16)
    out = random_resized_crop(x, 16, cfg, gen())
    # aspect ratio is still random: only crops that kept the full square are the identity
    torch.testing.assert_close(out[0], x[0], atol=1e-5, rtol=0) if out.shape else None
    flipped = random_resized_crop(x, 16, AugmentConfig(crop_scale_min=1.0, crop_scale_max=1.0, hflip_prob=1.0), gen())
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


def test_hue_shift_full_turn_is_identity_and_half_turn_changes_colour():
    x = torch.rand(5, 3, 8, 8)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(5)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(x, torch.ones(5)), x, atol=1e-5, rtol=0)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    cyan = adjust_hue(red, torch.tensor([0.5]))
    torch.testing.assert_close(cyan[0, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]), atol=1e-5, rtol=0)


def test_blur_kernel_preserves_constant_images():
    x = torch.full((3, 3, 40, 40), 0.3)
    torch.testing.assert_close(gaussian_blur(x, torch.tensor([0.1, 1.0, 2.0])), x)


def test_optional_extras_off_by_default_and_work_when_on():
    assert PAPER.rotation_degrees == 0 and PAPER.erase_prob == 0
    cfg = AugmentConfig(rotation_degrees=30, erase_prob=1.0, blur=False)
    aug = TwoViewAugment(cfg, 16, [0.5], [0.5])
    v1, _ = aug(torch.rand(8, 1, 16, 16), gen())
    assert ((v1 == 0).flatten(1).sum(1) > 0).all()  # every image has an erased patch


def on_meta(p):
    """Parameters on the meta device: shapes only, so any read of a value back to the host raises."""
    return type(p)(**{name: value.to("meta") for name, value in vars(p).items()})


def test_masked_photometric_path_equals_the_subset_path_and_never_reads_the_device():
    # The accelerator path computes every op on every image and selects with torch.where; it must give what the
    # CPU path (ops on the selected images only) gives, and run without reading a mask back (meta tensors raise).
    cfg = AugmentConfig(erase_prob=0.5, jitter_prob=0.7)
    x = torch.rand(32, 3, 24, 24, generator=gen(3))
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    for view in (cfg.view1, cfg.view2):
        p = sample_photometric(32, cfg, view, gen(4))
        assert 0 < int(p.solarize.sum()) < 32 or view.solarize_prob == 0
        subset = apply_photometric(x, p, mean, std, masked=False)
        masked = apply_photometric(x, p, mean, std, masked=True)
        torch.testing.assert_close(masked, subset, rtol=0, atol=1e-5)
        out = apply_photometric(x.to("meta"), on_meta(p), mean.to("meta"), std.to("meta"))  # masked: off the CPU
        assert out.shape == x.shape
        with pytest.raises(RuntimeError, match="meta"):  # the subset path does read the masks
            apply_photometric(x.to("meta"), on_meta(p), mean.to("meta"), std.to("meta"), masked=False)


def test_crop_touching_the_border_keeps_a_constant_image_constant():
    # Bicubic taps past the edge must repeat the edge ("border" padding); zero padding darkened these crops.
    cfg = AugmentConfig(crop_scale_min=0.3, crop_scale_max=1.0, hflip_prob=0.5)
    images = torch.full((64, 1, 20, 20), 0.8)
    out = random_resized_crop(images, 16, cfg, gen(3))
    assert torch.allclose(out, torch.full_like(out, 0.8), atol=1e-5), float(out.min())


def test_decode_many_keeps_order_and_names_bad_records():
    from pipeline.core.images import decode_many
    from pipeline.errors import BadRecord
    from tests.imagegen import bad_files, image_bytes, random_array

    rng = np.random.default_rng(5)
    bad = bad_files(rng)
    records = [image_bytes(random_array(rng, 20, 20)), bad["truncated.jpg"], image_bytes(random_array(rng, 24, 24))]
    records.append(image_bytes(random_array(rng, 20, 20), "JPEG"))
    out = decode_many(records, 3, None, torch.device("cpu"))
    assert [type(o) for o in out] == [torch.Tensor, BadRecord, torch.Tensor, torch.Tensor]
    assert out[0].shape == (3, 20, 20) and out[2].shape == (3, 24, 24) and out[0].dtype == torch.uint8
    sized = decode_many(records, 3, (20, 20), torch.device("cpu"))
    assert isinstance(sized[2], BadRecord) and "wrong size" in str(sized[2])


class FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda_streams(monkeypatch):
    """The GPU branch's stream handling as no-ops (no GPU here)."""
    import contextlib

    from pipeline.core import images

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)  # page-locking needs a driver
    monkeypatch.setattr(images, "_nvjpeg_broken", False)


def fake_nvjpeg(monkeypatch, calls, fails):
    """torchvision's decode_jpeg replaced by a CPU stand-in that fails a batch (a list) or a record when told."""
    import torchvision.io

    def fake_decode_jpeg(data, mode, device):
        calls.append(type(data).__name__)
        if fails(data):
            raise RuntimeError("nvjpeg: bad JPEG")
        one = lambda t: torchvision.io.decode_image(t, mode=mode)  # noqa: E731
        return [one(t) for t in data] if isinstance(data, list) else one(data)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode_jpeg)


@pytest.mark.parametrize("with_bad", [False, True])
def test_decode_many_sends_a_batch_of_jpegs_to_nvjpeg(monkeypatch, fake_cuda_streams, with_bad):
    from pipeline.core.images import decode_many
    from pipeline.errors import BadRecord
    from tests.imagegen import bad_files, image_bytes, random_array

    rng = np.random.default_rng(6)
    records = [image_bytes(random_array(rng, 20, 20), "JPEG") for _ in range(3)]
    truncated = bad_files(rng)["truncated.jpg"]
    if with_bad:
        records.insert(1, truncated)
    calls = []
    fake_nvjpeg(monkeypatch, calls, lambda data: with_bad and (isinstance(data, list) or len(data) == len(truncated)))
    out = decode_many(records, 3, (20, 20), torch.device("cuda"))
    good = [o for o in out if isinstance(o, torch.Tensor)]
    assert len(good) == 3 and all(o.shape == (3, 20, 20) for o in good)
    assert calls[0] == "list"  # one batched call first, then each JPEG alone if it failed
    assert len(calls) == (5 if with_bad else 1)
    if with_bad:  # nvJPEG failed it alone too: the CPU decoder judged it, and named the reason
        assert isinstance(out[1], BadRecord) and "undecodable" in str(out[1])


def test_a_broken_nvjpeg_is_given_up_with_one_warning(monkeypatch, fake_cuda_streams):
    from pipeline.core import images
    from tests.imagegen import image_bytes, random_array

    rng = np.random.default_rng(7)
    records = [image_bytes(random_array(rng, 20, 20), "JPEG") for _ in range(2)]
    calls = []
    fake_nvjpeg(monkeypatch, calls, lambda data: True)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # the CPU fallback's copy to "cuda"
    with pytest.warns(UserWarning, match="nvJPEG failed on every JPEG"):
        out = images.decode_many(records, 3, None, torch.device("cuda"))
    assert all(isinstance(o, torch.Tensor) for o in out) and images._nvjpeg_broken
    calls.clear()
    images.decode_many(records, 3, None, torch.device("cuda"))
    assert calls == []  # not tried again
