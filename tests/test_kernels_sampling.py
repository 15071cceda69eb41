"""Tests of posttrain.kernels.sample: Triton kernel vs torch reference vs an independent oracle.

Without CUDA the Triton kernel runs on the CPU interpreter, switched on for this module only
(see ``_triton_interp``, imported first on purpose). Shapes stay tiny: the interpreter runs
every program instance in Python. With CUDA the same tests run the compiled kernel.
"""

# isort: off
from _triton_interp import DEVICE, needs_triton, triton_interpret  # noqa: F401  (first: sets up Triton's mode)
# isort: on

import math
import zlib

import pytest
import torch
from tolerances import logprob_bound

from posttrain.kernels import sample, sample_reference, triton_available

CONFIGS = [
    dict(),
    dict(temperature=0.7),
    dict(top_k=50),
    dict(top_p=0.9),
    dict(temperature=1.5, top_k=200, top_p=0.8),
    dict(temperature=0.5, top_p=0.3),
]


def _oracle_probs(x, temperature=1.0, top_k=None, top_p=None):
    """Filtered sampling distribution of one tie-free row, from the definition, in float64."""
    x = x.double()
    order = torch.argsort(x, descending=True)
    p = torch.softmax(x / temperature, -1)
    keep = torch.zeros_like(x, dtype=torch.bool)
    n = len(x) if top_k is None else min(top_k, len(x))
    keep[order[:n]] = True
    if top_p is not None:
        ps = p[order[:n]] / p[order[:n]].sum()
        before = torch.cumsum(ps, 0) - ps  # mass strictly above each sorted token
        keep[:] = False
        keep[order[:n][before < top_p]] = True
    q = torch.where(keep, p, 0.0)
    return q / q.sum()


def _tv_bound(n, support, delta=1e-6):
    # E[TV] <= 0.5 * sqrt(K/n) (Cauchy-Schwarz on E|p_hat - p|); TV moves by <= 1/n per sample,
    # so McDiarmid adds sqrt(ln(1/delta) / (2n)) for failure probability delta.
    return 0.5 * math.sqrt(support / n) + math.sqrt(math.log(1 / delta) / (2 * n))


@needs_triton
@pytest.mark.parametrize("shape", [(7, 1000), (5, 4097)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_kernel_matches_reference(shape, cfg):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, cfg)).encode()))
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE)  # tie-free with probability 1
    u = torch.rand(shape[0], generator=g).to(DEVICE)
    a = sample(x, uniform=u, return_full_logprobs=True, backend="triton", **cfg)
    b = sample(x, uniform=u, return_full_logprobs=True, backend="torch", **cfg)
    assert a.tokens.dtype == torch.int64 and a.tokens.shape == (shape[0],)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.full_logprobs, b.full_logprobs, rtol=1e-5, atol=1e-5)
    # Both agree with the oracle distribution's log-probs of the chosen tokens.
    for r in range(shape[0]):
        q = _oracle_probs(x[r].cpu(), cfg.get("temperature", 1.0), cfg.get("top_k"), cfg.get("top_p"))
        t = int(a.tokens[r])
        assert q[t] > 0
        bound = logprob_bound(x[r].cpu(), cfg.get("temperature", 1.0))
        assert abs(float(a.logprobs[r]) - math.log(q[t])) < bound
        full = torch.log_softmax(x[r].cpu().double() / cfg.get("temperature", 1.0), -1)[t]
        assert abs(float(a.full_logprobs[r]) - float(full)) < bound


