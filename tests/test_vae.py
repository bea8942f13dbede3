"""The latent autoencoder (course_lib.nets.vae): shapes, the Gaussian against diffusers', the loss, the scale."""

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from course_lib.nets.vae import VAE, DiagonalGaussian, encode_latents, latent_decoder, latent_scale, vae_loss


def test_digits_become_4x7x7_latents_and_back():
    torch.manual_seed(0)
    vae = VAE()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == (3, 4, 7, 7)  # 196 numbers per digit instead of 784
    reconstruction, _ = vae(x, torch.Generator().manual_seed(0))
    assert reconstruction.shape == x.shape and vae.decode(posterior.mode()).shape == x.shape
    with pytest.raises(ValueError, match=r"divisible by 4; got shape \(3, 1, 27, 27\)"):
        vae.encode(torch.zeros(3, 1, 27, 27))
    with pytest.raises(ValueError, match=r"need latents \(B, 4, h, w\); got shape \(3, 3, 7, 7\)"):
        vae.decode(torch.zeros(3, 3, 7, 7))


def test_latents_are_scaled_means_in_any_batching_and_decode_unscaled():
    torch.manual_seed(0)
    vae = VAE().eval()
    x = torch.rand(7, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(x).mode() * 0.5
        assert torch.allclose(encode_latents(vae, x, 0.5, batch_size=3), expected, atol=1e-6)
        assert torch.allclose(latent_decoder(vae, 0.5)(expected), vae.decode(expected / 0.5))
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        encode_latents(vae, x, 0.5, batch_size=0)


def test_gaussian_equals_diffusers():
    parameters = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(1)) * 3
    ours, theirs = DiagonalGaussian(parameters), DiagonalGaussianDistribution(parameters)
    assert torch.allclose(ours.kl(), theirs.kl(), rtol=1e-5)
    assert torch.equal(ours.mode(), theirs.mode())
    assert torch.allclose(
        ours.sample(torch.Generator().manual_seed(2)), theirs.sample(torch.Generator().manual_seed(2))
    )


def test_loss_terms_and_scale():
    torch.manual_seed(0)
    vae = VAE()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    reconstruction, posterior = vae(x)
    loss, reconstruction_term, kl = vae_loss(x, reconstruction, posterior, kl_weight=0.01)
    assert torch.isclose(loss, reconstruction_term + 0.01 * kl)
    assert reconstruction_term == pytest.approx(((reconstruction - x) ** 2).sum().item() / 4, rel=1e-5)
    with pytest.raises(ValueError, match="kl_weight=-1"):
        vae_loss(x, reconstruction, posterior, kl_weight=-1)
    scale = latent_scale(vae, x, batch_size=3)
    scaled = torch.cat([vae.encode(x).mode()]) * scale
    assert scaled.std().item() == pytest.approx(1.0, rel=1e-4)
