"""BYOL's asymmetric two-view augmentation (paper, Table 6) as batched tensor operations.

Every random parameter is drawn per image (torchvision transforms applied to a batched tensor
draw once per batch, the flaw reported in pytorch/vision#2929). The work is split in two stages so
it can run where it is cheapest (DeepMind crops in the input pipeline and does the rest on the
accelerator):

* spatial: random resized crop (+ flip, optional rotation) to a fixed size, one affine
  ``grid_sample`` per batch (bicubic, as the paper); variable-size images go one by one.
* photometric: colour jitter in a random order per image, grayscale, Gaussian blur, solarize,
  optional random erasing, then normalisation with the dataset mean/std. Runs on CPU or GPU (there as
  masked arithmetic over the whole batch: nothing reads a mask back to the host).

torchvision's v2 functionals take one parameter value per call, which is exactly what must not
happen here, so the per-image versions are written as masked tensor arithmetic.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import AugmentConfig, ViewConfig
from pipeline.core.images import to_device

_LUMA = (0.299, 0.587, 0.114)


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS: data-pipeline processes must not share torch's default seed."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _bernoulli(n: int, p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


# ----------------------------------------------------------------------------------------------
# Spatial stage
# ----------------------------------------------------------------------------------------------


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator,
    tries: int = 10,
) -> torch.Tensor:
    """Per image (cx, cy, w, h) in pixels, sampled as torchvision's RandomResizedCrop.get_params.

    Area fraction ~ U[scale], aspect ratio ~ log-U[ratio]; the first of ``tries`` candidates that
    fits is kept, else the whole image.
    """
    n, device = heights.shape[0], heights.device
    H, W = heights.float()[:, None], widths.float()[:, None]
    area = H * W * (torch.rand(n, tries, generator=gen, device=device) * (scale[1] - scale[0]) + scale[0])
    log_r = torch.rand(n, tries, generator=gen, device=device) * (math.log(ratio[1]) - math.log(ratio[0]))
    aspect = torch.exp(log_r + math.log(ratio[0]))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w >= 1) & (h >= 1) & (w <= W) & (h <= H)
    first = torch.argmax(fits.int(), dim=1)  # index of the first fitting candidate (0 if none)
    any_fit = fits.any(dim=1)
    rows = torch.arange(n, device=device)
    w = torch.where(any_fit, w[rows, first], W[:, 0])
    h = torch.where(any_fit, h[rows, first], H[:, 0])
    x0 = torch.floor(torch.rand(n, generator=gen, device=device) * (W[:, 0] - w + 1))
    y0 = torch.floor(torch.rand(n, generator=gen, device=device) * (H[:, 0] - h + 1))
    return torch.stack([x0 + w / 2, y0 + h / 2, w, h], dim=1)


def crop_thetas(
    boxes: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, flip: torch.Tensor, angle_deg: torch.Tensor
) -> torch.Tensor:
    """Affine matrices (normalised coordinates, align_corners=False) mapping output to the crop."""
    cx, cy, w, h = boxes.unbind(1)
    W, H = widths.float(), heights.float()
    sign = torch.where(flip, -1.0, 1.0).to(boxes)
    a = torch.deg2rad(angle_deg.to(boxes))
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack(
        [
            torch.stack([w * sign * cos / W, -h * sin / W, 2 * cx / W - 1], dim=1),
            torch.stack([w * sign * sin / H, h * cos / H, 2 * cy / H - 1], dim=1),
        ],
        dim=1,
    )
    return theta


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def random_resized_crop(
    images: torch.Tensor | list[torch.Tensor],
    size: int,
    cfg: AugmentConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """Crop, flip and (optionally) rotate each image with its own parameters; float [N, C, size, size] in [0, 1].

    ``images`` is a uint8 or float batch [N, C, H, W], or a list of [C, H_i, W_i] of varying sizes.
    """
    if isinstance(images, torch.Tensor):
        n, device = images.shape[0], images.device
        heights = torch.full((n,), images.shape[2], device=device)
        widths = torch.full((n,), images.shape[3], device=device)
    else:
        n, device = len(images), images[0].device
        heights = to_device(torch.tensor([im.shape[1] for im in images]), device)
        widths = to_device(torch.tensor([im.shape[2] for im in images]), device)
    boxes = sample_crop_boxes(heights, widths, (cfg.crop_scale_min, cfg.crop_scale_max), (3 / 4, 4 / 3), gen)
    flip = _bernoulli(n, cfg.hflip_prob, gen, device)
    angle = _uniform(n, -cfg.rotation_degrees, cfg.rotation_degrees, gen, device)
    theta = crop_thetas(boxes, heights, widths, flip, angle)
    if isinstance(images, torch.Tensor):
        x = _to_float(images)
        grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
        # "border": bicubic taps past the edge repeat the edge pixel (zeros would darken border crops)
        out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    else:
        outs = []
        for i, image in enumerate(images):
            x = _to_float(image)[None]
            grid = F.affine_grid(theta[i : i + 1], [1, x.shape[1], size, size], align_corners=False)
            outs.append(F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False))
        out = torch.cat(outs)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots


# ----------------------------------------------------------------------------------------------
# Photometric stage
# ----------------------------------------------------------------------------------------------


@dataclass
class PhotometricParams:
    """One view's per-image random parameters; masks say which op applies to which image."""

    jitter: torch.Tensor  # [N] bool
    order: torch.Tensor  # [N, 4] permutation of (brightness, contrast, saturation, hue)
    brightness: torch.Tensor  # [N] factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # [N] shift in turns
    grayscale: torch.Tensor  # [N] bool
    blur: torch.Tensor  # [N] bool
    sigma: torch.Tensor  # [N]
    solarize: torch.Tensor  # [N] bool
    erase: torch.Tensor  # [N] bool
    erase_boxes: torch.Tensor  # [N, 4] fractional (y0, x0, h, w)


