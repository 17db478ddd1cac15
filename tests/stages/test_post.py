"""Post-training (docs/method.md §6): ECT's r(t), the ECT/ECD loss on hand-computable cases, the shared dropout mask,
ECD's teacher step, MeanFlow's jvp target against finite differences, initialisation, DeepSpeed steps."""
import copy
import math

import pytest
import torch

from engine.config import load_config
from engine.errors import ConfigError, UnsupportedError
from engine.formulas.edm import ect_r_schedule
from engine.models.factory import build_raw_network
from engine.models.precond import EDMDenoiser, FlowVelocity
from engine.models.weights import export_network
from engine.sampling.solvers import edm_euler, edm_heun
from engine.stages.post import PostTraining

TINY_UNET = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
             "network.unet.attn_resolutions=[4]"]
TINY_DIT = ["data.resolution=8", "network.arch=dit", "network.dit.hidden_size=32", "network.dit.depth=2",
            "network.dit.num_heads=2"]


def cfg_of(*overrides, arch="unet"):
    return load_config(None, [*(TINY_UNET if arch == "unet" else TINY_DIT), "post.init=random", *overrides])


def step_loss(stage, model, batch, generator):
    """The stage's loss for one batch, as the trainer computes it: prepare (the draws), then the student."""
    return stage.loss(model, stage.prepare(batch, generator))


@pytest.fixture
def export(randomize):
    """export(tmp_path, name, cfg, stage="pre", seed=0) -> (run dir, raw network): a randomised network."""
    def run(tmp_path, name, cfg, stage="pre", seed=0):
        torch.manual_seed(seed)
        net = randomize(build_raw_network(cfg), std=0.1, seed=seed)
        export_network(net, cfg, tmp_path / name / "export", meta={"stage": stage})
        return tmp_path / name, net
    return run


# --------------------------------------------------------------------------------------------------
# ECT's r(t)
# --------------------------------------------------------------------------------------------------
def test_ect_r_schedule_hand_values():
    # r = t·(1 − (1 + k·sigmoid(−b·t))/q) with sigmoid(−1) = 0.268941421, sigmoid(−2) = 0.119202922
    cases = [  # (t, q, k, b, r by hand)
        (1.0, 4.0, 8.0, 1.0, 0.21211716),       # 1 − (1 + 2.151531)/4
        (2.0, 4096.0, 8.0, 1.0, 1.99904608),    # 2·(1 − 1.953623/4096)
        (1.0, 4.0, 2.0, 1.0, 0.61552929),       # 1 − (1 + 0.537883)/4
        (0.5, 2.0, 8.0, 1.0, 0.0),              # 1 + 8·0.3775 > 2: clamped at 0
        (3.0, 4.0, 8.0, 2.0, 2.23516426),       # sigmoid(−6) = 0.002472623: 3·(1 − 1.019781/4)
    ]
    for t, q, k, b, want in cases:
        got = ect_r_schedule(torch.tensor(t, dtype=torch.float64), q, k=k, b=b).item()
        assert got == pytest.approx(want, abs=1e-7), (t, q, k, b)


@pytest.mark.parametrize("q", [4096.0, 512.0, 16.0, 4.0])
def test_ect_r_schedule_properties(q):
    t = torch.logspace(-3, math.log10(80), 400, dtype=torch.float64)
    r = ect_r_schedule(t, q)
    assert (r >= 0).all() and (r < t).all()
    assert (r[1:] >= r[:-1]).all(), "r(t) must be non-decreasing"
    # The gap shrinks as 1/q: (t − r)/t = (1 + k·sigmoid(−bt))/q wherever r > 0.
    pos = r > 0
    torch.testing.assert_close(((t - r) / t)[pos], ((1 + 8 * torch.sigmoid(-t)) / q)[pos])
    assert ect_r_schedule(t, 2 * q).ge(r).all()


def test_sample_times_clamped():
    stage = PostTraining(cfg_of("post.P_std=6.0", "post.q=4"))
    t, r = stage.sample_times(4000, torch.Generator().manual_seed(0))
    assert t.min().item() == pytest.approx(0.002) and t.max().item() == pytest.approx(80.0)
    torch.testing.assert_close(r, ect_r_schedule(t, 4.0))
    assert (r == 0).any() and (r > 0).any()


