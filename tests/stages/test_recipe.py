"""The authors' recipe as switches (docs/deviations.md): each pinned on a hand-computed case, and the paper
configs set to the behaviour that produced each published number.

Hand values (σ_d = 0.5), EDM's coefficients c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²), and the
boundary form c_skip = σ_d²/((σ − σ_m)² + σ_d²), c_out = (σ − σ_m)·σ_d/√(σ² + σ_d²) with the authors'
evaluation σ_m = 0.003, written out below to 12 digits.
"""
import math

import pytest
import torch

from engine.config import load_config
from engine.models.factory import build_raw_network, wrap_network
from engine.models.precond import ConsistencyFunction, EDMDenoiser
from engine.sampling.fewstep import consistency_sample, renoise_scale
from engine.stages.mid import MidTraining, mid_distance
from engine.stages.post import PostTraining

TINY = ["data.resolution=8", "network.unet.channels=[8,16]", "network.unet.num_blocks=1",
        "network.unet.attn_resolutions=[]"]
AUTHORS = ["model.train_coeffs=edm", "model.eval_sigma_min=0.003"]

#  σ        train c_skip        train c_out          eval c_skip         eval c_out
HAND = [
    (0.002, 0.999984000256, 0.001999984000, 0.999996000016, -0.000999992000),
    (0.00388, 0.999939786026, 0.003879883183, 0.999996902410, 0.000879973505),
    (80.0, 3.906097418070e-05, 0.499990234665, 3.906390380411e-05, 0.499971485027),
]


class Probe(torch.nn.Module):
    """A raw 'network' whose output is 1 everywhere: f(x, σ) = c_skip·x + c_out, readable coefficients."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_labels, class_labels=None):
        return torch.ones_like(x) + 0 * self.w


@pytest.mark.parametrize("sigma, skip_train, out_train, skip_eval, out_eval", HAND)
def test_training_and_evaluation_coefficients_hand_values(sigma, skip_train, out_train, skip_eval, out_eval):
    f = ConsistencyFunction(Probe(), train_coeffs="edm", eval_sigma_min=0.003)
    x = torch.tensor([[[[2.0]]]], dtype=torch.float64)
    s = torch.tensor([sigma], dtype=torch.float64)
    got_train = f.train()(x, s).item()
    got_eval = f.eval()(x, s).item()
    assert got_train == pytest.approx(2 * skip_train + out_train, rel=1e-11, abs=1e-13)
    assert got_eval == pytest.approx(2 * skip_eval + out_eval, rel=1e-11, abs=1e-13)
    # the engine's default: the boundary form with σ_min = 0.002 in both modes
    engine = ConsistencyFunction(Probe())
    want = 2 * 0.25 / ((sigma - 0.002) ** 2 + 0.25) + (sigma - 0.002) * 0.5 / math.sqrt(sigma ** 2 + 0.25)
    assert engine.train()(x, s).item() == pytest.approx(want, rel=1e-11, abs=1e-13)
    assert engine.eval()(x, s).item() == pytest.approx(want, rel=1e-11, abs=1e-13)
    assert ConsistencyFunction(Probe()).eval()(x, torch.tensor([0.002], dtype=torch.float64)).item() == 2.0


def test_authors_student_starts_as_its_teacher(randomize):
    """With EDM coefficients in training, a student initialised from the teacher computes exactly the
    teacher's denoiser; the boundary form starts ~4e-3 (relative) away at small σ."""
    cfg = load_config(None, [*TINY, *AUTHORS])
    torch.manual_seed(0)
    net = randomize(build_raw_network(cfg), std=0.1)
    teacher, student = EDMDenoiser(net), wrap_network(net, cfg, "consistency").train()
    x, s = torch.randn(4, 1, 8, 8), torch.tensor([0.002, 0.01, 1.0, 80.0])
    with torch.no_grad():
        assert torch.equal(student(x, s), teacher(x, s))
        boundary = ConsistencyFunction(net).train()(x, s)
        assert (boundary - teacher(x, s)).abs().max() > 1e-4


