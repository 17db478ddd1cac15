"""EDM's SongUNet (DDPM++ and NCSN++) against fixtures made with the original code: random-weight CIFAR-10
networks at model_channels 8 (weights, inputs, the original's F, D and D_aug in float32 and float64, embedding
traces), and the released checkpoints' key lists. Tolerances are the fixtures' suggested ones (10x the original's
own float32-vs-float64 spread)."""
import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.formulas.edm import edm_precond_coeffs
from engine.models.precond import EDMDenoiser
from engine.models.song_unet import SongBlock, SongUNet
from kernels import dispatch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official"
VARIANTS = ["edm_ddpmpp_cifar10/cond", "edm_ddpmpp_cifar10/uncond", "edm_ncsnpp/cond"]
SIGMA_DATA = 0.5
NOT_OURS = ("class_name", "model_type", "use_fp16")   # EDMPrecond's choices, not the inner network's
ATTENTION_BLOCKS = 6   # per forward at the fixtures' geometry: enc 16x16 block0-3, dec 8x8_in0, dec 16x16_block4


def build(network_kwargs: dict, interface_kwargs: dict, **overrides) -> SongUNet:
    """The network from the original's recorded kwargs (EDMPrecond's img_channels is both in and out)."""
    kwargs = {k: v for k, v in network_kwargs.items() if k not in NOT_OURS}
    return SongUNet(img_resolution=interface_kwargs["img_resolution"], in_channels=interface_kwargs["img_channels"],
                    out_channels=interface_kwargs["img_channels"], label_dim=interface_kwargs["label_dim"],
                    **{**kwargs, **overrides})


@functools.cache
def fixture(variant: str):
    """(meta, io, network with the fixture's weights, eval mode); callers copy the network before changing it."""
    folder = FIXTURES / variant
    meta = json.loads((folder / "meta.json").read_text())
    net = build(**{k: meta["constructor"][k] for k in ("network_kwargs", "interface_kwargs")}).eval()
    weights = load_file(str(folder / "weights.safetensors"))
    net.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    return meta, load_file(str(folder / "io.safetensors")), net


def int_labels(io, label_dim):
    """The fixture's class per row, its null (-1, the all-zero one-hot) as the engine's null value label_dim;
    None for an unconditional network."""
    if not label_dim:
        return None
    labels = io["class_index"].clone()
    labels[labels < 0] = label_dim
    return labels


def net_in(net, dtype):
    return net if dtype == torch.float32 else copy.deepcopy(net).to(dtype)


def without_dropout(net):
    """The net with its blocks' dropout off, so training-mode forwards are deterministic."""
    for m in net.modules():
        if isinstance(m, SongBlock):
            m.dropout = 0.0
    return net


def assert_rows_within(ours, ref, atol, what):
    errors = (ours.double() - ref.double()).abs().flatten(1).max(dim=1).values
    assert (errors <= atol).all(), f"{what}: max error per row {errors.tolist()} > {atol}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_names_order_and_shapes_are_the_originals(variant):
    meta, _, net = fixture(variant)
    original = json.loads((FIXTURES / variant / "keys.json").read_text())
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(ours.items()) == [(k.removeprefix("model."), v) for k, v in original.items()]
    assert sum(v.numel() for v in net.state_dict().values()) == meta["state_dict"]["num_elements"]


def test_released_geometries_have_the_released_key_sets():
    released = {k: v for k, v in json.loads((FIXTURES / "released_geometries.json").read_text()).items()
                if k.startswith("edm-") and "adm" not in k}
    assert len(released) == 8
    for name, entry in released.items():
        with torch.device("meta"):
            net = build(entry["network_kwargs"], entry["interface_kwargs"])
        ours = {k: list(v.shape) for k, v in net.state_dict().items()}
        assert list(ours.items()) == [(k.removeprefix("model."), v) for k, v in entry["keys"].items()], name
        assert sum(v.numel() for v in net.state_dict().values()) == entry["num_elements"], name
    with torch.device("meta"):
        cifar_vp = build(**{k: released["edm-cifar10-32x32-cond-vp"][k] for k in ("network_kwargs",
                                                                                   "interface_kwargs")})
    assert sum(p.numel() for p in cifar_vp.parameters()) == 55_735_299   # 55,735,331 elements less 8 filters