# --------------------------------------------------------------------------------------------------
# The ECT loss
# --------------------------------------------------------------------------------------------------
def test_ect_loss_hand_computed():
    """f(x, σ) = σ·x on 2-pixel images: loss = ‖f(x_t,t) − target‖₂/(t − r), target x_0 at r = 0."""
    stage = PostTraining(cfg_of())
    f = lambda x, sigma, labels=None: sigma.view(-1, 1, 1, 1) * x
    x0 = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]).view(3, 1, 1, 2)
    eps = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2).expand(3, 1, 1, 2)
    t = torch.tensor([1.0, 0.5, 0.004])
    r = torch.tensor([0.5, 0.0, 0.001])
    x_t, x_r = x0 + t.view(-1, 1, 1, 1) * eps, x0 + r.view(-1, 1, 1, 1) * eps
    loss = stage.consistency_loss(f, x_t, t, x_r, r)
    # [0] f(ε) − f(0.5ε)·… = ε − 0.25ε → 0.75·5 = 3.75, / 0.5 = 7.5
    # [1] r = 0: target x_0 = (1, 2); f(x_t) = 0.5·(2.5, 4) = (1.25, 2) → 0.25, / 0.5 = 0.5
    # [2] 0 < r ≤ σ_min: target x_r = 0.001ε; f(x_t) = 1.6e-5·ε → 0.000984·5 / 0.003 = 1.64
    torch.testing.assert_close(loss, torch.tensor([7.5, 0.5, 1.64]), rtol=1e-5, atol=1e-6)
    assert stage.counters["student_fwd_grad"] == 1 and stage.counters["student_fwd_nograd"] == 1
    # All samples at the boundary: no target forward at all.
    stage.consistency_loss(f, x_t[1:2], t[1:2], x_r[1:2], r[1:2])
    assert stage.counters["student_fwd_grad"] == 2 and stage.counters["student_fwd_nograd"] == 1


def test_ect_loss_gradient_only_through_student():
    stage = PostTraining(cfg_of())
    w = torch.tensor(2.0, requires_grad=True)
    f = lambda x, sigma, labels=None: w * x
    x0, eps = torch.zeros(1, 1, 1, 2), torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    t, r = torch.tensor([1.0]), torch.tensor([0.5])
    stage.consistency_loss(f, x0 + eps, t, x0 + 0.5 * eps, r).sum().backward()
    # loss = ‖w·ε − sg(w·0.5ε)‖/0.5 = 10·|w − 1| → d/dw = 10 (5 if the target carried a gradient)
    assert w.grad.item() == pytest.approx(10.0)


class Spy(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.outputs = model, []

    def forward(self, *args):
        out = self.model(*args)
        self.outputs.append(out.detach().clone())
        return out


def test_target_shares_the_students_dropout_mask(randomize):
    """With x_r = x_t the only difference between the two forwards could be dropout: they must agree
    exactly, while two plain successive forwards differ (dropout is really active), and the global RNG
    leaves the step as after one forward."""
    stage = PostTraining(cfg_of("network.dropout=0.5"))
    randomize(stage.model.net, std=0.1)
    spy = Spy(stage.model.train())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0.5, 1.0, 2.0, 10.0])
    r = torch.tensor([0.4, 0.9, 1.9, 9.0])
    # x_r = x_t and r = t: the weight 1/(t − r) is infinite, so compare the outputs the spy recorded.
    torch.manual_seed(123)
    stage.consistency_loss(spy, x, t, x, t.clone())
    after_two = torch.get_rng_state()
    target, student = spy.outputs
    assert torch.equal(target, student)
    torch.manual_seed(123)
    spy(x, t)
    assert torch.equal(torch.get_rng_state(), after_two), "the RNG must advance as for one forward"
    other = spy(x, t)
    assert not torch.equal(other, student), "dropout inactive: the check above proves nothing"
    # And with different r the masks still match: compare against an explicit replay.
    spy.outputs.clear()
    torch.manual_seed(7)
    stage.consistency_loss(spy, x + 0.1, t, x, r)
    torch.manual_seed(7)
    with torch.no_grad():
        replay_target = stage.model(x, r)
    torch.manual_seed(7)
    replay_student = stage.model(x + 0.1, t)
    assert torch.equal(spy.outputs[0], replay_target) and torch.equal(spy.outputs[1], replay_student.detach())