def sample_photometric(
    n: int, cfg: AugmentConfig, view: ViewConfig, gen: torch.Generator, device: torch.device | str = "cpu"
) -> PhotometricParams:
    device = torch.device(device)
    area = _uniform(n, 0.02, 0.33, gen, device)
    aspect = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), gen, device))
    eh, ew = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
    ey0, ex0 = (
        torch.rand(n, generator=gen, device=device) * (1 - eh),
        torch.rand(n, generator=gen, device=device) * (1 - ew),
    )
    return PhotometricParams(
        jitter=_bernoulli(n, cfg.jitter_prob, gen, device),
        order=torch.argsort(torch.rand(n, 4, generator=gen, device=device), dim=1),
        brightness=_uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, gen, device),
        contrast=_uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, gen, device),
        saturation=_uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, gen, device),
        hue=_uniform(n, -cfg.hue, cfg.hue, gen, device),
        grayscale=_bernoulli(n, cfg.grayscale_prob, gen, device),
        blur=_bernoulli(n, view.blur_prob if cfg.blur else 0.0, gen, device),
        sigma=_uniform(n, 0.1, 2.0, gen, device),
        solarize=_bernoulli(n, view.solarize_prob, gen, device),
        erase=_bernoulli(n, cfg.erase_prob, gen, device),
        erase_boxes=torch.stack([ey0, ex0, eh, ew], dim=1),
    )


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * _per_image(factor) + mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    gray = _gray(x)
    return ((x - gray) * _per_image(factor) + gray).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns per image (RGB -> HSV -> RGB)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    v = maxc

    # HSV -> RGB, the branch-free form: f(n) = v - v s max(0, min(k, 4 - k, 1)), k = (n + 6h) mod 6
    def channel(n: float) -> torch.Tensor:
        k = (n + h * 6) % 6
        return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

    return torch.stack([channel(5), channel(3), channel(1)], dim=1)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    return _gray(x).expand_as(x).contiguous()


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, kernel ~10% of the image side (23 px at 224), one sigma per image."""
    n, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-(r[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n*c, k]
    y = x.reshape(1, n * c, h, w)
    pad = k // 2
    y = F.conv2d(
        F.pad(y, (pad, pad, 0, 0), mode="reflect" if w > pad else "replicate"), kernel[:, None, None, :], groups=n * c
    )
    y = F.conv2d(
        F.pad(y, (0, 0, pad, pad), mode="reflect" if h > pad else "replicate"), kernel[:, None, :, None], groups=n * c
    )
    return y.reshape(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0.5, 1.0 - x, x)


def random_erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero a rectangle per image (after normalisation, so 0 is the dataset mean)."""
    n, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1) / h
    xs = torch.arange(w, device=x.device).view(1, 1, w) / w
    y0, x0, bh, bw = (b.view(n, 1, 1) for b in boxes.unbind(1))
    inside = (ys >= y0) & (ys < y0 + bh) & (xs >= x0) & (xs < x0 + bw)
    return x.masked_fill(inside[:, None], 0.0)


