"""Image metrics: MSE, MAE, PSNR and SSIM over batches of channels-last images.

Every function takes two images (or batches) of shape ``(..., H, W, C)``, uint8
or float, numpy or torch, and returns one value per image with the leading dims
``(...)``. Torch in gives torch out (on the input's device); numpy in gives a
float64 numpy array out.

Scale: uint8 images are divided by 255, float images are taken as they are and
assumed to lie in [0, 1] (``data_range=1``). MSE and MAE are therefore in [0, 1]
units for both dtypes, and PSNR/SSIM match scikit-image called with
``data_range=255`` on uint8 or ``data_range=1`` on float. A different float
range can be given with ``data_range``.

SSIM matches ``skimage.metrics.structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=...)``:
11x11 Gaussian window (scikit-image truncates at 3.5 sigma), K1=0.01, K2=0.03,
the SSIM map averaged over the interior that the window covers fully (a
"valid" filter equals scikit-image's filter-then-crop exactly) and over
channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["mse", "mae", "psnr", "ssim", "ssim_map", "object_presence", "object_presence_map", "to_unit_float"]

_SSIM_SIGMA = 1.5
_SSIM_WIN = 11
_K1 = 0.01
_K2 = 0.03


def to_unit_float(x, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a float torch tensor; uint8 is scaled to [0, 1].

    Numpy inputs default to float64 (so results match scikit-image to ~1e-12),
    torch inputs keep float64 if given it and otherwise use float32.
    """
    is_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")
    if dtype is None:
        dtype = torch.float64 if (is_numpy or t.dtype == torch.float64) else torch.float32
    if t.dtype == torch.uint8:
        return t.to(dtype) / 255.0
    if not (t.is_floating_point() or t.dtype == torch.bool):
        # An int32/int64/uint16 image may hold 0..255 or 0..65535: guessing would give silently wrong scores.
        raise TypeError(f"integer images must be uint8 (0..255) or floating point; got {t.dtype}: convert "
                        f"to float and pass data_range")
    return t.to(dtype)