# --------------------------------------------------------------------------------------------------
# ECD
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_ecd_x_r_is_one_teacher_solver_step(tmp_path, solver, export):
    teacher_dir, tnet = export(tmp_path, "teacher", cfg_of())
    stage = PostTraining(cfg_of("post.method=ecd", f"post.teacher={teacher_dir}", f"post.ecd_solver={solver}"))
    assert stage.teacher is not None and all(not p.requires_grad for p in stage.teacher.parameters())
    assert not any(p is q for p in stage.teacher.parameters() for q in stage.model.parameters())
    denoise = EDMDenoiser(tnet).eval()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 1, 8, 8, generator=g) * 2
    t = torch.tensor([0.3, 1.5, 20.0])
    r = torch.tensor([0.2, 1.0, 18.0])
    x_r = stage.teacher_step(x_t, t, r)
    assert stage.counters["teacher_nfe"] == (1 if solver == "euler" else 2)
    ref = (edm_euler if solver == "euler" else edm_heun)(lambda x, s: denoise(x, s), x_t, torch.stack([t, r]))[-1]
    torch.testing.assert_close(x_r, ref, rtol=0, atol=0)
    with torch.no_grad():   # by hand, sample by sample
        for i in range(3):
            x, ti, ri = x_t[i:i + 1], t[i:i + 1], r[i:i + 1]
            d = (x - denoise(x, ti)) / ti
            x_e = x + (ri - ti) * d
            if solver == "heun":
                x_e = x + (ri - ti) * (d + (x_e - denoise(x_e, ri)) / ri) / 2
            torch.testing.assert_close(x_r[i:i + 1], x_e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x_r, x_t + 0 * (r - t).view(-1, 1, 1, 1), atol=1e-3)


def test_ecd_loss_uses_teacher_step_and_boundary(tmp_path, export):
    teacher_dir, _ = export(tmp_path, "teacher", cfg_of())
    stage = PostTraining(cfg_of("post.method=ecd", f"post.teacher={teacher_dir}", "post.ecd_solver=euler",
                                "post.q=4"))
    x0 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    loss = step_loss(stage, stage.model, {"images": x0}, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in stage.model.parameters())
    assert stage.counters == {"teacher_nfe": 1, "student_fwd_grad": 1, "student_fwd_nograd": 1, "jvp": 0,
                              "samples": 8}
    # t = σ_min (clamped): the teacher steps σ_min → σ_min, f(x, σ_min) = x, so the loss is exactly 0.
    t, r = torch.full((2,), 0.002), ect_r_schedule(torch.full((2,), 0.002), 4.0)
    x_t = x0[:2] + 0.002 * torch.randn(2, 1, 8, 8)
    x_r = stage.teacher_step(x_t, t, r)
    torch.testing.assert_close(x_r, x_t)
    assert stage.consistency_loss(stage.model, x_t, t, x_r, r).abs().max().item() < 1e-4


def test_ecd_errors(tmp_path, export):
    with pytest.raises(ConfigError, match="post.teacher"):
        PostTraining(cfg_of("post.method=ecd"))
    with pytest.raises(FileNotFoundError, match="post.teacher"):
        PostTraining(cfg_of("post.method=ecd", f"post.teacher={tmp_path / 'nowhere'}"))
    fm_dir, _ = export(tmp_path, "fm", cfg_of("model.kind=flow"))
    with pytest.raises(ConfigError, match="not an EDM teacher"):
        PostTraining(cfg_of("post.method=ecd", f"post.teacher={fm_dir}"))


