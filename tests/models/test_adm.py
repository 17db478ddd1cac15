"""EDM's ADM (DhariwalUNet) against fixtures made with the original code: a random-weight ImageNet-64 network at
model_channels 16 (weights, inputs, the original's F and D in float32 and float64), and the released checkpoint's
key list. Tolerances are the fixture's suggested ones (10x the original's own float32-vs-float64 spread)."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.models.adm import ADMBlock, DhariwalUNet
from engine.models.precond import EDMDenoiser

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official" / "edm_adm_imagenet64"
SIGMA_DATA = 0.5
NOT_OURS = ("class_name", "model_type", "use_fp16")   # EDMPrecond's choices, not the inner network's


def build(constructor: dict) -> DhariwalUNet:
    """The network from the original's recorded kwargs (EDMPrecond's img_channels is both in and out)."""
    kwargs = {k: v for k, v in constructor["network_kwargs"].items() if k not in NOT_OURS}
    iface = constructor["interface_kwargs"]
    return DhariwalUNet(img_resolution=iface["img_resolution"], in_channels=iface["img_channels"],
                        out_channels=iface["img_channels"], label_dim=iface["label_dim"], **kwargs)


@pytest.fixture(scope="module")
def meta():
    return json.loads((FIXTURE / "meta.json").read_text())


@pytest.fixture(scope="module")
def io():
    return load_file(str(FIXTURE / "io.safetensors"))


@pytest.fixture(scope="module")
def net(meta):
    net = build(meta["constructor"]).eval()
    weights = load_file(str(FIXTURE / "weights.safetensors"))
    net.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    return net


def int_labels(io, label_dim):
    """The fixture's class per row, its null (-1, the all-zero one-hot) as the engine's null value label_dim."""
    labels = io["class_index"].clone()
    labels[labels < 0] = label_dim
    return labels


def row_errors(ours, ref):
    return (ours.double() - ref.double()).abs().flatten(1).max(dim=1).values


def test_state_dict_names_order_and_shapes_are_the_originals(meta):
    original = json.loads((FIXTURE / "keys.json").read_text())
    ours = {k: list(v.shape) for k, v in build(meta["constructor"]).state_dict().items()}
    assert list(ours.items()) == [(k.removeprefix("model."), v) for k, v in original.items()]


def test_released_geometry_has_the_released_key_set():
    released = json.loads((FIXTURE.parent / "released_geometries.json").read_text())["edm-imagenet-64x64-cond-adm"]
    with torch.device("meta"):
        net = build(released)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k.removeprefix("model."): v for k, v in released["keys"].items()}
    assert sum(v.numel() for v in net.state_dict().values()) == released["num_elements"]
    assert net.enc["32x32_block0"].num_heads == 6 and net.dec["8x8_in0"].num_heads == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_raw_network_computes_the_originals_F(net, meta, io, dtype):
    tol = meta["suggested_tolerance"]["F"]
    sigma = io["sigma"].to(dtype)
    c_in = (sigma ** 2 + SIGMA_DATA ** 2).rsqrt()[:, None, None, None]
    c_noise = sigma.log() / 4
    torch.testing.assert_close(c_noise.float(), io["c_noise"], rtol=0, atol=1e-7)
    with torch.no_grad():
        out = copy.deepcopy(net).to(dtype)(io["x"].to(dtype) * c_in, c_noise, class_labels=int_labels(io, 1000))
    assert out.dtype == dtype
    assert (row_errors(out, io["F_f64"]) <= tol["atol_vs_f64"]).all(), row_errors(out, io["F_f64"])
    if dtype == torch.float32:
        assert (row_errors(out, io["F"]) <= tol["atol_vs_f32"]).all(), row_errors(out, io["F"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_engine_denoiser_computes_the_originals_D(net, meta, io, dtype):
    tol = meta["suggested_tolerance"]["D"]
    denoiser = EDMDenoiser(copy.deepcopy(net).to(dtype), sigma_data=SIGMA_DATA)
    with torch.no_grad():
        out = denoiser(io["x"].to(dtype), io["sigma"].to(dtype), class_labels=int_labels(io, 1000))
    assert out.dtype == dtype
    assert (row_errors(out, io["D_f64"]) <= tol["atol_vs_f64"]).all(), row_errors(out, io["D_f64"])
    if dtype == torch.float32:
        assert (row_errors(out, io["D"]) <= tol["atol_vs_f32"]).all(), row_errors(out, io["D"])


@torch.no_grad()
def test_missing_labels_are_the_null_class_and_labels_matter(net, io):
    x, c_noise = io["x"][:2], io["c_noise"][:2]
    null = net(x, c_noise, class_labels=torch.full((2,), net.label_dim))
    assert torch.equal(net(x, c_noise), null)
    assert (net(x, c_noise, class_labels=torch.zeros(2, dtype=torch.long)) - null).abs().max() > 1e-2


@torch.no_grad()
def test_multi_head_attention_uses_the_head_channel_qkv_layout():
    """The fixture's attention has one head; the released net has up to 12: check the (head, c, q/k/v) channel
    layout against softmax(qᵀk/√d) written out for it."""
    torch.manual_seed(0)
    block = ADMBlock(128, 128, emb_channels=8, attention=True)
    for p in block.parameters():
        p.normal_(0, 0.3)
    x, emb = torch.randn(2, 128, 4, 4), torch.randn(2, 8)
    block.num_heads = 0   # the residual part alone, to which the attention is then added by hand
    base = block(x, emb)
    block.num_heads = 2
    q, k, v = block.qkv(block.norm2(base)).reshape(2 * 2, 64, 3, 16).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / 8).softmax(dim=2)
    expected = base + block.proj(torch.einsum("nqk,nck->ncq", w, v).reshape(2, 128, 4, 4))
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)


def test_forward_mode_ad_matches_finite_differences_and_backward_reaches_every_parameter(net, io):
    net64 = copy.deepcopy(net).double()
    x, c_noise, labels = io["x"][2:3].double(), io["c_noise"][2:3].double(), torch.tensor([999])
    dx, dn = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype), torch.ones_like(c_noise)
    out, tangent = torch.func.jvp(lambda a, b: net64(a, b, class_labels=labels), (x, c_noise), (dx, dn))
    eps = 1e-5
    with torch.no_grad():
        torch.testing.assert_close(out, net64(x, c_noise, class_labels=labels), rtol=0, atol=1e-12)
        fd = (net64(x + eps * dx, c_noise + eps * dn, class_labels=labels)
              - net64(x - eps * dx, c_noise - eps * dn, class_labels=labels)) / (2 * eps)
    assert tangent.abs().max() > 1e-2
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-6)

    net64.train()
    net64(x, c_noise, class_labels=labels).square().mean().backward()
    grads = {name: p.grad for name, p in net64.named_parameters()}
    assert not [n for n, g in grads.items() if g is None or not g.isfinite().all() or not g.abs().max() > 0]


def test_interface_errors():
    net = DhariwalUNet(16, 2, 2, label_dim=5, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(8,))
    x, t = torch.randn(2, 2, 16, 16), torch.zeros(2)
    assert net(x, t, class_labels=torch.tensor([0, 5])).shape == x.shape
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="r_label"):
        net(x, t, r_label=t)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, class_labels=torch.zeros(2, 5))           # one-hot rows are not accepted: int labels only
    with pytest.raises(ValueError, match="augment_dim=0"):
        net(x, t, augment_labels=torch.zeros(2, 9))
    with pytest.raises(NotImplementedError):
        DhariwalUNet(16, 2, 2, use_r=True)
    with pytest.raises(ValueError, match="divisible"):
        DhariwalUNet(12, 2, 2)          # 4 levels need a multiple of 8
    aug = DhariwalUNet(16, 2, 2, augment_dim=9, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    assert aug.state_dict()["map_augment.weight"].shape == (16, 9) and "map_label.weight" not in aug.state_dict()
    assert aug(x, t, augment_labels=torch.zeros(2, 9)).shape == x.shape
