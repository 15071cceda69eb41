"""Metrics agree with scikit-image (uint8 and float, batched, numpy and torch)."""

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from posttrain.rewards import metrics
from posttrain.rewards.synthetic import make_episode


def _sk_ssim(a, b, data_range):
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=data_range
    )


def _pairs():
    rng = np.random.default_rng(0)
    noise_a = rng.integers(0, 256, (2, 3, 24, 31, 3), dtype=np.uint8)
    noise_b = np.clip(noise_a.astype(int) + rng.integers(-40, 41, noise_a.shape), 0, 255).astype(np.uint8)
    ep = make_episode(1, num_steps=4, height=40, width=48)
    struct_a = ep["frames"][None]  # (1, 4, 40, 48, 3) structured scene
    struct_b = np.roll(struct_a, 2, axis=3)
    return [(noise_a, noise_b), (struct_a, struct_b)]


# SSIM in float32: local variances are E[x^2] - E[x]^2, each rounded to ~eps * data_range^2, and divided by
# sigma_x^2 + sigma_y^2 + C2 >= C2 = (0.03 data_range)^2; so the error is at most ~2 eps / 0.03^2 (2.6e-4),
# whatever the CPU's summation order (the test images' variances are far above C2, so it is usually ~1e-6).
FLOAT32_SSIM_TOL = 2 * float(np.finfo(np.float32).eps) / 0.03**2


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("as_float", [False, True])
@pytest.mark.parametrize("as_torch", [False, True])
def test_matches_skimage(case, as_float, as_torch):
    a, b = _pairs()[case]
    lead = a.shape[:-3]
    fa, fb = a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])
    dr = 1.0 if as_float else 255
    conv = (lambda x: x.astype(np.float64) / 255.0) if as_float else (lambda x: x)
    want_ssim = np.array([_sk_ssim(conv(x), conv(y), dr) for x, y in zip(fa, fb)]).reshape(lead)
    want_psnr = np.array([peak_signal_noise_ratio(conv(x), conv(y), data_range=dr) for x, y in zip(fa, fb)])
    want_mse = np.array([mean_squared_error(x / 255.0, y / 255.0) for x, y in zip(fa, fb)])
    xa, xb = conv(a), conv(b)
    if as_torch:
        xa, xb = torch.from_numpy(xa), torch.from_numpy(xb)
    got_ssim, got_psnr, got_mse = metrics.ssim(xa, xb), metrics.psnr(xa, xb), metrics.mse(xa, xb)
    assert type(got_ssim) is (torch.Tensor if as_torch else np.ndarray)
    assert tuple(got_ssim.shape) == lead and tuple(got_psnr.shape) == lead
    # torch uint8 computes in float32; numpy and float64 inputs in float64.
    low = as_torch and not as_float
    tol = 1e-9
    np.testing.assert_allclose(np.asarray(got_ssim), want_ssim, atol=FLOAT32_SSIM_TOL if low else tol)
    np.testing.assert_allclose(np.asarray(got_psnr).ravel(), want_psnr, atol=2e-3 if low else 1e-7)
    np.testing.assert_allclose(np.asarray(got_mse).ravel(), want_mse, atol=2e-5 if low else tol)


def test_float32_torch_close_to_skimage_and_identity():
    a, b = _pairs()[1]
    ta = torch.from_numpy(a).float() / 255
    tb = torch.from_numpy(b).float() / 255
    want = _sk_ssim(a[0, 2], b[0, 2], 255)
    assert abs(float(metrics.ssim(ta, tb)[0, 2]) - want) < FLOAT32_SSIM_TOL
    assert torch.allclose(metrics.ssim(ta, ta), torch.ones(1, 4), atol=1e-6)
    assert torch.isinf(metrics.psnr(ta, ta)).all()
    assert float(metrics.mae(ta, tb)[0, 0]) == pytest.approx(np.abs(a[0, 0] / 255.0 - b[0, 0] / 255.0).mean(), abs=1e-6)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mse(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_weighted_mse_and_mae_match_numpy_average():
    rng = np.random.default_rng(3)
    a, b = rng.random((2, 5, 6, 3)), rng.random((2, 5, 6, 3))
    weight = rng.integers(1, 6, size=(2, 5, 6)).astype(np.float64)
    for fn, err in [(metrics.mse, np.square(a - b)), (metrics.mae, np.abs(a - b))]:
        expected = [np.average(err[i].mean(-1), weights=weight[i]) for i in range(2)]
        np.testing.assert_allclose(fn(a, b, weight=weight), expected, rtol=1e-12)
        # Equal weights are the plain mean.
        np.testing.assert_allclose(fn(a, b, weight=np.full((2, 5, 6), 7.0)), fn(a, b), rtol=1e-12)
    with pytest.raises(ValueError, match="without channels"):
        metrics.mse(a, b, weight=weight[..., None])
    with pytest.raises(ValueError, match=">= 0"):
        metrics.mse(a, b, weight=-weight)


def test_other_integer_images_are_refused_and_mixed_ranges_rescale_each_side():
    import pytest

    from posttrain.rewards import metrics as M

    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    b8 = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="int64"):
        M.psnr(a8.astype(np.int64), b8)
    # uint8 beside a float image in 0..255 with data_range=255: the float side is rescaled, the uint8 side not.
    np.testing.assert_allclose(M.psnr(a8, b8.astype(np.float64), data_range=255), M.psnr(a8, b8), rtol=1e-12)
    np.testing.assert_allclose(M.ssim(a8.astype(np.float64), b8, data_range=255), M.ssim(a8, b8), rtol=1e-10)