# --------------------------------------------------------------------------------------------------
# MeanFlow
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_meanflow_target_matches_finite_differences(arch, randomize):
    stage = PostTraining(cfg_of("post.method=meanflow", "network.use_r=true", arch=arch))
    u = randomize(stage.model, std=0.1).double().eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    r = torch.tensor([0.1, 0.4, 0.6], dtype=torch.float64)
    t = torch.tensor([0.5, 0.4, 0.9], dtype=torch.float64)
    z = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = eps - x0
    u_val, dudt = stage.meanflow_jvp(u, z, v, r, t)
    h = 1e-6
    with torch.no_grad():
        fd = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
        torch.testing.assert_close(u_val, u(z, r, t))
    assert fd.abs().max() > 1e-2
    torch.testing.assert_close(dudt, fd, rtol=1e-5, atol=1e-5 * fd.abs().max().item())
    want_tgt = v - (t - r).view(-1, 1, 1, 1) * fd
    torch.testing.assert_close(stage.meanflow_target(dudt, v, r, t), want_tgt, rtol=1e-5, atol=1e-6)
    assert stage.counters["jvp"] == 1
    # Per-sample adaptive loss: sg(w)·‖u − u_tgt‖², w = 1/(‖·‖² + c)^p.
    err = (u_val - want_tgt).flatten(1).square().sum(1)
    torch.testing.assert_close(stage.meanflow_loss(u, x0, eps, r, t).detach(), err / (err + 1e-3),
                               rtol=1e-5, atol=1e-8)


def test_meanflow_adaptive_weight_is_stop_gradient():
    stage = PostTraining(cfg_of("post.method=meanflow", "network.use_r=true", "post.mf_adaptive_p=0.5",
                                "post.mf_adaptive_c=0.25"))
    a = torch.tensor(3.0, requires_grad=True)
    model = lambda z, r, t, labels=None: a * z     # du/dt = a·v, u_tgt = v − (t−r)·a·v (no grad)
    x0, eps = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    r, t = torch.tensor([0.0]), torch.tensor([1.0])
    loss = stage.meanflow_loss(model, x0, eps, r, t)
    # z = 1, v = 1: u = 3, u_tgt = 1 − 3 = −2, err = 25, w = 1/√25.25 → loss = 25/√25.25; d/da = 2·5/√25.25
    assert loss.item() == pytest.approx(25 / math.sqrt(25.25))
    loss.sum().backward()
    assert a.grad.item() == pytest.approx(10 / math.sqrt(25.25))


def test_meanflow_guidance_trained_in_hand_case():
    """ṽ = ω·v + (1 − ω)·u(z, t, t | ∅) replaces v in the jvp tangent and the target; dropped labels keep v."""
    stage = PostTraining(cfg_of("post.method=meanflow", "network.use_r=true", "network.num_classes=3",
                                "post.cfg_scale=2.0"))
    null = 3
    model = lambda z, r, t, labels: torch.where((labels == null).view(-1, 1, 1, 1), 0.5 * z, 3.0 * z)
    x0, eps = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    r, t = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    loss = stage.meanflow_loss(model, x0, eps, r, t, torch.tensor([0, null]))
    # Conditional: z = v = 1, ṽ = 2·1 − 0.5 = 1.5, u = 3, du/dt = 3·1.5, u_tgt = 1.5 − 4.5 = −3, err = 36.
    # Dropped: ṽ = v = 1, u = 0.5, du/dt = 0.5, u_tgt = 0.5, err = 0.
    torch.testing.assert_close(loss, torch.tensor([36 / 36.001, 0.0]))
    assert stage.counters["student_fwd_nograd"] == 1
    # With ω = 1 the same call is the unguided loss: u_tgt = 1 − 3 = −2, err = (3 + 2)² = 25.
    plain = PostTraining(cfg_of("post.method=meanflow", "network.use_r=true", "network.num_classes=3"))
    torch.testing.assert_close(plain.meanflow_loss(model, x0, eps, r, t, torch.tensor([0, null]))[0],
                               torch.tensor(25 / 25.001))