def test_t_mid_and_renoise_by_configuration(root):
    """ECT post-trained CIFAR-10/FFHQ/AFHQv2 sample 2 steps at t_mid 0.821 with re-noise std τ; their
    mid-training at 0.77569; the engine's default re-noise std is √(τ² − σ_min²)."""
    paper = root / "configs" / "paper"
    for name in ("cifar10_ect", "ffhq64_ect", "afhqv2_64_ect"):
        cfg = load_config(paper / f"{name}.yaml")
        assert (cfg.sample.t_mid, cfg.sample.renoise_std) == (0.821, "tau"), name
        assert (cfg.model.train_coeffs, cfg.model.eval_sigma_min, cfg.post.clamp_t) == ("edm", 0.003, False)
        assert cfg.train.ema_warmup is False
    assert load_config(paper / "cifar10_cmt.yaml").sample.t_mid == 0.77569
    assert renoise_scale(0.821, 0.002, "tau") == 0.821
    assert renoise_scale(0.821, 0.002, "sqrt_tau2_minus_sigma_min2") == pytest.approx(math.sqrt(0.821 ** 2 - 4e-6))

    calls = []

    def f(x, sigma):                      # maps every state to 0, so the re-noised state is s·ε' exactly
        calls.append(sigma[0].item())
        return torch.zeros_like(x)
    eps, eps2 = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for std, scale in [("tau", 0.821), ("sqrt_tau2_minus_sigma_min2", math.sqrt(0.821 ** 2 - 0.002 ** 2))]:
        calls.clear()
        states = consistency_sample(f, eps, 80.0, 2, 0.821, 0.002, renoise=[eps2], renoise_std=std)
        torch.testing.assert_close(states[1], scale * eps2, rtol=1e-6, atol=0)
        assert calls == [80.0, pytest.approx(0.821)]


def test_ect_t_unclamped_by_switch():
    """post.clamp_t=false keeps ln t ~ N(P_mean, P_std²) as drawn (the authors'); true clamps to [σ_min, σ_max]."""
    clamped = PostTraining(load_config(None, [*TINY, "post.init=random"]))
    free = PostTraining(load_config(None, [*TINY, "post.init=random", "post.clamp_t=false"]))
    g = lambda: torch.Generator().manual_seed(0)                                  # noqa: E731
    t_free, _ = free.sample_times(20000, g())
    t_clamped, _ = clamped.sample_times(20000, g())
    raw = torch.exp(-1.1 + 2.0 * torch.randn(20000, generator=g(), dtype=t_free.dtype))
    torch.testing.assert_close(t_free, raw)
    outside = (t_free < 0.002) | (t_free > 80)
    assert 0.003 < outside.float().mean() < 0.02                                 # ~0.8% of the draws
    torch.testing.assert_close(t_clamped, raw.clamp(0.002, 80.0))
    assert (free.sample_times(20000, g())[1] < t_free).all()


