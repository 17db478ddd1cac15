"""DiT and SiT against fixtures made with the original code: random-weight class-conditional networks (hidden 64,
depth 3, learn_sigma) with their weights, inputs and the original's outputs in float32 and float64, and the
released checkpoints' key lists. Tolerances are the fixtures' suggested ones (10x the original's own
float32-vs-float64 spread); a wrong convention (sin/cos order, positions, null row, head layout) is ~1e-2..1."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.models.dit import DiT

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official"
FAMILIES = ["dit", "sit"]


def build(kwargs: dict, **extra) -> DiT:
    """Our DiT from the original constructor's kwargs (class_dropout_prob > 0 only means the null row exists)."""
    return DiT(img_resolution=kwargs["input_size"], in_channels=kwargs["in_channels"],
               patch_size=kwargs["patch_size"], hidden_size=kwargs["hidden_size"], depth=kwargs["depth"],
               num_heads=kwargs["num_heads"], mlp_ratio=kwargs["mlp_ratio"], num_classes=kwargs["num_classes"],
               learn_sigma=kwargs["learn_sigma"], **extra)


def original(name: str):
    """(name, meta, io, our net with the original's weights, in eval mode) of fixture folder `name`."""
    folder = FIXTURES / name
    meta = json.loads((folder / "meta.json").read_text())
    net = build(meta["constructor"]["kwargs"]).eval()
    net.load_state_dict(load_file(str(folder / "weights.safetensors")))
    return name, meta, load_file(str(folder / "io.safetensors")), net


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return original(request.param)


def row_errors(ours, ref):
    return (ours.double() - ref.double()).abs().flatten(1).max(dim=1).values


def test_state_dict_names_order_and_shapes_are_the_originals(family):
    name, meta, _, _ = family
    original = json.loads((FIXTURES / name / "keys.json").read_text())
    ours = {k: list(v.shape) for k, v in build(meta["constructor"]["kwargs"]).state_dict().items()}
    assert list(ours.items()) == list(original.items())


def test_float32_output_matches_the_original(family):
    """Every row (t from 0 to the grid's end, one fractional DiT step, null and real labels) within tolerance of
    the original's float32 and float64 outputs; DiT's 8 channels (eps, variance), SiT's first 4 (velocity)."""
    _, meta, io, net = family
    tol = meta["suggested_tolerance"]["out"]
    with torch.no_grad():
        out = net(io["x"], io["t"], class_labels=io["y"])
    c = io["out"].shape[1]
    assert row_errors(out[:, :c], io["out"]).max() <= tol["atol_vs_f32"]
    assert row_errors(out[:, :c], io["out_f64"]).max() <= tol["atol_vs_f64"]


def test_float64_output_matches_the_original_float64(family):
    """The module in float64, its time features computed from the float32 t in float32 as the original's are."""
    _, meta, io, net = family
    net64 = build(meta["constructor"]["kwargs"]).eval().double()
    net64.load_state_dict(net.state_dict())
    with torch.no_grad():
        out = net64(io["x"].double(), io["t"], class_labels=io["y"])
    assert out.dtype == torch.float64
    c = io["out_f64"].shape[1]
    assert row_errors(out[:, :c], io["out_f64"]).max() <= meta["suggested_tolerance"]["out"]["atol_vs_f64"]


def test_sit_returns_both_halves_the_first_being_sits_output():
    """SiT.forward drops the learn_sigma half; ours returns both (callers slice), as DiT's does."""
    _, meta, io, net = original("sit")
    tol = meta["suggested_tolerance"]["out"]["atol_vs_f32"]
    with torch.no_grad():
        out = net(io["x"], io["t"], class_labels=io["y"])
    assert out.shape == io["out_full"].shape
    assert row_errors(out, io["out_full"]).max() <= tol
    assert row_errors(out[:, :4], io["out"]).max() <= tol


def test_none_labels_are_the_null_row(family):
    _, meta, io, net = family
    null = torch.full_like(io["y"], meta["constructor"]["kwargs"]["num_classes"])
    with torch.no_grad():
        torch.testing.assert_close(net(io["x"], io["t"]), net(io["x"], io["t"], class_labels=null), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["DiT-XL-2-256x256", "DiT-XL-2-512x512", "SiT-XL-2-256x256"])
def test_released_geometries_have_the_released_keys_and_shapes(name):
    released = json.loads((FIXTURES / "released_geometries.json").read_text())[name]
    with torch.device("meta"):
        net = build(released["kwargs"])
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == released["keys"]
    assert sum(v.numel() for v in net.state_dict().values()) == released["num_elements"]


@pytest.fixture(scope="module")
def sit():
    folder = FIXTURES / "sit"
    return json.loads((folder / "meta.json").read_text()), load_file(str(folder / "io.safetensors")), \
        load_file(str(folder / "weights.safetensors"))


def meanflow_from_sit(sit) -> DiT:
    """A use_r net loaded with SiT's weights (only the r-embedder missing), its r-branch zeroed."""
    meta, _, weights = sit
    net = build(meta["constructor"]["kwargs"], use_r=True).eval()
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing and all(k.startswith("r_embedder.") for k in missing)
    net.zero_r_branch()
    return net


def test_use_r_net_from_sit_weights_is_sit_for_any_r(sit):
    meta, io, _ = sit
    net = meanflow_from_sit(sit)
    tol = meta["suggested_tolerance"]["out"]["atol_vs_f32"]
    uniform = torch.rand(8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for r in (io["t"], torch.zeros_like(io["t"]), io["t"] - 0.3, uniform):
            out = net(io["x"], io["t"], r_label=r, class_labels=io["y"])
            assert row_errors(out[:, :4], io["out"]).max() <= tol
    with pytest.raises(ValueError, match="use_r=True"):
        net(io["x"], io["t"], class_labels=io["y"])
    with pytest.raises(ValueError, match="use_r=False"):
        build(meta["constructor"]["kwargs"]).zero_r_branch()


def test_jvp_and_backward_through_the_use_r_net(sit, randomize):
    """MeanFlow's (u, du/dt) = jvp(u, (z, r, t), (v, 0, 1)), then a backward through both."""
    _, io, _ = sit
    net = meanflow_from_sit(sit)
    randomize(net.r_embedder, std=0.1)    # the zeroed r-branch would hide d/dr
    x, y = io["x"][:4], io["y"][:4]
    r, t = torch.tensor([0.1, 0.4, 0.0, 0.7]), torch.tensor([0.5, 0.4, 0.9, 1.0])
    tangents = (torch.randn_like(x), torch.zeros_like(r), torch.ones_like(t))
    u, dudt = torch.func.jvp(lambda z, r_, t_: net(z, t_, r_label=r_, class_labels=y), (x, r, t), tangents)
    torch.testing.assert_close(u, net(x, t, r_label=r, class_labels=y))
    assert dudt.abs().max() > 1e-3
    (u.square().mean() + dudt.square().mean()).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["r_embedder.mlp.0.weight"].abs().max() > 0
