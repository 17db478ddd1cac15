"""Small U-Net and DiT: shapes, conditioning, dropout, size, forward-mode AD, factory errors."""

import pytest
import torch

from engine.config import load_config
from engine.errors import ConfigError
from engine.models.dit import DiT
from engine.models.factory import build_raw_network
from engine.models.precond import ConsistencyFunction, EDMDenoiser, FlowVelocity, MeanFlowModel
from engine.models.unet import UNet
from kernels.attention import scaled_dot_product_attention as attention

ARCHS = {"unet": UNet, "dit": DiT}
TINY = {
    "unet": dict(channels=(8, 16), num_blocks=1, attn_resolutions=(4,)),
    "dit": dict(patch_size=2, hidden_size=32, depth=2, num_heads=2),
}


def tiny(arch, res=8, cin=2, **kw):
    return ARCHS[arch](img_resolution=res, in_channels=cin, **{**TINY[arch], **kw})


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_reference_unet_size():
    net = UNet(img_resolution=16, in_channels=1, out_channels=1)
    n = n_params(net)
    print(f"reference U-Net (16/32/64, attn 4x4, 16x16x1): {n / 1e6:.3f}M params")
    assert 0.95e6 < n < 1.2e6
    x = torch.randn(2, 1, 16, 16)
    assert net(x, torch.rand(2)).shape == x.shape


@pytest.mark.parametrize("arch,res,kw", [
    ("unet", 8, {}),
    ("unet", 12, dict(channels=(8, 8, 16), attn_resolutions=(3,))),  # 12 → 6 → 3: odd lowest level
    ("unet", 7, dict(channels=(8,), attn_resolutions=(7,))),
    ("dit", 8, {}),
    ("dit", 10, {}),  # 5×5 patch grid
    ("dit", 9, dict(patch_size=3)),
])
def test_output_shapes(arch, res, kw):
    net = tiny(arch, res=res, cin=3, out_channels=5, **kw)
    x = torch.randn(2, 3, res, res)
    assert net(x, torch.rand(2)).shape == (2, 5, res, res)
    assert net(x, 0.3).shape == (2, 5, res, res)  # scalar label broadcast