@pytest.mark.parametrize("c, weight", [(1e-3, 1 / 0.021), (1e-2, 1 / 0.03)])
def test_meanflow_adaptive_weight_at_both_constants(c, weight, root):
    """w = 1/(‖u − u_tgt‖² + c) at p = 1: ‖Δ‖² = 0.02 gives 47.619… at the paper's c, 33.33… at the code's."""
    stage = PostTraining(load_config(None, [*TINY, "post.init=random", "post.method=meanflow", "network.use_r=true",
                                            f"post.mf_adaptive_c={c}"]))
    a = math.sqrt(0.02)
    model = lambda z, r, t, labels=None: a * torch.ones_like(z) + 0 * z         # noqa: E731  u = a, du/dt = 0
    x0, eps = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)                    # v = 0: u_tgt = 0, err = a²
    loss = stage.meanflow_loss(model, x0, eps, torch.tensor([0.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(0.02 * weight, rel=1e-6)
    assert load_config(None, ["post.method=meanflow"]).post.mf_adaptive_c == 1e-3
    assert load_config(root / "configs/paper/imagenet256_mfxl2_post.yaml").post.mf_adaptive_c == 0.01


def test_meanflow_guidance_with_kappa_is_equation_13():
    """ṽ = ω·v + κ·u(z, t, t | c) + (1 − ω − κ)·u(z, t, t | ∅) (MeanFlow Eq. 13), two no-grad forwards;
    dropped labels keep v; κ = 0 is the unconditional-only form."""
    null, omega, kappa = 3, 2.0, 0.5
    cfg = load_config(None, [*TINY, "post.init=random", "post.method=meanflow", "network.use_r=true",
                             "network.num_classes=3", f"post.cfg_scale={omega}", f"post.cfg_kappa={kappa}"])
    stage = PostTraining(cfg)
    model = lambda z, r, t, labels: torch.where((labels == null).view(-1, 1, 1, 1), 0.5 * z, 3.0 * z)  # noqa: E731
    z, v = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 1.5)
    t = torch.tensor([0.7, 0.7])
    got = stage.guided_velocity(model, z, v, t, torch.tensor([1, null]))
    # conditional sample: 2·1.5 + 0.5·3 + (1 − 2 − 0.5)·0.5 = 3.75; dropped: v = 1.5
    torch.testing.assert_close(got.flatten(), torch.tensor([3.75, 1.5]))
    assert stage.counters["student_fwd_nograd"] == 2
    assert PostTraining.cost_per_pair(cfg).student_nograd == 2
    plain = PostTraining(load_config(None, [*TINY, "post.init=random", "post.method=meanflow", "network.use_r=true",
                                            "network.num_classes=3", f"post.cfg_scale={omega}"]))
    torch.testing.assert_close(plain.guided_velocity(model, z, v, t, torch.tensor([1, null])).flatten(),
                               torch.tensor([2 * 1.5 - 0.5, 1.5]))           # ω·v + (1 − ω)·u_∅
    assert PostTraining.cost_per_pair(plain.cfg).student_nograd == 1


def test_mid_l2_sum_is_c_h_w_times_the_mean(root):
    mean = load_config(None, [*TINY, "mid.loss=l2"])
    total = load_config(None, [*TINY, "mid.loss=l2", "mid.l2_reduction=sum"])
    assert (mid_distance(mean), mid_distance(total)) == ("mean_squared", "sum_squared")
    assert MidTraining.cost_per_pair(total).distance == "sum_squared"
    from engine.losses.distances import build_distance
    x, y = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    d_mean = build_distance("mean_squared", channels=1, resolution=8)(x, y)
    d_sum = build_distance("sum_squared", channels=1, resolution=8)(x, y)
    torch.testing.assert_close(d_sum, 64 * d_mean)
    assert load_config(root / "configs/paper/imagenet256_mfxl2_cmt.yaml").mid.l2_reduction == "sum"


def test_kappa_alone_guides_and_is_refused_where_guidance_is_not_trained():
    """κ > 0 at ω = 1 is guidance too (ṽ = v + κ·(u_c − u_∅)); ECT/ECD and unconditional nets refuse it."""
    from engine.errors import ConfigError, UnsupportedError
    base = [*TINY, "post.init=random", "post.method=meanflow", "network.use_r=true", "post.cfg_kappa=0.5"]
    stage = PostTraining(load_config(None, [*base, "network.num_classes=3"]))
    assert stage.guided and PostTraining.cost_per_pair(stage.cfg).student_nograd == 2
    with pytest.raises(ConfigError, match="class-conditional"):
        PostTraining(load_config(None, base))
    with pytest.raises(UnsupportedError, match="only for post.method=meanflow"):
        PostTraining(load_config(None, [*TINY, "post.init=random", "post.cfg_kappa=0.5"]))
