"""Networks: shapes, conditioning, embeddings, input checks; the net knows nothing of SDEs."""

import pytest
import torch

from sdegen.nn import MLP, FourierEmbedding, SinusoidalEmbedding, UNet


def _randomize_output(net):
    # The output layer is zero-initialised; give it weights so outputs depend on the input.
    for name, p in net.named_parameters():
        if name.startswith(("out.", "conv_out.")):
            torch.nn.init.normal_(p, std=0.1)
    return net


def test_mlp_shape_zero_init_and_grad(generator):
    net = MLP(3, hidden=32, depth=2)
    x, t = torch.randn(5, 3, generator=generator), torch.rand(5, generator=generator)
    out = net(x, t)
    assert out.shape == (5, 3)
    assert torch.equal(out, torch.zeros_like(out))          # zero-initialised output layer
    _randomize_output(net)
    net(x, t).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("size,mults", [(8, (1, 2)), (16, (1, 2, 2)), (32, (1, 2, 2, 2))])
def test_unet_shapes(size, mults, generator):
    net = _randomize_output(UNet(3, channels=16, channel_mults=mults, num_res_blocks=1))
    x = torch.randn(2, 3, size, size, generator=generator)
    out = net(x, torch.rand(2, generator=generator))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_batch_independent(generator):
    # GroupNorm (not BatchNorm): each sample's output must not depend on the rest of the batch. A batch
    # statistic would move outputs by O(0.1-1); float32 kernels chosen per batch size differ by
    # rounding only, up to 1.7e-6 on outputs of size ~1.5 over 30 initialisations: atol 1e-5.
    torch.manual_seed(0)  # the init draws from the global RNG: fixed, whatever ran before
    net = _randomize_output(UNet(1, channels=8, num_res_blocks=1)).eval()
    x = torch.randn(4, 1, 8, 8, generator=generator)
    t = torch.rand(4, generator=generator)
    torch.testing.assert_close(net(x, t)[:2], net(x[:2], t[:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,shape", [(MLP, (6, 2)), (UNet, (6, 1, 8, 8))])
def test_class_conditioning_and_null_label(cls, shape, generator):
    net = _randomize_output(cls(2, num_classes=4) if cls is MLP else cls(1, channels=8, num_classes=4))
    x, t = torch.randn(shape, generator=generator), torch.rand(shape[0], generator=generator)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert net.null_label == 4
    assert not torch.allclose(net(x, t, y), net(x, t, torch.zeros_like(y)))
    torch.testing.assert_close(net(x, t), net(x, t, y=4))                     # None == null label
    torch.testing.assert_close(net(x, t, y=2), net(x, t, torch.full_like(y, 2)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        net(x, t, torch.full_like(y, 5))
    with pytest.raises(ValueError, match="num_classes=None"):
        (MLP(2) if cls is MLP else UNet(1, channels=16))(x, t, y)


def test_wrong_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"MLP: x must have shape \(B, 2\), got \(4, 3\)"):
        MLP(2)(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(4,\)"):
        MLP(2)(torch.randn(4, 2), torch.rand(3))
    with pytest.raises(ValueError, match=r"UNet: x must have shape \(B, 1, \*, \*\)"):
        UNet(1, channels=16)(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(1, channels=16, channel_mults=(1, 2, 2))(torch.randn(2, 1, 10, 10), torch.rand(2))
    with pytest.raises(ValueError, match="time_embedding must be one of"):
        MLP(2, time_embedding="learned")


def test_embeddings():
    tau = torch.linspace(0, 1, 11, dtype=torch.float64)
    sin = SinusoidalEmbedding(16).double()(tau)
    assert sin.shape == (11, 16)
    # sin^2 + cos^2 = 1 per frequency.
    torch.testing.assert_close(sin[:, :8].square() + sin[:, 8:].square(), torch.ones(11, 8, dtype=torch.float64))
    a, b = FourierEmbedding(16, seed=3), FourierEmbedding(16, seed=3)
    assert torch.equal(a.freqs, b.freqs)                   # rebuilt identically from its config
    assert not torch.equal(a.freqs, FourierEmbedding(16, seed=4).freqs)
    assert "freqs" in a.state_dict()


def test_float64_and_config_rebuild(generator):
    net = _randomize_output(MLP(2, hidden=16, depth=1, time_embedding="fourier")).double()
    clone = MLP(**net.config).double()
    clone.load_state_dict(net.state_dict())
    x = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    t = torch.rand(3, generator=generator, dtype=torch.float64)
    assert net(x, t).dtype == torch.float64
    assert torch.equal(net(x, t), clone(x, t))


@pytest.mark.cuda
@pytest.mark.parametrize("cls,shape", [(MLP, (4, 2)), (UNet, (4, 1, 8, 8))])
def test_cuda_matches_cpu(cls, shape):
    gen = torch.Generator().manual_seed(0)
    net = _randomize_output(cls(2, num_classes=3) if cls is MLP else cls(1, channels=16, num_classes=3)).double()
    x, t = torch.randn(shape, generator=gen, dtype=torch.float64), torch.rand(4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    ref = net(x, t, y)
    out = net.cuda()(x.cuda(), t.cuda(), y.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)
