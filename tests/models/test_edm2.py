"""The EDM2 magnitude-preserving U-Net at toy size: interface, magnitudes, forced weight normalisation."""
import pytest
import torch

from engine.config import load_config
from engine.models.edm2 import Block, EDM2UNet, MPConv, MPFourier, mp_cat, mp_silu, mp_sum
from engine.models.factory import build_raw_network, wrap_network
from engine.models.weights import transfer_weights

TINY = ["network.arch=edm2", "network.edm2.model_channels=64", "network.edm2.channel_mult=[1,2]",
        "network.edm2.num_blocks=1", "network.edm2.attn_resolutions=[8]", "data.resolution=16", "data.channels=4",
        "network.num_classes=10"]


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def open_gains_(net):
    """Set the zero-initialised gains to 1, so every branch contributes (as after some training)."""
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        for m in net.modules():
            if isinstance(m, Block):
                m.emb_gain.fill_(1.0)
    return net


@torch.no_grad()
def test_mp_primitives_preserve_unit_magnitude():
    torch.manual_seed(0)
    a, b = torch.randn(4096, 64), torch.randn(4096, 192)
    assert mp_silu(a).square().mean().sqrt() == pytest.approx(1.0, abs=0.03)
    assert mp_sum(a, torch.randn(4096, 64), 0.3).std() == pytest.approx(1.0, abs=0.03)
    assert mp_cat(a, b, 0.5).std() == pytest.approx(1.0, abs=0.03)
    assert MPConv(64, 128)(a).std() == pytest.approx(1.0, abs=0.03)
    assert MPConv(64, 32, (3, 3))(torch.randn(8, 64, 12, 12))[..., 1:-1, 1:-1].std() == pytest.approx(1.0, abs=0.05)
    assert MPFourier(256)(torch.randn(512)).std() == pytest.approx(1.0, abs=0.03)


def test_unit_variance_input_gives_unit_variance_output():
    torch.manual_seed(0)
    net = open_gains_(build_raw_network(tiny_cfg())).eval()
    assert isinstance(net, EDM2UNet)
    with torch.no_grad():
        y = net(torch.randn(16, 4, 16, 16), torch.randn(16) * 0.5, class_labels=torch.randint(0, 11, (16,)))
    assert 0.7 < y.std().item() < 1.4


def test_forward_backward_as_edm_denoiser_and_zero_output_at_init():
    torch.manual_seed(0)
    cfg = tiny_cfg("network.dropout=0.1")
    net = build_raw_network(cfg)
    x = torch.randn(3, 4, 16, 16)
    assert net(x, torch.zeros(3)).abs().max() == 0   # out_gain starts at zero
    denoiser = wrap_network(net, cfg, "edm").train()
    out = denoiser(x, torch.tensor([0.1, 1.0, 10.0]), class_labels=torch.tensor([0, 3, 10]))
    out.square().mean().backward()
    assert out.shape == x.shape and net.out_gain.grad.abs() > 0
    with pytest.raises(ValueError, match="num_classes=0"):
        build_raw_network(tiny_cfg("network.num_classes=0"))(x, torch.zeros(3), class_labels=torch.zeros(3).long())


def test_forced_weight_normalisation_keeps_weight_norms():
    torch.manual_seed(0)
    net = open_gains_(build_raw_network(tiny_cfg())).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(2, 4, 16, 16), torch.randn(2)).square().mean().backward()
        opt.step()
    net(torch.randn(1, 4, 16, 16), torch.randn(1))   # a training forward renormalises the stepped weights
    for m in net.modules():
        if isinstance(m, MPConv):
            rms = m.weight.detach().flatten(1).square().mean(dim=1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    before = net.enc["16x16_conv"].weight.detach().clone()
    net.eval()(torch.randn(1, 4, 16, 16), torch.randn(1))
    assert torch.equal(before, net.enc["16x16_conv"].weight)      # eval never writes weights


def test_use_r_student_starts_as_its_source_for_every_r():
    torch.manual_seed(0)
    src_cfg = tiny_cfg("model.kind=flow")
    src = open_gains_(build_raw_network(src_cfg)).eval()
    cfg = tiny_cfg("model.kind=flow", "network.use_r=true")
    student = build_raw_network(cfg).eval()
    report = transfer_weights(student, cfg, src_cfg, src, config_key="mid.teacher", path="x")
    assert report["left_at_init"] and all(k.startswith("r_embed.") for k in report["left_at_init"])
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([0.9, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(student(z, t, r_label=torch.tensor([0.1, 0.4])), src(z, t))
    with pytest.raises(ValueError, match="pass r_label"):
        student(z, t)


@pytest.mark.parametrize("zero", [1])
def test_forced_weight_normalisation_reaches_deepspeeds_master_weights(tmp_path, zero):
    """Under ZeRO the optimizer's fp32 copy is written back after each step; it must stay normalised.

    In-process, ZeRO 1 only: a ZeRO-3 engine replaces torch.nn.functional.linear process-wide (DeepSpeed's
    LinearFunctionForZeroStage3, which has no jvp), breaking every later test in the process."""
    import numpy as np
    from deepspeed.utils import safe_get_full_fp32_param

    from engine.trainer import Trainer

    data = np.random.default_rng(0).standard_normal((16, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    np.save(tmp_path / "y.npy", np.arange(16) % 10)
    cfg = tiny_cfg("data.source=npy", f"data.path={tmp_path / 'x.npy'}", f"data.labels_path={tmp_path / 'y.npy'}",
                   "train.batch_size=8", "train.total_kimg=0.024", "train.progress=false", "optim.lr=0.05",
                   f"train.zero_stage={zero}", "train.checkpoint_every_kimg=1")
    trainer = Trainer(cfg, "pre", tmp_path / "run")
    trainer.fit()
    mp = [m for m in trainer.stage.model.modules() if isinstance(m, MPConv)]
    rms = []
    for m in mp:
        w = safe_get_full_fp32_param(m.weight)
        rms.append(w.flatten(1).square().mean(1).sqrt())
    rms = torch.cat(rms)
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-3)