def test_label_dropout():
    from engine.formulas.guidance import drop_labels
    labels = torch.arange(10).remainder(3)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert drop_labels(labels, 0.0, 3, g) is labels
    assert torch.equal(g.get_state(), before), "p = 0 must not draw (it would shift every later random number)"
    out = drop_labels(labels.repeat(100), 0.25, 3, g)
    kept = out != 3
    assert torch.equal(out[kept], labels.repeat(100)[kept])
    assert 0.2 < (~kept).float().mean().item() < 0.3
    with pytest.raises(ConfigError, match="class-conditional"):
        PostTraining(cfg_of("post.method=meanflow", "network.use_r=true", "post.label_dropout=0.1"))
    with pytest.raises(UnsupportedError, match="post.method=meanflow"):
        PostTraining(cfg_of("post.cfg_scale=2.0", "network.num_classes=3"))
    from engine.stages.pre import PreTraining
    with pytest.raises(ConfigError, match="pre.label_dropout"):
        PreTraining(load_config(None, [*TINY_UNET, "pre.label_dropout=0.1"]))
    stage = PreTraining(load_config(None, [*TINY_UNET, "pre.label_dropout=0.5", "network.num_classes=3"]))
    seen = []
    stage.model = lambda x, sigma, labels: seen.append(labels) or x
    step_loss(stage, stage.model, {"images": torch.zeros(64, 1, 8, 8), "labels": torch.zeros(64, dtype=torch.long)},
              torch.Generator().manual_seed(0))
    assert 10 < int((seen[0] == 3).sum()) < 54 and set(seen[0].tolist()) == {0, 3}


def test_meanflow_needs_use_r():
    with pytest.raises(ConfigError, match="network.use_r=true"):
        PostTraining(cfg_of("post.method=meanflow"))


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------
def test_init_errors(tmp_path, export):
    with pytest.raises(ConfigError, match="post.init_from"):
        PostTraining(cfg_of("post.init=mid"))
    with pytest.raises(FileNotFoundError, match="post.init_from"):
        PostTraining(cfg_of("post.init=mid", f"post.init_from={tmp_path / 'missing'}"))
    other, _ = export(tmp_path, "wide", cfg_of("network.unet.channels=[16,16]"), stage="mid")
    with pytest.raises(ConfigError, match=r"post.init_from=.*different architecture.*network.unet"):
        PostTraining(cfg_of("post.init=mid", f"post.init_from={other}"))
    pre, _ = export(tmp_path, "pre", cfg_of())           # a teacher is not a mid-training run
    with pytest.raises(ConfigError, match=r"post.init=mid starts from a mid-training run.*pre-stage export.*"
                                          r"post.init=teacher"):
        PostTraining(cfg_of("post.init=mid", f"post.init_from={pre}"))
    fm, _ = export(tmp_path, "fm", cfg_of("model.kind=flow"))
    with pytest.raises(ConfigError, match="post.init_from=.*'flow'"):
        PostTraining(cfg_of("post.init=teacher", f"post.init_from={fm}"))


def test_init_from_edm_teacher_is_exact(tmp_path, export):
    src, net = export(tmp_path, "teacher", cfg_of())
    stage = PostTraining(cfg_of("post.init=teacher", f"post.init_from={src}"))
    assert stage.init_report["left_at_init"] == []
    for k, v in net.state_dict().items():
        assert torch.equal(stage.model.net.state_dict()[k], v), k


def test_meanflow_student_from_fm_teacher_starts_as_the_teacher(tmp_path, capsys, export):
    src, net = export(tmp_path, "fm", cfg_of("model.kind=flow"))
    stage = PostTraining(cfg_of("post.method=meanflow", "network.use_r=true", "post.init=teacher",
                                f"post.init_from={src}"))
    left = stage.init_report["left_at_init"]
    assert left and all(".r_embed." in f".{k}" for k in left)
    assert "r-embedding" in capsys.readouterr().err
    student_state = stage.model.net.state_dict()
    assert set(student_state) - set(net.state_dict()) == set(left)
    x = torch.randn(3, 1, 8, 8)
    r, t = torch.tensor([0.0, 0.3, 0.7]), torch.tensor([1.0, 0.5, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(stage.model.eval()(x, r, t), FlowVelocity(net).eval()(x, t))


def test_perceptual_loss(tmp_path):
    """Other post.loss kinds use engine.losses' distance (per sample, then / (t − r))."""
    from engine.losses.feature_nets import GNVGG, save_feature_net
    torch.manual_seed(0)
    path = save_feature_net(GNVGG(in_channels=1, num_classes=10, width=1 / 16, depth=1, resolution=8),
                            tmp_path / "fnet.safetensors")
    stage = PostTraining(cfg_of("post.loss=feature", f"post.feature_net={path}"))
    assert isinstance(stage.distance, torch.nn.Module)
    assert not any(p is q for p in stage.distance.parameters() for q in stage.model.parameters())
    g = torch.Generator().manual_seed(0)
    x_t, x_r = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t, r = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.5])
    f = lambda x, sigma, labels=None: x * sigma.view(-1, 1, 1, 1)
    loss = stage.consistency_loss(f, x_t, t, x_r, r)
    torch.testing.assert_close(loss, stage.distance(f(x_t, t), f(x_r, r)) / (t - r))
    assert (loss > 0).all()