def _prepare(a, b, data_range: float | None):
    """Common conversion: float tensors in [0, 1] scale, a flag for numpy output."""
    is_numpy = isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    dtype = None
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        # Mixed numpy/torch: follow the torch side's precision.
        t = a if isinstance(a, torch.Tensor) else b
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    ta = to_unit_float(a, dtype)
    tb = to_unit_float(b, ta.dtype)
    if isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        tb = tb.to(a.device)
    elif isinstance(b, torch.Tensor) and not isinstance(a, torch.Tensor):
        ta = ta.to(b.device)
    if ta.shape != tb.shape:
        raise ValueError(f"image shapes differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    if ta.dim() < 3:
        raise ValueError(f"expected (..., H, W, C) images, got shape {tuple(ta.shape)}")
    if data_range is not None and data_range != 1.0:
        # Rescale float images given in another range to [0, 1]; a uint8 one already is (each input on its own).
        if not _is_uint8(a):
            ta = ta / data_range
        if not _is_uint8(b):
            tb = tb / data_range
    return ta, tb, is_numpy


def _is_uint8(x) -> bool:
    return (isinstance(x, np.ndarray) and x.dtype == np.uint8) or (
        isinstance(x, torch.Tensor) and x.dtype == torch.uint8
    )


def _out(t: torch.Tensor, is_numpy: bool):
    return t.cpu().numpy() if is_numpy else t


def _pixel_mean(error: torch.Tensor, weight) -> torch.Tensor:
    """Mean of a (..., H, W, C) error over each image; `weight` (..., H, W) >= 0 weighs the pixels."""
    if weight is None:
        return error.mean(dim=(-3, -2, -1))
    w = torch.as_tensor(weight, dtype=error.dtype, device=error.device)
    if w.shape != error.shape[:-1]:
        raise ValueError(f"weight must have the images' shape without channels {tuple(error.shape[:-1])}, "
                         f"got {tuple(w.shape)}")
    if (w < 0).any():
        raise ValueError("weight must be >= 0")
    return (error.mean(-1) * w).sum((-2, -1)) / w.sum((-2, -1))


def mse(a, b, data_range: float | None = None, weight=None):
    """Mean squared error per image over (H, W, C), in [0, 1]-scaled units. Shape (...).

    ``weight`` (..., H, W): a weighted mean over pixels (e.g. object pixels counting w times)."""
    ta, tb, is_numpy = _prepare(a, b, data_range)
    return _out(_pixel_mean((ta - tb).square(), weight), is_numpy)


def mae(a, b, data_range: float | None = None, weight=None):
    """Mean absolute error per image over (H, W, C), in [0, 1]-scaled units. Shape (...).

    ``weight`` (..., H, W): a weighted mean over pixels, as in `mse`."""
    ta, tb, is_numpy = _prepare(a, b, data_range)
    return _out(_pixel_mean((ta - tb).abs(), weight), is_numpy)


def psnr(a, b, data_range: float | None = None):
    """Peak signal-to-noise ratio in dB per image. Shape (...). Identical images give +inf,
    as in scikit-image; rewards that use it clamp."""
    ta, tb, is_numpy = _prepare(a, b, data_range)
    err = (ta - tb).square().mean(dim=(-3, -2, -1))
    # Peak is 1 after scaling to [0, 1]: PSNR = 10 log10(1 / mse).
    return _out(-10.0 * torch.log10(err), is_numpy)


_BANDS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _band(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, n - 10) matrix whose column i holds the Gaussian taps at rows i .. i + 10, so
    ``x @ band`` is a 'valid' 1-D Gaussian filter along the last axis."""
    key = (n, dtype, device)
    if key not in _BANDS:
        r = _SSIM_WIN // 2
        x = torch.arange(-r, r + 1, dtype=torch.float64)
        g = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
        g = g / g.sum()
        m = n - _SSIM_WIN + 1
        band = torch.zeros(n, m, dtype=torch.float64)
        for i in range(m):
            band[i : i + _SSIM_WIN, i] = g
        _BANDS[key] = band.to(dtype=dtype, device=device)
    return _BANDS[key]


def _filter_valid(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian 'valid' filter of (..., H, W) -> (..., H-10, W-10).

    Two matmuls with banded matrices: on CPU this is ~20x faster than a depthwise
    conv2d (which has no fast kernel there) and gives the same sums.
    """
    h, w = x.shape[-2:]
    x = x @ _band(w, x.dtype, x.device)  # (..., H, W-10)
    return (x.transpose(-1, -2) @ _band(h, x.dtype, x.device)).transpose(-1, -2)


def _ssim_valid_map(ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) unit-range images -> (N, H-10, W-10) SSIM map over the fully covered interior,
    averaged over channels."""
    n, h, w, c = ta.shape
    if h < _SSIM_WIN or w < _SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WIN}x{_SSIM_WIN}, got {h}x{w}")
    x = ta.permute(0, 3, 1, 2)  # (N, C, H, W)
    y = tb.permute(0, 3, 1, 2)
    # Filter the five moment maps of every channel in one pass.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5C, H, W)
    mu = _filter_valid(stack)
    ux, uy, uxx, uyy, uxy = mu.split(c, dim=1)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = _K1**2  # data range is 1 after scaling
    c2 = _K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=1)


def ssim(a, b, data_range: float | None = None):
    """Mean structural similarity per image (Gaussian window, averaged over channels). Shape (...)."""
    ta, tb, is_numpy = _prepare(a, b, data_range)
    *lead, h, w, c = ta.shape
    n = math.prod(lead) if lead else 1
    s = _ssim_valid_map(ta.reshape(n, h, w, c), tb.reshape(n, h, w, c))
    return _out(s.mean(dim=(1, 2)).reshape(lead), is_numpy)


def ssim_map(a, b, data_range: float | None = None):
    """Per-pixel SSIM (..., H, W) whose mean over (H, W) is `ssim(a, b)` exactly: the map over the interior
    the 11x11 window covers fully, and in the 5-pixel border (which scikit-image's mean crops) that
    interior's mean, so the border neither earns nor loses anything of its own."""
    ta, tb, is_numpy = _prepare(a, b, data_range)
    *lead, h, w, c = ta.shape
    n = math.prod(lead) if lead else 1
    inner = _ssim_valid_map(ta.reshape(n, h, w, c), tb.reshape(n, h, w, c))  # (N, H-10, W-10)
    r = _SSIM_WIN // 2
    full = inner.mean(dim=(1, 2))[:, None, None].expand(n, h, w).clone()
    full[:, r:h - r, r:w - r] = inner
    return _out(full.reshape(*lead, h, w), is_numpy)


def object_presence(pred, true, segmentation, threshold: float = 0.2, erode: int = 1,
                    max_objects: int = 6) -> torch.Tensor:
    """Per image and object: the share of the object's interior pixels drawn within ``threshold``
    RGB distance (Euclidean, [0, 1] units) of the true image.

    pred, true: (..., H, W, 3) images (uint8 or [0, 1] float); segmentation: (..., H, W) ints with
    0 = background and k = object k (envs3d's convention). The interior is the object's mask eroded
    by ``erode`` pixels (a (2e+1)^2 square), so the metric asks "is the object's colour there" and
    not "are its one-pixel edges exact" (a 3x3 blur of the truth keeps ~99.6% of interiors, ~64% of
    whole masks). Returns (..., max_objects) float: NaN where the object has no interior pixel.

    >>> img = torch.zeros(1, 4, 4, 3); img[0, :3, :3] = 1.0
    >>> seg = torch.zeros(1, 4, 4, dtype=torch.long); seg[0, :3, :3] = 1
    >>> object_presence(img, img, seg, max_objects=1).tolist()   # interior is the centre pixel
    [[1.0]]
    """
    shares, _ = _presence(pred, true, segmentation, threshold, erode, max_objects)
    return shares


def object_presence_map(pred, true, segmentation, threshold: float = 0.2, erode: int = 1,
                        max_objects: int = 6) -> torch.Tensor:
    """Per pixel (..., H, W): where `object_presence` comes from. An interior pixel of object k that is
    drawn within ``threshold`` holds H*W / (interior_k * visible objects), every other pixel 0, so the
    map's mean over (H, W) is the mean over visible objects of their shares (0 with no visible object).

    >>> img = torch.zeros(1, 4, 4, 3); img[0, :3, :3] = 1.0
    >>> seg = torch.zeros(1, 4, 4, dtype=torch.long); seg[0, :3, :3] = 1
    >>> object_presence_map(img, img, seg, max_objects=1).mean().item()
    1.0
    """
    shares, parts = _presence(pred, true, segmentation, threshold, erode, max_objects)
    close, masks, counts = parts  # (M, H, W) bool, (K, M, H, W) bool, (K, M)
    m, h, w = close.shape
    visible = (counts > 0).sum(0).clamp_min(1).float()  # (M,)
    out = torch.zeros(m, h, w, device=close.device)
    for mask, count in zip(masks, counts):
        share_of_frame = (h * w) / (count.clamp_min(1).float() * visible)  # (M,)
        out += (close & mask).float() * share_of_frame[:, None, None]
    return out.reshape(*shares.shape[:-1], h, w)


def _presence(pred, true, segmentation, threshold, erode, max_objects):
    pred_t, true_t = to_unit_float(pred, torch.float32), to_unit_float(true, torch.float32)
    seg = torch.as_tensor(segmentation).to(pred_t.device)
    lead, (h, w) = seg.shape[:-2], seg.shape[-2:]
    close = ((pred_t - true_t.to(pred_t.device)).norm(dim=-1) < threshold).reshape(-1, h, w)  # (M, H, W)
    seg = seg.reshape(-1, h, w)
    out = torch.full((seg.shape[0], max_objects), float("nan"), device=pred_t.device)
    masks, counts = [], []
    for k in range(1, max_objects + 1):
        mask = (seg == k).float()[:, None]
        if erode:
            # A pixel is interior when its whole (2e+1)^2 neighbourhood is the object (-maxpool of -mask).
            mask = -torch.nn.functional.max_pool2d(-mask, 2 * erode + 1, stride=1, padding=erode)
        mask = mask[:, 0] > 0.5
        count = mask.sum((1, 2))
        hits = (close & mask).sum((1, 2))
        out[:, k - 1] = torch.where(count > 0, hits.float() / count.clamp_min(1), out[:, k - 1])
        masks.append(mask)
        counts.append(count)
    return out.reshape(*lead, max_objects), (close, masks, torch.stack(counts))