@pytest.mark.parametrize("variant", VARIANTS)
def test_embedding_layers_match_the_traces(variant):
    """The noise features (the original's [cos, sin] swapped to [sin, cos]), the label map and both mapping
    layers before their SiLU, as recorded during the original's D call."""
    _meta, io, net = fixture(variant)
    seen = {}
    hooks = [getattr(net, name).register_forward_hook(functools.partial(lambda n, m, i, o: seen.setdefault(n, o),
                                                                        name))
             for name in ("map_noise", "map_label", "map_layer0", "map_layer1") if f"trace.{name}" in io]
    try:
        with torch.no_grad():
            EDMDenoiser(net, SIGMA_DATA)(io["x"], io["sigma"], class_labels=int_labels(io, net.label_dim))
    finally:
        for h in hooks:
            h.remove()
    b = io["x"].shape[0]
    expected = {name[len("trace."):]: ref for name, ref in io.items() if name.startswith("trace.")}
    expected["map_noise"] = expected["map_noise"].reshape(b, 2, -1).flip(1).reshape(b, -1)
    assert set(seen) == set(expected) and len(seen) == (4 if net.label_dim else 3)
    for name, ref in expected.items():
        torch.testing.assert_close(seen[name], ref, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_network_computes_the_originals_F(variant, dtype):
    meta, io, net = fixture(variant)
    tol = meta["suggested_tolerance"]["F"]
    sigma = io["sigma"].to(dtype)
    _, _, c_in, c_noise = edm_precond_coeffs(sigma, SIGMA_DATA)
    torch.testing.assert_close(c_noise.float(), io["c_noise"], rtol=0, atol=1e-7)
    with torch.no_grad():
        out = net_in(net, dtype)(c_in[:, None, None, None] * io["x"].to(dtype), c_noise,
                                 class_labels=int_labels(io, net.label_dim))
    assert out.dtype == dtype and out.shape == io["F"].shape
    if dtype == torch.float64:
        assert_rows_within(out, io["F_f64"], tol["atol_vs_f64"], "F vs F_f64")
    else:
        assert_rows_within(out, io["F"], tol["atol_vs_f32"], "F vs F")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_denoiser_computes_the_originals_D(variant, dtype):
    """D through engine.models.precond.EDMDenoiser with int labels (null = label_dim) for every row."""
    meta, io, net = fixture(variant)
    tol = meta["suggested_tolerance"]["D"]
    labels = int_labels(io, net.label_dim)
    if labels is not None:
        assert (labels == net.label_dim).any() and (labels < net.label_dim).any()   # null and class rows
    with torch.no_grad():
        out = EDMDenoiser(net_in(net, dtype), SIGMA_DATA)(io["x"].to(dtype), io["sigma"].to(dtype),
                                                          class_labels=labels)
    if dtype == torch.float64:
        assert_rows_within(out, io["D_f64"], tol["atol_vs_f64"], "D vs D_f64")
    else:
        assert_rows_within(out, io["D"], tol["atol_vs_f32"], "D vs D")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_augment_labels_give_the_originals_D_aug(variant, dtype):
    """EDMDenoiser passes no augment labels (sampling never does), so D_aug is formed here."""
    meta, io, net = fixture(variant)
    tol = meta["suggested_tolerance"]["D_aug"]
    x, sigma = io["x"].to(dtype), io["sigma"].to(dtype)
    c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in edm_precond_coeffs(sigma, SIGMA_DATA))
    with torch.no_grad():
        raw = net_in(net, dtype)(c_in * x, c_noise.flatten(), class_labels=int_labels(io, net.label_dim),
                                 augment_labels=io["augment_labels"].to(dtype))
    out = c_skip * x + c_out * raw
    if dtype == torch.float64:
        assert_rows_within(out, io["D_aug_f64"], tol["atol_vs_f64"], "D_aug vs D_aug_f64")
    else:
        assert_rows_within(out, io["D_aug"], tol["atol_vs_f32"], "D_aug vs D_aug")


def test_null_label_none_and_label_dropout_are_the_all_zero_one_hot():
    _, io, net = fixture("edm_ddpmpp_cifar10/cond")
    x, t = io["x"][:2], torch.tensor([-0.5, 0.7])
    with torch.no_grad():
        null = net(x, t, class_labels=torch.full((2,), net.label_dim))
        torch.testing.assert_close(net(x, t), null, rtol=0, atol=0)
        assert (net(x, t, class_labels=torch.tensor([1, 2])) - null).abs().max() > 1e-2
        dropped = without_dropout(copy.deepcopy(net)).train()
        dropped.label_dropout = 1.0
        torch.testing.assert_close(dropped(x, t, class_labels=torch.tensor([1, 2])), null, rtol=0, atol=1e-6)


