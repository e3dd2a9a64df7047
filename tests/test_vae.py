"""vae.py: causality, shape rules, chunked == whole decoding, the full size, the init, and a short overfit."""
import dataclasses

import pytest
import torch

from vae import PRESETS, VAE, VAEConfig, vae_loss


def tiny(seed=0):
    torch.manual_seed(seed)
    return VAE(PRESETS["tiny"])


@pytest.mark.uses("causal_conv")
def test_shapes_and_bad_input():
    vae = tiny()
    with torch.no_grad():
        for shape, lat in (((2, 3, 9, 16, 24), (2, 8, 3, 4, 6)), ((1, 3, 1, 8, 8), (1, 8, 1, 2, 2))):
            mean, logvar = vae.encode(torch.rand(shape) * 2 - 1)
            assert mean.shape == logvar.shape == lat
            assert vae.decode(mean).shape == shape
        with pytest.raises(ValueError, match=r"frames must be 1\+4k \(1, 5, 9, \.\.\.\), got 8"):
            vae.encode(torch.zeros(1, 3, 8, 16, 16))
        with pytest.raises(ValueError, match="multiples of 4, got 16x18"):
            vae.encode(torch.zeros(1, 3, 9, 16, 18))
        with pytest.raises(ValueError, match=r"x must be \(B, 3, T, H, W\)"):
            vae.encode(torch.zeros(1, 4, 9, 16, 16))
        with pytest.raises(ValueError, match=r"z must be \(B, 8, t, h, w\)"):
            vae.decode(torch.zeros(1, 16, 3, 4, 4))
        with pytest.raises(ValueError, match="chunk must be None or an int >= 1"):
            vae.decode(torch.zeros(1, 8, 3, 4, 4), chunk=0)
    with pytest.raises(ValueError, match="divisible by groups"):
        VAEConfig(groups=5)
    with pytest.raises(ValueError, match="time_levels must be in 0..2"):
        VAEConfig(time_levels=3)
    assert (PRESETS["tiny"].spatial_factor, PRESETS["tiny"].temporal_factor) == (4, 4)
    assert (PRESETS["full"].spatial_factor, PRESETS["full"].temporal_factor) == (8, 4)


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.exercise("causal_conv", points=2)
def test_causal(k):
    """Latent k summarises RGB frames 4k-3..4k, so changing frames > 4k leaves latents
    0..k and reconstructed frames 0..4k exactly as they were, and does change the rest."""
    vae = tiny()
    x = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    x2 = x.clone()
    x2[:, :, 4 * k + 1:] = torch.rand_like(x2[:, :, 4 * k + 1:]) * 2 - 1
    with torch.no_grad():
        (m, _), (m2, _) = vae.encode(x), vae.encode(x2)
        y, y2 = vae.decode(m), vae.decode(m2)
    torch.testing.assert_close(m2[:, :, :k + 1], m[:, :, :k + 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(y2[:, :, :4 * k + 1], y[:, :, :4 * k + 1], atol=1e-6, rtol=0)
    assert (m2[:, :, k + 1] - m[:, :, k + 1]).abs().max() > 1e-3  # the boundary is tight
    assert (y2[:, :, 4 * k + 1] - y[:, :, 4 * k + 1]).abs().max() > 1e-3


@pytest.mark.exercise("causal_conv", points=4)
def test_chunked_decode_equals_whole():
    vae = tiny()
    z = torch.randn(1, 8, 6, 4, 4)  # 6 latent frames -> 21 RGB frames (an even count: odd last chunks too)
    with torch.no_grad():
        whole = vae.decode(z)
        assert whole.shape == (1, 3, 21, 16, 16)
        for chunk in (1, 2, 3, 10):
            torch.testing.assert_close(vae.decode(z, chunk=chunk), whole, atol=1e-5, rtol=0)


@pytest.mark.uses("causal_conv")
def test_full_preset_on_meta():
    """Release size (CogVideoX-2B VAE, 215,583,907 parameters) and its shapes, never allocated."""
    with torch.device("meta"):
        vae = VAE(PRESETS["full"])
        n = sum(p.numel() for p in vae.parameters())
        assert abs(n - 215_583_907) <= 0.005 * 215_583_907, n
        mean, logvar = vae.encode(torch.empty(1, 3, 49, 480, 720))
        assert mean.shape == (1, 16, 13, 60, 90)
        assert vae.decode(mean, chunk=2).shape == (1, 3, 49, 480, 720)


def test_initialize_weights():
    """The default init of every layer (the release's), and only the decoder's output bias at
    cfg.out_bias: the same seed with out_bias=None gives the same weights but that bias."""
    ours = tiny().state_dict()
    torch.manual_seed(0)
    release_init = VAE(dataclasses.replace(PRESETS["tiny"], out_bias=None)).state_dict()
    assert torch.equal(ours.pop("decoder.conv_out.bias"), torch.full((3,), -1.0))
    assert release_init.pop("decoder.conv_out.bias").abs().max() > 0  # PyTorch's uniform bias
    for name, tensor in ours.items():
        assert torch.equal(tensor, release_init[name]), name


@pytest.mark.uses("causal_conv")
def test_overfit_one_clip():
    """A short run on one toy clip (a red square moving right on black) halves the
    error and beats the best constant colour, so it has learnt the object, not only black."""
    vae = tiny()
    x = -torch.ones(1, 3, 9, 16, 16)
    for t in range(9):
        x[0, :, t, 5:11, 2 + t:8 + t] = torch.tensor([0.7, -0.7, -0.7])[:, None, None]
    constant = ((x - x.mean(dim=(2, 3, 4), keepdim=True)) ** 2).mean().item()  # 0.124

    def reconstruction_mse():  # of the mean latent: no sampling noise
        with torch.no_grad():
            return (vae.decode(vae.encode(x)[0]) - x).square().mean().item()
    first = reconstruction_mse()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(40):
        loss = vae_loss(vae, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = reconstruction_mse()
    assert last < 0.5 * first and last < constant, (first, constant, last)
