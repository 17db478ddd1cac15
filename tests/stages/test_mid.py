"""The mid-training stage end to end on tiny exported teachers: pairs, loss, gradients, counters, errors."""
import copy

import pytest
import torch

from engine.config import ConfigError
from engine.models.factory import build_raw_network
from engine.models.precond import ConsistencyFunction, EDMDenoiser, FlowVelocity, MeanFlowModel
from engine.stages.mid import MidTraining


def perturb(net):
    """Make zero-initialised layers (output convs, attention projections) non-zero, so outputs depend on inputs."""
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return net


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_cmt_step_trains_the_student_only(tmp_path, tiny_cfg, export_teacher, digits_batch):
    export_teacher(tmp_path / "teacher", tiny_cfg())
    cfg = tiny_cfg()
    cfg.mid.teacher = str(tmp_path / "teacher")
    stage = MidTraining(cfg)
    assert isinstance(stage.model, ConsistencyFunction) and isinstance(stage.teacher, EDMDenoiser)
    # the teacher is frozen, outside the optimised module, and starts as the student's weights (init=teacher)
    assert not any(p.requires_grad for p in stage.teacher.parameters())
    assert not stage.teacher.training and not stage.teacher.net.training
    student_params = {id(p) for p in stage.model.parameters()}
    assert not student_params & {id(p) for p in stage.teacher.parameters()}
    assert all(torch.equal(a, b) for a, b in zip(stage.model.net.state_dict().values(),
                                                 stage.teacher.net.state_dict().values()))
    teacher_before = weights(stage.teacher)

    optimizer = torch.optim.Adam(stage.model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    pairs = stage.prepare(digits_batch(32), gen)
    assert len(pairs) == 32 and pairs.num_trajectories == 2
    assert pairs.teacher_nfe == 32 and pairs.teacher_calls == 16         # one teacher NFE per pair
    assert not pairs.x.requires_grad and not pairs.target.requires_grad
    loss = stage.loss(stage.model, pairs)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in stage.model.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in stage.teacher.parameters())
    student_before = weights(stage.model)
    optimizer.step()
    assert any(not torch.equal(v, stage.model.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(v, stage.teacher.state_dict()[k]) for k, v in teacher_before.items())

    # the counters add up the pairs the student used
    stage.loss(stage.model, stage.prepare(digits_batch(16), torch.Generator().manual_seed(1))).backward()
    assert stage.counters == {"teacher_nfe": 48, "teacher_calls": 32, "pairs": 48, "trajectories": 3}
    assert all(isinstance(v, int) for v in stage.counters.values())


def test_pair_loss_is_the_unit_weight_mean_distance(tmp_path, tiny_cfg, export_teacher, digits_batch):
    export_teacher(tmp_path / "t", tiny_cfg())
    cfg = tiny_cfg()
    cfg.mid.teacher = str(tmp_path / "t")
    stage = MidTraining(cfg)
    pairs = stage.prepare(digits_batch(16), torch.Generator().manual_seed(3))
    with torch.no_grad():
        pred = stage.model(pairs.x, pairs.t)
        expected = (pred - pairs.target).square().mean()
        torch.testing.assert_close(stage.loss(stage.model, pairs), expected)


def test_init_random_keeps_the_seeded_init_and_mismatched_architectures_fail(tmp_path, tiny_cfg, export_teacher):
    teacher = export_teacher(tmp_path / "t", tiny_cfg(), seed=5)
    cfg = tiny_cfg()
    cfg.mid.teacher = str(tmp_path / "t")
    cfg.mid.init = "random"
    torch.manual_seed(11)
    stage = MidTraining(cfg)
    torch.manual_seed(11)
    fresh = build_raw_network(cfg)
    assert all(torch.equal(a, b) for a, b in zip(stage.model.net.state_dict().values(), fresh.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(stage.model.net.state_dict().values(),
                                                     teacher.state_dict().values()))
    cfg = tiny_cfg()
    cfg.network.unet.channels = [8, 24]
    cfg.mid.teacher = str(tmp_path / "t")
    with pytest.raises(ConfigError, match=r"mid.teacher=.*different architecture.*network.unet.*mid.init=random"):
        MidTraining(cfg)


def test_missing_teacher_and_bad_batches_fail_clearly(tmp_path, tiny_cfg, export_teacher, digits_batch):
    with pytest.raises(ConfigError, match="set mid.teacher to the pre-training run dir"):
        MidTraining(tiny_cfg())
    cfg = tiny_cfg()
    cfg.mid.teacher = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="mid.teacher"):
        MidTraining(cfg)
    export_teacher(tmp_path / "t", tiny_cfg())
    cfg.mid.teacher = str(tmp_path / "t")
    stage = MidTraining(cfg)
    stage.check_batch(32)
    with pytest.raises(ConfigError, match="a micro-batch of 120 pairs per rank .* a multiple of 16"):
        stage.check_batch(120)
    with pytest.raises(ValueError, match="multiple of 16"):     # the rollout's own argument check
        stage.prepare(digits_batch(24), torch.Generator())
    bad = tiny_cfg()
    bad.mid.teacher = str(tmp_path / "t")
    bad.mid.form = "meanflow"
    bad.mid.teacher_sampler = "fm_euler"
    with pytest.raises(ConfigError, match="mid.form=meanflow needs a flow-matching"):
        MidTraining(bad)


def test_kd_and_slow_cmt_costs_are_counted(tmp_path, tiny_cfg, export_teacher, digits_batch):
    export_teacher(tmp_path / "t", tiny_cfg())
    for method, per_pair in (("kd", lambda p: 16), ("slow_cmt", lambda p: p.level.float().mean().item())):
        cfg = tiny_cfg()
        cfg.mid.teacher = str(tmp_path / "t")
        cfg.mid.method = method
        stage = MidTraining(cfg)
        pairs = stage.prepare(digits_batch(8), torch.Generator().manual_seed(4))
        assert len(pairs) == 8 and pairs.num_trajectories == 8
        assert pairs.teacher_nfe / len(pairs) == pytest.approx(per_pair(pairs))
        loss = stage.loss(stage.model, pairs)
        assert torch.isfinite(loss)
        if method == "slow_cmt":   # starts from the batch's data: x_t = x_0 + t_i·ε
            g = torch.Generator().manual_seed(4)
            torch.randint(1, 17, (8,), generator=g)
            eps = torch.randn((8, 1, 8, 8), generator=g)
            torch.testing.assert_close(pairs.x, digits_batch(8)["images"] + pairs.t.view(-1, 1, 1, 1) * eps)


def test_data_start_and_guidance_and_labels(tmp_path, tiny_cfg, export_teacher, digits_batch):
    tcfg = tiny_cfg(num_classes=10)
    tcfg.pre.label_dropout = 0.1          # trained with dropped labels: it can guide itself
    export_teacher(tmp_path / "t", tcfg)
    cfg = tiny_cfg(num_classes=10)
    cfg.mid.teacher = str(tmp_path / "t")
    cfg.mid.data_start = True
    cfg.mid.cfg_scale = 2.0
    stage = MidTraining(cfg)
    b = digits_batch(32, labels=True)
    pairs = stage.prepare(b, torch.Generator().manual_seed(6))
    assert pairs.teacher_nfe == 64 and pairs.teacher_calls == 16        # guidance: 2 NFEs per sample
    assert pairs.labels.tolist() == [int(b["labels"][0])] * 16 + [int(b["labels"][1])] * 16
    # data start: x_T = x_0 + σ_max·ε for the first B/N images
    x_T = b["images"][:2] + 80.0 * torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(pairs.x[0::16], x_T)
    # the first (order-1) step used the guided denoiser uncond + 2·(cond − uncond)
    with torch.no_grad():
        sigma = torch.full((2,), 80.0)
        cond = stage.teacher(x_T, sigma, b["labels"][:2])
        uncond = stage.teacher(x_T, sigma, torch.full((2,), 10))
        guided = uncond + 2.0 * (cond - uncond)
    ratio = float(stage.grid[1] / stage.grid[0])
    torch.testing.assert_close(pairs.x[1::16], ratio * x_T + (1 - ratio) * guided, atol=1e-4, rtol=1e-4)
    loss = stage.loss(stage.model, pairs)
    assert torch.isfinite(loss)


def test_meanflow_form_with_a_flow_matching_teacher(tmp_path, tiny_cfg, export_teacher, digits_batch):
    export_teacher(tmp_path / "fm", tiny_cfg(kind="flow"))
    cfg = tiny_cfg(kind="flow", use_r=True)
    cfg.mid.form = "meanflow"
    cfg.mid.teacher_sampler = "fm_euler"
    cfg.mid.solver_steps = 7          # 8 time points: the authors' 28 pairs per trajectory
    cfg.train.batch_size = 112        # the authors' 4 trajectories x 28
    cfg.mid.teacher = str(tmp_path / "fm")
    # init=teacher: every key but the r-embedding's, whose last layer is zeroed: u(z, r, t) = v(z, t) for all r
    stage = MidTraining(cfg)
    left = stage.init_report["left_at_init"]
    assert left and all(".r_embed." in f".{k}" for k in left)
    x = torch.randn(3, 1, 8, 8)
    r, t = torch.tensor([0.0, 0.3, 0.7]), torch.tensor([1.0, 0.5, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(stage.model.eval()(x, r, t), stage.teacher(x, t))
    cfg.mid.init = "random"
    stage = MidTraining(cfg)
    assert isinstance(stage.model, MeanFlowModel) and isinstance(stage.teacher, FlowVelocity)
    perturb(stage.model)
    teacher_before = weights(stage.teacher)
    pairs = stage.prepare(digits_batch(56), torch.Generator().manual_seed(7))
    assert len(pairs) == 56 and pairs.num_trajectories == 2
    assert pairs.teacher_calls == 7 and pairs.teacher_nfe == 14
    assert (pairs.t > pairs.r).all()
    loss = stage.loss(stage.model, pairs)
    with torch.no_grad():
        u = stage.model(pairs.x, pairs.r, pairs.t)
        torch.testing.assert_close(loss.detach(), (u - pairs.target).square().mean())
        assert not torch.allclose(u, stage.model(pairs.x, pairs.t, pairs.r))    # (r, t) order matters
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.model.parameters())
    assert all(p.grad is None for p in stage.teacher.parameters())
    assert all(torch.equal(v, stage.teacher.state_dict()[k]) for k, v in teacher_before.items())
    with pytest.raises(ConfigError, match="multiple of 28"):
        stage.check_batch(32)
    cfg.mid.loss = "feature"
    with pytest.raises(ConfigError, match="mid.loss=l2"):
        MidTraining(cfg)


def test_meanflow_form_with_a_meanflow_teacher(tmp_path, tiny_cfg, export_teacher, digits_batch):
    mf_cfg = tiny_cfg(kind="flow", use_r=True)
    mf_cfg.post.method = "meanflow"
    export_teacher(tmp_path / "mf", mf_cfg, stage="post")
    cfg = copy.deepcopy(mf_cfg)
    cfg.mid.form = "meanflow"
    cfg.mid.method = "kd"
    cfg.mid.teacher_sampler = "meanflow"
    cfg.mid.solver_steps = 8
    cfg.mid.teacher = str(tmp_path / "mf")
    cfg.train.batch_size = 4
    stage = MidTraining(cfg)                          # same architecture: init=teacher copies it
    assert isinstance(stage.teacher, MeanFlowModel)
    pairs = stage.prepare(digits_batch(4), torch.Generator().manual_seed(8))
    assert len(pairs) == 4 and pairs.t.tolist() == [1.0] * 4 and pairs.r.tolist() == [0.0] * 4
    assert pairs.teacher_nfe == 32                    # KD: 8 NFEs per pair
    assert torch.isfinite(stage.loss(stage.model, pairs))
    cfg.mid.teacher_sampler = "fm_euler"
    with pytest.raises(ConfigError, match="does not drive a 'meanflow' teacher"):
        MidTraining(cfg)


@pytest.mark.parametrize("overrides, exact", [
    ({}, True), ({"method": "kd"}, True), ({"method": "slow_cmt"}, False), ({"cfg_scale": 2.0}, True),
    ({"form": "meanflow", "teacher_sampler": "fm_heun"}, True),
    ({"form": "meanflow", "teacher_sampler": "fm_euler", "method": "kd"}, True),
])
def test_cost_per_pair_formula_is_what_the_rollout_counts(tmp_path, tiny_cfg, export_teacher, digits_batch,
                                                          overrides, exact):
    """engine.trainer.plan uses the formula; the stage counts the work as it happens: the two agree
    (Slow CMT's formula is its expectation over the drawn levels)."""
    meanflow = overrides.get("form") == "meanflow"
    kind, classes = ("flow", 0) if meanflow else ("edm", 10 if "cfg_scale" in overrides else 0)
    tcfg = tiny_cfg(kind=kind, num_classes=classes)
    tcfg.pre.label_dropout = 0.1 if classes else 0.0
    export_teacher(tmp_path / "t", tcfg)
    cfg = tiny_cfg(kind=kind, use_r=meanflow, num_classes=classes)
    cfg.mid.teacher, cfg.mid.solver_steps = str(tmp_path / "t"), 4
    for k, v in overrides.items():
        setattr(cfg.mid, k, v)
    stage = MidTraining(cfg)
    pairs_needed = 400 if not exact else stage.pairs_per_trajectory * 2
    pairs = stage.prepare(digits_batch(pairs_needed, labels=classes > 0), torch.Generator().manual_seed(0))
    counted, formula = pairs.teacher_nfe / len(pairs), MidTraining.cost_per_pair(cfg).teacher_nfe
    if exact:
        assert counted == pytest.approx(formula, rel=1e-12)
    else:
        assert formula == 2.5 and counted == pytest.approx(formula, abs=0.2)   # (N+1)/2 for N = 4


def test_guidance_of_a_teacher_never_trained_without_labels_needs_a_guide(tmp_path, tiny_cfg, export_teacher,
                                                                          digits_batch):
    """EDM2's way: its conditional teachers never saw a dropped label, so the unconditional half of the guided
    denoiser comes from a separate network (mid.guide), called without labels; 2 NFEs per sample either way."""
    export_teacher(tmp_path / "t", tiny_cfg(num_classes=10))                 # pre.label_dropout = 0
    export_teacher(tmp_path / "uncond", tiny_cfg(), seed=1)
    cfg = tiny_cfg(num_classes=10)
    cfg.mid.teacher, cfg.mid.cfg_scale, cfg.mid.solver_steps = str(tmp_path / "t"), 2.0, 4
    with pytest.raises(ConfigError, match=r"never trained with a dropped label.*set mid.guide"):
        MidTraining(cfg)
    cfg.mid.guide = str(tmp_path / "uncond")
    stage = MidTraining(cfg)
    assert set(stage.identity()) == {"mid.teacher", "mid.guide"}
    b = digits_batch(8, labels=True)
    pairs = stage.prepare(b, torch.Generator().manual_seed(3))
    assert pairs.teacher_nfe == 2 * 4 * 2 == MidTraining.cost_per_pair(cfg).teacher_nfe * len(pairs)
    x_T = 80.0 * torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sigma = torch.full((2,), 80.0)
        cond, uncond = stage.teacher(x_T, sigma, b["labels"][:2]), stage.guide(x_T, sigma, None)
    ratio = float(stage.grid[1] / stage.grid[0])
    torch.testing.assert_close(pairs.x[1::4], ratio * x_T + (1 - ratio) * (uncond + 2.0 * (cond - uncond)),
                               atol=1e-4, rtol=1e-4)
    export_teacher(tmp_path / "flow", tiny_cfg(kind="flow"))
    cfg.mid.guide = str(tmp_path / "flow")
    with pytest.raises(ConfigError, match="mid.guide=.*is a 'flow' model, the teacher a 'edm' one"):
        MidTraining(cfg)
    cfg.mid.guide, cfg.mid.cfg_scale = str(tmp_path / "uncond"), 1.0
    with pytest.raises(ConfigError, match="mid.guide is set but nothing is guided"):
        MidTraining(cfg)