def _fd_check(fn, primals, tangents, out, dout):
    h = 1e-6
    plus = fn(*[p + h * d for p, d in zip(primals, tangents)])
    minus = fn(*[p - h * d for p, d in zip(primals, tangents)])
    fd = (plus - minus) / (2 * h)
    assert dout.abs().max() > 1e-3   # not trivially zero
    torch.testing.assert_close(dout, fd, rtol=1e-5, atol=1e-5 * fd.abs().max().item())
    torch.testing.assert_close(out, fn(*primals))


@pytest.mark.parametrize("variant", ["edm_ddpmpp_cifar10/cond", "edm_ncsnpp/cond"])
def test_forward_mode_jvp_in_x_and_noise_label(variant):
    """torch.func.jvp through the whole net (attention through kernels.attention), against finite differences."""
    _, io, net = fixture(variant)
    net = net_in(net, torch.float64)
    g = torch.Generator().manual_seed(0)
    x = io["x"][:2].double()
    t = torch.tensor([-0.4, 0.3], dtype=torch.float64)
    vx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    vt = torch.tensor([1.0, -0.5], dtype=torch.float64)
    labels = torch.tensor([3, net.label_dim])

    def fn(x_, t_):
        return net(x_, t_, class_labels=labels)

    with dispatch.counting() as calls:
        out, dout = torch.func.jvp(fn, (x, t), (vx, vt))
    assert sum(n for k, n in calls.items() if k.startswith("attention:")) == ATTENTION_BLOCKS
    _fd_check(fn, (x, t), (vx, vt), out, dout)


def test_backward_reaches_every_parameter_and_agrees_with_jvp():
    """Gradients through EDMDenoiser in training mode reach every parameter but the augmentation map (no augment
    labels: skipped, as the original does), and ⟨∇_x L, v⟩ equals L's jvp."""
    _, io, net = fixture("edm_ncsnpp/cond")
    net = without_dropout(net_in(net, torch.float64)).train()   # backward and jvp see the same function
    denoiser = EDMDenoiser(net, SIGMA_DATA)
    x = io["x"][:2].double().requires_grad_(True)
    sigma = torch.tensor([0.3, 5.0], dtype=torch.float64)
    labels = torch.tensor([0, net.label_dim])
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(x_):
        return (denoiser(x_, sigma, class_labels=labels) * weights).sum()

    loss(x).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == ["map_augment.weight"], missing
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, dloss = torch.func.jvp(loss, (x.detach(),), (v,))
    torch.testing.assert_close((x.grad * v).sum(), dloss, rtol=1e-9, atol=0)


def test_bad_inputs_and_configs_raise():
    _, io, net = fixture("edm_ddpmpp_cifar10/cond")
    _, _, uncond = fixture("edm_ddpmpp_cifar10/uncond")
    x, t = io["x"][:2], torch.zeros(2)
    with pytest.raises(ValueError, match="expected input"):
        net(x[:, :2], t)
    with pytest.raises(ValueError):
        net(x, torch.zeros(3))
    with pytest.raises(ValueError, match="r_label"):
        net(x, t, r_label=t)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, class_labels=torch.zeros(2, net.label_dim))   # a float one-hot is not the engine's label
    with pytest.raises(ValueError, match="label_dim=0"):
        uncond(x, t, class_labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="augment_labels"):
        net(x, t, augment_labels=torch.zeros(2, 8))
    no_augment = SongUNet(32, 3, 3, model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="augment_dim=0"):
        no_augment(x, t, augment_labels=torch.zeros(2, 9))
    with pytest.raises(NotImplementedError):
        SongUNet(32, 3, 3, use_r=True)
    for bad in [{"encoder_type": "skip"}, {"decoder_type": "skip"}, {"embedding_type": "learned"},
                {"attn_resolutions": (12,)}, {"img_resolution": 36, "channel_mult": (1, 1, 1, 1)}]:
        with pytest.raises(ValueError):
            SongUNet(**{"img_resolution": 32, "in_channels": 3, "out_channels": 3, "model_channels": 8, **bad})


def test_dropout_only_in_training_mode():
    _, io, net = fixture("edm_ddpmpp_cifar10/uncond")
    net = copy.deepcopy(net)
    x, t = io["x"][:2], torch.zeros(2)
    with torch.no_grad():
        net.train()
        assert not torch.allclose(net(x, t), net(x, t))
        net.eval()
        assert torch.equal(net(x, t), net(x, t))
    assert math.isclose(net.enc["32x32_block0"].dropout, 0.13)