@pytest.mark.parametrize("arch,res,kw", [
    ("unet", 10, dict(channels=(8, 16, 16), attn_resolutions=())),
    ("unet", 8, dict(attn_resolutions=(3,))),
    ("dit", 9, {}),
    ("dit", 8, dict(num_heads=3, hidden_size=32)),
])
def test_invalid_configs_raise(arch, res, kw):
    with pytest.raises(ValueError):
        tiny(arch, res=res, **kw)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_wrong_input_shape_raises(arch):
    with pytest.raises(ValueError):
        tiny(arch)(torch.randn(2, 2, 16, 16), torch.rand(2))


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_class_labels(arch, randomize):
    net = randomize(tiny(arch, num_classes=3)).eval()
    x, t = torch.randn(2, 2, 8, 8), torch.rand(2)
    a = net(x, t, class_labels=torch.tensor([0, 0]))
    b = net(x, t, class_labels=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(net(x, t), net(x, t, class_labels=torch.tensor([3, 3])))  # None = null class
    with pytest.raises(ValueError):
        randomize(tiny(arch))(x, t, class_labels=torch.tensor([0, 0]))


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_use_r(arch, randomize):
    net = randomize(tiny(arch, use_r=True)).eval()
    x, t = torch.randn(2, 2, 8, 8), torch.full((2,), 0.7)
    assert not torch.allclose(net(x, t, r_label=torch.full((2,), 0.2)), net(x, t, r_label=t))
    u = MeanFlowModel(net)
    torch.testing.assert_close(u(x, t, t), net(x, t, r_label=t))
    with pytest.raises(ValueError):
        net(x, t)
    with pytest.raises(ValueError):
        tiny(arch)(x, t, r_label=t)
    with pytest.raises(ValueError):
        MeanFlowModel(tiny(arch))


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_dropout_train_vs_eval(arch, randomize):
    net = randomize(tiny(arch, dropout=0.5))
    x, t = torch.randn(2, 2, 8, 8), torch.rand(2)
    net.train()
    assert not torch.allclose(net(x, t), net(x, t))
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    no_drop = randomize(tiny(arch, dropout=0.0)).train()
    assert torch.equal(no_drop(x, t), no_drop(x, t))


def _check_jvp(fn, primals, tangents, rtol=1e-5):
    out, dout = torch.func.jvp(fn, primals, tangents)
    h = 1e-6
    plus = fn(*[p + h * d for p, d in zip(primals, tangents)])
    minus = fn(*[p - h * d for p, d in zip(primals, tangents)])
    fd = (plus - minus) / (2 * h)
    assert dout.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(dout, fd, rtol=rtol, atol=rtol * fd.abs().max().item())
    torch.testing.assert_close(out, fn(*primals))


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_meanflow_jvp_matches_finite_differences(arch, randomize):
    """MeanFlow's (u, du/dt) = jvp(u, (z, r, t), (v, 0, 1)) through the net, float64, CPU."""
    net = randomize(tiny(arch, use_r=True, num_classes=2).double(), std=0.1).eval()
    u = MeanFlowModel(net)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    r = torch.tensor([0.1, 0.4, 0.6], dtype=torch.float64)
    t = torch.tensor([0.5, 0.4, 0.9], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    _check_jvp(lambda z_, r_, t_: u(z_, r_, t_, class_labels=labels), (z, r, t),
               (v, torch.zeros_like(r), torch.ones_like(t)))


def test_consistency_jvp_through_unet(randomize):
    """sCM-style tangents through the preconditioned consistency function (σ and x both move)."""
    f = ConsistencyFunction(randomize(tiny("unet").double(), std=0.1).eval())
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    _check_jvp(f, (x, sigma), (torch.randn_like(x), torch.ones_like(sigma)))


def test_attention_call_site_is_swappable(randomize):
    net = randomize(tiny("dit")).eval()
    x, t = torch.randn(2, 2, 8, 8), torch.rand(2)
    ref = net(x, t)
    calls = []

    def explicit(q, k, v):
        calls.append(q.shape)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return w @ v

    for m in net.modules():
        if hasattr(m, "attn_fn"):
            m.attn_fn = explicit
    torch.testing.assert_close(net(x, t), ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == TINY["dit"]["depth"]
    q = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(attention(q, q, q), explicit(q, q, q), rtol=1e-5, atol=1e-6)


def test_wrappers_call_the_net_as_documented(randomize):
    net = randomize(tiny("dit")).eval()
    x, t = torch.randn(2, 2, 8, 8), torch.rand(2)
    torch.testing.assert_close(FlowVelocity(net)(x, t), net(x, t))
    d = EDMDenoiser(net)
    student = ConsistencyFunction(d.net)
    assert student.net is net
    big = torch.full((2,), 80.0)
    torch.testing.assert_close(student(x, big), d(x, big), rtol=1e-3, atol=1e-3)


def test_factory_builds_the_configured_arch_and_refuses_bad_settings():
    """engine.models.factory builds the raw network that network.arch names; an unknown arch or a misspelt
    key is a ConfigError naming the key, and a geometry the class refuses names its config section."""
    common = ["data.resolution=8", "network.unet.channels=[8]", "network.unet.attn_resolutions=[]"]
    assert isinstance(build_raw_network(load_config(None, common)), UNet)
    assert isinstance(build_raw_network(load_config(None, ["data.resolution=8", "network.arch=dit",
                                                           "network.dit.hidden_size=32"])), DiT)
    with pytest.raises(ConfigError, match="network.arch.*'unet', 'dit'"):
        load_config(None, ["network.arch=resnet"])
    with pytest.raises(ConfigError, match="did you mean 'network.dit.hidden_size'"):
        load_config(None, ["network.arch=dit", "network.dit.hidden_sise=32"])
    with pytest.raises(ConfigError, match="'network.unet.depth'.*num_blocks"):
        load_config(None, ["network.unet.depth=3"])
    with pytest.raises(ConfigError, match=r"network.unet: attn_resolutions \[3\]"):
        build_raw_network(load_config(None, [*common, "network.unet.attn_resolutions=[3]"]))