# fp16/bf16 logits are upcast exactly to fp32 on both paths, so tokens must agree and
# log-probs only differ by fp32 summation order; the tolerances say so per dtype.
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
def test_dtypes_and_non_contiguous(dtype):
    g = torch.Generator().manual_seed(1)
    big = (torch.randn(6, 2 * 513, generator=g) * 2).to(device=DEVICE, dtype=dtype)
    for x in (big, big[:, ::2], big[:, :513].t().contiguous().t()):  # contiguous, strided, column-major
        u = torch.rand(x.shape[0], generator=g).to(DEVICE)
        a = sample(x, uniform=u, top_k=40, top_p=0.95, temperature=0.8, return_full_logprobs=True, backend="triton")
        b = sample(x, uniform=u, top_k=40, top_p=0.95, temperature=0.8, return_full_logprobs=True, backend="torch")
        assert torch.equal(a.tokens, b.tokens)
        tol = DTYPE_TOL[dtype]
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=tol, atol=tol)
        torch.testing.assert_close(a.full_logprobs, b.full_logprobs, rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", [dict(temperature=0.6), dict(top_k=5), dict(top_p=0.7), dict(temperature=1.4, top_k=8, top_p=0.85)])
def test_distribution_reference_large_n(cfg):
    g = torch.Generator().manual_seed(2)
    V, n = 24, 200_000
    row = torch.randn(V, generator=g) * 1.5
    out = sample(row.expand(n, V), generator=g, backend="torch", **cfg)
    freq = torch.bincount(out.tokens, minlength=V).double() / n
    q = _oracle_probs(row, cfg.get("temperature", 1.0), cfg.get("top_k"), cfg.get("top_p"))
    assert torch.all(freq[q == 0] == 0), "a filtered-out token was sampled"
    tv = 0.5 * (freq - q).abs().sum().item()
    assert tv < _tv_bound(n, int((q > 0).sum())), tv


@needs_triton
@pytest.mark.parametrize("cfg, n", [(dict(temperature=0.6), 256), (dict(top_k=5, top_p=0.8), 128)])
def test_distribution_kernel_few_hundred_rows(cfg, n):
    g = torch.Generator().manual_seed(3)
    V = 12
    row = torch.randn(V, generator=g)
    out = sample(row.expand(n, V).to(DEVICE), uniform=torch.rand(n, generator=g).to(DEVICE), backend="triton", **cfg)
    freq = torch.bincount(out.tokens.cpu(), minlength=V).double() / n
    q = _oracle_probs(row, cfg.get("temperature", 1.0), cfg.get("top_k"), cfg.get("top_p"))
    assert torch.all(freq[q == 0] == 0)
    assert 0.5 * (freq - q).abs().sum().item() < _tv_bound(n, int((q > 0).sum()))


BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_and_top_k_1(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 300, generator=g)
    x[0, 7] = x[0, 9] = x[0].max() + 1  # tie at the max: greedy takes the first index
    x = x.to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for out, t_full in ((sample(x, temperature=0.0, return_full_logprobs=True, generator=gen, backend=backend), 1.0),
                        (sample(x, top_k=1, temperature=0.5, return_full_logprobs=True, backend=backend), 0.5)):
        assert torch.equal(out.tokens, x.argmax(-1)) and int(out.tokens[0]) == 7
        assert torch.equal(out.logprobs.cpu(), torch.zeros(6))
        want = torch.log_softmax(x / t_full, -1).gather(-1, out.tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(out.full_logprobs, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen.get_state(), torch.Generator(device=DEVICE).manual_seed(0).get_state())  # no uniform drawn


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_top_p_and_tiny_temperature_pick_the_top(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 500, generator=g).to(DEVICE)
    u = torch.tensor([0.0, 0.3, 0.5, 0.9, 0.999, 1 - 2**-24, 0.1, 0.7], device=DEVICE)
    for cfg in (dict(top_p=1e-9), dict(temperature=1e-8), dict(temperature=1e-45, top_k=10)):
        out = sample(x, uniform=u, backend=backend, **cfg)
        assert torch.equal(out.tokens, x.argmax(-1)), cfg
        torch.testing.assert_close(out.logprobs.cpu(), torch.zeros(8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits_never_sampled(backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 200, generator=g)
    x[:, 1::2] = float("-inf")  # half the vocabulary banned
    x[1, :] = float("-inf")
    x[1, 123] = 0.5  # all but one banned
    u = torch.rand(16, generator=g)
    u[0], u[2], u[3] = 0.0, 1 - 2**-24, 0.5
    x, u = x.to(DEVICE), u.to(DEVICE)
    for cfg in (dict(), dict(top_k=150), dict(top_p=0.99), dict(temperature=3.0, top_k=90, top_p=0.9)):
        out = sample(x, uniform=u, return_full_logprobs=True, backend=backend, **cfg)
        assert torch.isfinite(x.gather(-1, out.tokens[:, None])).all(), cfg
        assert int(out.tokens[1]) == 123 and float(out.logprobs[1]) == 0.0 and float(out.full_logprobs[1]) == 0.0
        assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.full_logprobs).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_follow_threshold_semantics(backend):
    # logits 5, 3, 3, 3, 1, ...: top_k=2 has threshold 3, so all three tied 3s are kept.
    x = torch.full((1, 64), -2.0, device=DEVICE)
    x[0, :5] = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0], device=DEVICE)
    n = 48
    u = (torch.arange(n, dtype=torch.float32, device=DEVICE) + 0.5) / n  # a grid sweeps the whole CDF
    out = sample(x.expand(n, 64), uniform=u, top_k=2, backend=backend)
    assert set(out.tokens.tolist()) == {0, 1, 2, 3}
    z = math.exp(5) + 3 * math.exp(3)
    assert abs(float(out.logprobs[out.tokens == 1][0]) - (3 - math.log(z))) < logprob_bound(x[0].cpu())
    # top_p cut inside a tie keeps the whole tie: mass(5) < 0.5 <= mass(>= 3) keeps {0,1,2,3}.
    y = torch.tensor([[2.0, 2.0, 2.0, 0.0]], device=DEVICE)
    out = sample(y.expand(n, 4), uniform=u, top_p=0.5, backend=backend)
    assert set(out.tokens.tolist()) == {0, 1, 2}


@needs_triton
def test_uniform_extremes_and_generator():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 100, generator=g).to(DEVICE)
    for backend in ("triton", "torch"):
        first = sample(x, uniform=torch.zeros(4, device=DEVICE), top_k=10, backend=backend).tokens
        top10 = torch.topk(x, 10).indices
        assert torch.equal(first, top10.min(-1).values)  # u=0: first kept token in index order
        last = sample(x, uniform=torch.full((4,), 1 - 2**-24, device=DEVICE), top_k=10, backend=backend).tokens
        assert torch.equal(last, top10.max(-1).values)
    a = sample(x, generator=torch.Generator(device=DEVICE).manual_seed(11), backend="triton").tokens
    b = sample(x, generator=torch.Generator(device=DEVICE).manual_seed(11), backend="torch").tokens
    assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_reference_equals_inverse_cdf_by_hand(cfg):
    """`sample_reference` against an inverse CDF written out here in float64 from the definition
    (`_oracle_probs`: softmax of x / T, top-k, then top-p renormalised over the top-k set), with the
    SAME uniforms: token = first index, in vocabulary order, whose cumulative probability exceeds u.
    Rows whose u lies within 1e-5 of a CDF step are skipped (fp32 vs fp64 rounding may differ there)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(cfg).encode()))
    rows, vocab = 64, 300
    x = torch.randn(rows, vocab, generator=g) * 2  # tie-free with probability 1
    u = torch.rand(rows, generator=g)
    temperature, top_k, top_p = cfg.get("temperature", 1.0), cfg.get("top_k"), cfg.get("top_p")
    tokens, logprobs, full = sample_reference(x, u, temperature, top_k, top_p)
    compared = 0
    for r in range(rows):
        q = _oracle_probs(x[r], temperature, top_k, top_p)
        cdf = torch.cumsum(q, 0)
        if (cdf - float(u[r])).abs().min() < 1e-5:
            continue
        want = int(torch.searchsorted(cdf, torch.tensor([float(u[r])], dtype=torch.float64), right=True))
        assert int(tokens[r]) == want, (r, int(tokens[r]), want)
        bound = logprob_bound(x[r], temperature)
        assert abs(float(logprobs[r]) - math.log(q[want])) < bound
        assert abs(float(full[r]) - float(torch.log_softmax(x[r].double() / temperature, -1)[want])) < bound
        compared += 1
    assert compared >= rows - 2
    # The public entry point runs the same reference on the torch backend.
    assert torch.equal(sample(x, uniform=u, backend="torch", **cfg).tokens, tokens)


def test_empty_batch():
    out = sample(torch.empty(0, 50), return_full_logprobs=True)
    assert out.tokens.shape == (0,) and out.full_logprobs.shape == (0,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "1.5"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "2.5"),
        (dict(temperature=-0.1), "-0.1"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(uniform=torch.rand(5)), r"\(5,\)"),
        (dict(uniform=torch.rand(4, 1)), r"\(4, 1\)"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.randn(4, 10), **kwargs)


def test_bad_logits_and_uniform_device():
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        sample(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="floating"):
        sample(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="meta"):
        sample(torch.randn(2, 3), uniform=torch.rand(2, device="meta"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_kernel_matches_reference(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(256, 32768, device="cuda", generator=g) * 3).to(dtype)
    assert triton_available(x)
    for cfg in CONFIGS:
        u = torch.rand(256, device="cuda", generator=g)
        a = sample(x, uniform=u, return_full_logprobs=True, backend="triton", **cfg)
        b = sample(x, uniform=u, return_full_logprobs=True, backend="torch", **cfg)
        # Rounding may flip a token whose CDF boundary sits within an ulp of u: allow 1 in 256.
        assert (a.tokens != b.tokens).sum() <= 1, cfg
        same = a.tokens == b.tokens
        torch.testing.assert_close(a.logprobs[same], b.logprobs[same], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.full_logprobs[same], b.full_logprobs[same], rtol=1e-4, atol=1e-4)
