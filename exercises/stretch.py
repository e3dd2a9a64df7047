"""stretch.py: three variants of pieces of LanDiff, for students who have done the main exercises.

Each is what the paper or its predecessors could have used instead of our choice, and what the
reference holds of it cannot simply be copied; tests/test_exercises_stretch.py checks each on its
own terms (docs/EXERCISES.md, "Stretch exercises").

- VectorQuantizer: a codebook *learned* with a commitment loss (VQ-VAE, arXiv 1711.00937) instead
  of FSQ's fixed grid (tokenizer.FSQ). tokenizer.VQ only looks codes up in the release's trained
  codebook; training one is this exercise.
- v-prediction (Salimans & Ho, arXiv 2202.00512) *trained* on the variance-preserving path
  x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps, and its deterministic DDIM sampler, instead of
  flow matching's straight path (diffusion.fm_loss). release.VPrediction only reads the release's
  trained v-prediction DiT as a flow model on its DDPM schedule.
- heun_sample: Heun's second-order method (EDM, arXiv 2206.00364, Algorithm 1) instead of
  diffusion.euler_sample's first-order Euler steps: twice the model calls per step, an error that
  falls 4x (not 2x) when the steps double.

Shapes: any (..., D) for the quantizer; any tensor shape for the rest; t a float in [0, 1].
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class VectorQuantizer(nn.Module):
    """z (..., D) -> (quantized (..., D), indices (...) long, loss scalar).

    Each vector goes to its nearest codebook row (Euclidean). The forward value is that row; the
    gradient passes straight through to z. loss = ||sg(z) - q||^2 (moves the codebook) +
    beta ||z - sg(q)||^2 (the commitment term, keeps z near its code), both as means."""

    def __init__(self, codebook_size, dim, beta=0.25):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) / math.sqrt(dim))
        self.beta = beta

    def forward(self, z):
        # BEGIN SOLUTION stretch_vq: squared distances to every row, argmin; q = codebook[indices]; two MSE terms with detach; z + (q - z).detach()
        flat = z.reshape(-1, z.shape[-1])  # (N, D)
        distances = flat.square().sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.square().sum(1)
        indices = distances.argmin(1)  # (N,)
        q = self.codebook[indices].view_as(z)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        quantized = z + (q - z).detach()  # forward: q; backward: identity to z
        return quantized, indices.view(z.shape[:-1]), loss
        # END SOLUTION


def vp_coefficients(t):
    """alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2): alpha^2 + sigma^2 = 1 (variance preserving)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)


def v_target(x0, noise, t):
    """-> (x_t, v) with x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0 (t a float)."""
    # BEGIN SOLUTION stretch_vpred: alpha, sigma = vp_coefficients(t); x_t = alpha x0 + sigma noise; v = alpha noise - sigma x0
    alpha, sigma = vp_coefficients(t)
    return alpha * x0 + sigma * noise, alpha * noise - sigma * x0
    # END SOLUTION


def v_sample(model, noise, steps):
    """Deterministic DDIM with a v-model(x, t) from t = 1 to 0 in `steps` equal steps: at each step
    x0_hat = alpha x - sigma v, eps_hat = sigma x + alpha v, then x = alpha' x0_hat + sigma' eps_hat."""
    # BEGIN SOLUTION stretch_vpred: loop over t_i = 1 - i / steps; rebuild x0_hat and eps_hat from (x, v) (a rotation); re-noise to t_{i+1}
    x = noise
    for i in range(steps):
        t, t_next = 1 - i / steps, 1 - (i + 1) / steps
        alpha, sigma = vp_coefficients(t)
        v = model(x, t)
        x0_hat, eps_hat = alpha * x - sigma * v, sigma * x + alpha * v
        alpha_next, sigma_next = vp_coefficients(t_next)
        x = alpha_next * x0_hat + sigma_next * eps_hat
    return x
    # END SOLUTION


def heun_sample(velocity, x, ts):
    """Integrate dx/dt = velocity(x, t) along the times ts (a 1D tensor, e.g. from 1 down to 0) with
    Heun's method: an Euler predictor, then the average of the slopes at both ends of the step."""
    # BEGIN SOLUTION stretch_heun: per step h = t_next - t: d = f(x, t); x_pred = x + h d; x += h (d + f(x_pred, t_next)) / 2
    for t, t_next in zip(ts[:-1], ts[1:]):
        slope = velocity(x, t)
        predicted = x + (t_next - t) * slope
        x = x + (t_next - t) * (slope + velocity(predicted, t_next)) / 2
    return x
    # END SOLUTION