_JITTER_OPS = (
    (adjust_brightness, "brightness"),
    (adjust_contrast, "contrast"),
    (adjust_saturation, "saturation"),
    (adjust_hue, "hue"),
)


def _apply_where(x: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor, masked: bool) -> torch.Tensor:
    """``fn(x, *args)`` for the images in ``mask``, ``x`` for the others.

    ``masked``: every image goes through ``fn`` and ``torch.where`` picks, so the host never reads the mask (on an
    accelerator, ``mask.any()`` or ``nonzero`` would wait for the device at every op). Otherwise only the masked
    images are computed, written into ``x`` (the caller's private copy): cheaper on CPU, where reading is free.
    """
    if masked:
        return torch.where(_per_image(mask), fn(x, *args), x)
    if not bool(mask.any()):
        return x
    idx = mask.nonzero().squeeze(1)
    x[idx] = fn(x[idx], *(a[idx] for a in args))
    return x


def apply_photometric(
    x: torch.Tensor, p: PhotometricParams, mean: torch.Tensor, std: torch.Tensor, masked: bool | None = None
) -> torch.Tensor:
    """Colour jitter (random order per image) -> grayscale -> blur -> solarize -> normalise -> erase.

    ``masked`` (default: off the CPU) computes every op on every image and selects: no host synchronisation.
    """
    masked = x.device.type != "cpu" if masked is None else masked
    if not masked:
        x = x.clone()  # one copy; the ops below write into it image subset by image subset
    for stage in range(4):
        for op_index, (fn, name) in enumerate(_JITTER_OPS):
            x = _apply_where(x, p.jitter & (p.order[:, stage] == op_index), fn, getattr(p, name), masked=masked)
    if x.shape[1] == 3:
        x = _apply_where(x, p.grayscale, to_grayscale, masked=masked)
    x = _apply_where(x, p.blur, gaussian_blur, p.sigma, masked=masked)
    x = _apply_where(x, p.solarize, solarize, masked=masked)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return _apply_where(x, p.erase, random_erase, p.erase_boxes, masked=masked)


class TwoViewAugment:
    """The paper's asymmetric pair: view 1 always blurred, never solarized; view 2 blurred 10%, solarized 20%."""

    def __init__(self, cfg: AugmentConfig, image_size: int, mean: list[float], std: list[float]) -> None:
        self.cfg = cfg
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # on each device, copied once

    def spatial(
        self, images: torch.Tensor | list[torch.Tensor], gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent crops of every image, float in [0, 1]."""
        gen = gen or fresh_generator()
        return (
            random_resized_crop(images, self.image_size, self.cfg, gen),
            random_resized_crop(images, self.image_size, self.cfg, gen),
        )

    def photometric(
        self, view1: torch.Tensor, view2: torch.Tensor, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = view1.device
        gen = gen or fresh_generator(device)
        if device not in self._stats:  # a copy to a GPU waits for it: once, not every batch
            self._stats[device] = (to_device(self.mean, device), to_device(self.std, device))
        mean, std = self._stats[device]
        p1 = sample_photometric(view1.shape[0], self.cfg, self.cfg.view1, gen, device)
        p2 = sample_photometric(view2.shape[0], self.cfg, self.cfg.view2, gen, device)
        return apply_photometric(view1, p1, mean, std), apply_photometric(view2, p2, mean, std)

    def __call__(
        self, images: torch.Tensor | list[torch.Tensor], gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gen = gen or fresh_generator()
        return self.photometric(*self.spatial(images, gen), gen)


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Evaluation-time preprocessing: [0, 1] floats (or uint8) -> dataset-normalised."""
    x = _to_float(x)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
