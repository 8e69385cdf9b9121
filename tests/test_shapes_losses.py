"""The shapes training losses and weights, unit by unit: the grown VAE, the object and edge weights, the
SNR cap and the per-pixel denoising loss."""

from __future__ import annotations

import pytest
import torch

from models.shapes.train import TrainConfig


def test_grow_vae_starts_as_the_same_function():
    """A VAE with fewer resnets per block grown into VAE_CONFIG's: the new resnets start as the identity, so
    encode and decode give what the source gave; a VAE of another width is refused."""
    import random

    from diffusers import AutoencoderKL

    from models.shapes import architecture as arch
    from models.shapes.train_common import render_batch
    from models.shapes.train_vae import grow_vae

    torch.manual_seed(0)
    small = AutoencoderKL(**dict(arch.VAE_CONFIG, layers_per_block=arch.VAE_CONFIG["layers_per_block"] - 1)).eval()
    grown = arch.build_vae().eval()
    grow_vae(grown, small)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in small.parameters())
    x, _ = render_batch(random.Random(0), 4, ("plain", "outline+stripes"))
    with torch.no_grad():
        z = small.encode(x).latent_dist.mean
        assert torch.allclose(grown.encode(x).latent_dist.mean, z, atol=1e-5)
        assert torch.allclose(grown.decode(z).sample, small.decode(z).sample, atol=1e-5)
    narrow = AutoencoderKL(**dict(arch.VAE_CONFIG, block_out_channels=(16, 16, 32), norm_num_groups=8))
    with pytest.raises((ValueError, RuntimeError)):
        grow_vae(arch.build_vae(), narrow)


def test_object_weight_favours_pixels_near_the_object():
    import random

    from models.shapes.data import random_scene
    from models.shapes.latent_code import object_masks
    from models.shapes.train_vae import object_weight

    rng = random.Random(3)
    scenes = [random_scene(rng, "outline", size=size) for size in ("small", "large")]
    w = object_weight(scenes, 3.0)
    assert w.shape == (2, 1, 64, 64) and torch.allclose(w.mean(dim=(1, 2, 3)), torch.ones(2))
    inside = object_masks(scenes) > 0.5
    for i in range(2):
        assert w[i][inside[i]].min() > 2 * w[i][~inside[i]].min()
    assert float(object_weight(scenes, 0.0).std()) == 0.0
    # The base stage's version, on the 16 x 16 latent: the object's 4 x 4 patches and their neighbours.
    lw = object_weight(scenes, 3.0, factor=4, reach=1)
    assert lw.shape == (2, 1, 16, 16) and torch.allclose(lw.mean(dim=(1, 2, 3)), torch.ones(2))
    patches = torch.nn.functional.avg_pool2d(object_masks(scenes), 4)
    for i in range(2):
        assert lw[i][patches[i] > 0.5].min() > 2 * lw[i][patches[i] == 0].min()
        assert lw[i].max() == lw[i][patches[i] > 0.5].max()  # the extra weight reaches past the object...
        assert (lw[i] == lw[i].min()).any()  # ...but not over the whole latent
    assert (lw[0] > lw[0].min()).sum() < (lw[1] > lw[1].min()).sum()  # small object, fewer weighted pixels


def test_edge_loss_penalises_a_blurred_outline_more_than_a_colour_offset():
    """The decoder's gradient-difference term: zero for identical images, blind to a uniform colour offset
    (L1/MSE already price that), and large for a thin outline blurred into its background."""
    from models.shapes.data import Scene, render
    from models.shapes.train_vae import edge_loss

    scene = Scene("triangle", "yellow", "orange", "small", 16, "center", 32.0, 32.0, "outline")
    x = torch.from_numpy(render(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert edge_loss(x, x).item() == 0.0
    assert edge_loss(x + 0.2, x).item() < 1e-6
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert edge_loss(blurred, x).item() > 0.5 * torch.nn.functional.l1_loss(blurred, x).item() > 0


def test_snr_cap_sets_the_loss_weight_per_timestep():
    """min(SNR + 1, cap) / (SNR + 1): cap 5 weighs nearly clean steps down, inf weighs every step 1. A zero
    model's v-loss at fixed t is E[v^2] (= 1 for unit-variance latents), so the loss is the mean weight."""
    from models.shapes.train import Denoising

    class Zero(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    tok = lambda caps, **k: type("T", (), {"input_ids": torch.zeros(len(caps), 4, dtype=torch.long)})()  # noqa: E731
    te = lambda ids: (torch.zeros(ids.shape[0], 4, 8),)  # noqa: E731
    cfg = TrainConfig()
    z0 = torch.randn(4096, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    losses = {}
    for cap in (5.0, float("inf")):
        job = Denoising(tok, te, Zero(), cfg, seed=1, snr_cap=cap)
        job.abar = torch.full_like(job.abar, 0.99)  # every t at SNR 99: weight 5 / 100 under cap 5
        losses[cap] = job.loss(z0, [""] * len(z0)).item()
    assert losses[float("inf")] == pytest.approx(1.0, rel=0.05)
    assert losses[5.0] == pytest.approx(0.05, rel=0.05)

def test_denoising_loss_weighs_latent_pixels():
    """``Denoising.loss``'s pixel weight: a zero model's v-loss at SNR 99 is ~1 where z0 = 0 and ~2 where
    z0 = 10 (v = 0.995 eps - 0.1 z0), so weighting one half or the other moves the loss to that half's."""
    from models.shapes.train import Denoising

    class Zero(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    tok = lambda caps, **k: type("T", (), {"input_ids": torch.zeros(len(caps), 4, dtype=torch.long)})()  # noqa: E731
    te = lambda ids: (torch.zeros(ids.shape[0], 4, 8),)  # noqa: E731
    z0 = torch.zeros(4096, 4, 2, 2)
    z0[..., 0] = 10.0
    left = torch.tensor([[2.0, 0.0], [2.0, 0.0]]).expand(4096, 1, 2, 2)
    losses = {}
    for name, weight, below_t in (("none", None, 1000), ("left", left, 1000), ("right", left.flip(-1), 1000),
                                  ("left below 400", left, 400)):
        job = Denoising(tok, te, Zero(), TrainConfig(base_object_weight_t=below_t), seed=1, snr_cap=float("inf"))
        job.abar = torch.full_like(job.abar, 0.99)
        losses[name] = job.loss(z0, [""] * len(z0), weight).item()
    # An explicit gate (the base stage's first steps pass 1000) overrides the configured one.
    losses["left, gate lifted"] = job.loss(z0, [""] * len(z0), left, weight_below=1000).item()
    assert losses["left"] == pytest.approx(1.99, rel=0.05)
    assert losses["right"] == pytest.approx(0.99, rel=0.05)
    assert losses["none"] == pytest.approx(1.49, rel=0.05)
    # ``base_object_weight_t`` 400 (the default): the weight applies to the 40% of timesteps below 400 only.
    assert losses["left below 400"] == pytest.approx(0.4 * 1.99 + 0.6 * 1.49, rel=0.03)
    assert losses["left, gate lifted"] == pytest.approx(1.99, rel=0.05)
