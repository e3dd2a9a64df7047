"""The stretch exercises (exercises/stretch.py), each checked on its own terms: the quantizer by the
nearest-code rule and its gradients, v-prediction by its identities and an exact oracle, Heun by its
order of convergence."""
import math

import pytest
import torch

from exercises import stretch


@pytest.mark.exercise("stretch_vq", points=3)
def test_vq_picks_the_nearest_code():
    torch.manual_seed(0)
    vq = stretch.VectorQuantizer(37, 6)
    z = torch.randn(4, 9, 6)
    quantized, indices, _ = vq(z)
    assert indices.shape == (4, 9) and indices.dtype == torch.long
    brute = torch.cdist(z.reshape(-1, 6), vq.codebook.detach()).argmin(1).view(4, 9)
    assert torch.equal(indices, brute)
    torch.testing.assert_close(quantized, vq.codebook.detach()[indices])


@pytest.mark.exercise("stretch_vq", points=3)
def test_vq_gradients_straight_through_and_commitment():
    torch.manual_seed(1)
    vq = stretch.VectorQuantizer(16, 4, beta=0.25)
    z = torch.randn(50, 4, requires_grad=True)
    quantized, indices, loss = vq(z)
    weights = torch.randn(50, 4)
    (quantized * weights).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, weights)  # straight through: as if quantized were z
    assert vq.codebook.grad is None or vq.codebook.grad.abs().max() == 0  # the value path never moves the codebook
    z.grad = None
    loss.backward()
    q = vq.codebook.detach()[indices]
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - q) / z.numel())  # commitment pulls z to its code
    used = torch.zeros(16, dtype=torch.bool)
    used[indices] = True
    assert vq.codebook.grad[used].abs().sum(1).min() > 0 and vq.codebook.grad[~used].abs().max() == 0


@pytest.mark.exercise("stretch_vpred", points=3)
def test_v_target_identities():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 20000, generator=g)
    for t in (0.0, 0.3, 0.7, 1.0):
        xt, v = stretch.v_target(x0, noise, t)
        alpha, sigma = stretch.vp_coefficients(t)
        torch.testing.assert_close(alpha * xt - sigma * v, x0, atol=1e-5, rtol=0)  # x0 back from (x_t, v)
        torch.testing.assert_close(sigma * xt + alpha * v, noise, atol=1e-5, rtol=0)  # and the noise
        assert abs(v.var().item() - 1) < 0.05  # v of unit-variance x0 and noise keeps unit variance
    torch.testing.assert_close(stretch.v_target(x0, noise, 0.0)[0], x0)  # t = 0 is the data ...
    torch.testing.assert_close(stretch.v_target(x0, noise, 1.0)[0], noise, atol=1e-6, rtol=0)  # ... t = 1 the noise


@pytest.mark.exercise("stretch_vpred", points=3)
@pytest.mark.parametrize("steps", [1, 4])
def test_v_sampler_with_the_exact_v_lands_on_the_data(steps):
    g = torch.Generator().manual_seed(3)
    target, noise = torch.randn(2, 3, 8, generator=g)
    calls = []

    def exact_v(x, t):  # the one x0 that exists: v = (alpha x_t - x0) / sigma
        calls.append(float(t))
        alpha, sigma = stretch.vp_coefficients(t)
        return (alpha * x - target) / sigma

    out = stretch.v_sample(exact_v, noise, steps)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    assert calls[0] == 1.0 and len(calls) == steps and min(calls) > 0  # never evaluated at t = 0 (sigma = 0)


@pytest.mark.exercise("stretch_heun", points=5)
def test_heun_is_second_order():
    rate = 1.3  # dx/dt = rate * x from t = 1 to 0: x(0) = x(1) * exp(-rate)
    x1 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x1 * math.exp(-rate)
    calls = []

    def velocity(x, t):
        calls.append(t)
        return rate * x

    def error(steps):
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        return (stretch.heun_sample(velocity, x1, ts) - exact).abs().max().item()

    errors = [error(n) for n in (8, 16, 32)]
    assert len(calls) == 2 * (8 + 16 + 32)  # two slopes per step
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.5 < coarse / fine < 4.5, errors  # second order: halving the step quarters the error