@pytest.mark.parametrize("kind, power", [("l2", 1), ("l2_squared", 2)])
def test_pixel_losses_by_hand(kind, power):
    """post.loss=l2 is ECT's ‖Δ‖₂ / (t − r); l2_squared is ‖Δ‖₂² / (t − r): Δ = (3, 4) per sample has norm 5."""
    stage = PostTraining(cfg_of(f"post.loss={kind}"))
    f = lambda x, sigma, labels=None: x * sigma.view(-1, 1, 1, 1)
    x_r = torch.zeros(2, 1, 1, 2)
    x_t = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
    t, r = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])     # f(x_t) = t·(3, 4), target f(0) = 0
    loss = stage.consistency_loss(f, x_t, t, x_r, r)
    torch.testing.assert_close(loss, (5.0 * t) ** power / (t - r))


# --------------------------------------------------------------------------------------------------
# Steps through DeepSpeed
# --------------------------------------------------------------------------------------------------
def _deepspeed(model, zero, batch):
    from engine.trainer.distributed import init_distributed
    init_distributed()
    import deepspeed
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero}, "steps_per_print": 2**62,
        "gradient_clipping": 0.0})   # DeepSpeed 0.19's default is 1.0, not "off"
    return engine


def _step_matches_plain_adam(stage, zero, x0, seed=3):
    """One DeepSpeed step of stage.loss equals a plain Adam step on a copy of the module."""
    plain = copy.deepcopy(stage.model)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    ref = step_loss(stage, plain, {"images": x0}, torch.Generator().manual_seed(seed))
    ref.backward()
    opt.step()
    engine = _deepspeed(stage.model, zero, x0.shape[0])
    torch.manual_seed(seed)
    loss = step_loss(stage, engine, {"images": x0}, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7)
    engine.backward(loss)
    engine.step()
    for (name, p), q in zip(stage.model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    return engine


@pytest.mark.parametrize("method,zero", [("ect", 0), ("ect", 2), ("ecd", 1), ("meanflow", 0), ("meanflow", 1),
                                         ("meanflow", 2)])
def test_post_step_through_deepspeed(tmp_path, method, zero, export, randomize):
    """A step through the DeepSpeed engine (dropout on) equals a plain-module step: for MeanFlow this is
    torch.func.jvp through the engine's forward under ZeRO 0/1/2."""
    extra = ["network.dropout=0.2"]
    if method == "ecd":
        extra.append(f"post.teacher={export(tmp_path, 't', cfg_of())[0]}")
    if method == "meanflow":
        extra.append("network.use_r=true")
    stage = PostTraining(cfg_of(f"post.method={method}", "post.q=64", *extra,
                                arch="dit" if method == "meanflow" else "unet"))
    randomize(stage.model.net, std=0.05)
    before = [p.detach().clone() for p in stage.model.parameters()]
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    _step_matches_plain_adam(stage, zero, x0)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, stage.model.parameters()))
    c = stage.counters
    if method == "meanflow":
        assert c["jvp"] == 2 and c["student_fwd_grad"] == 0
    else:
        assert c["student_fwd_grad"] == 2 and c["student_fwd_nograd"] == 2
        assert c["teacher_nfe"] == (4 if method == "ecd" else 0)   # heun: 2 per step, 2 steps
