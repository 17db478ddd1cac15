"""Pair construction for CMT mid-training against hand-computed cases.

A point-mass teacher makes every trajectory known in closed form: data x_0 = μ has the denoiser D ≡ μ, whose
PF-ODE solution x_σ = μ + (σ/s)·(x_s − μ) every DPM-Solver++ order integrates exactly; its flow-matching
velocity v(z, t) = (z − μ)/t gives the straight line z_t = μ + t·(ε − μ), exact under Euler. Costs are
asserted on the *counted* teacher evaluations.
"""
import math

import pytest
import torch

from engine.formulas.grids import edm_lambda_uniform_sigmas, fm_uniform_times
from engine.stages.pairs import CountedTeacher
from engine.stages.rollout import (consistency_pairs, kd_pairs, meanflow_pair_indices, meanflow_pairs,
                            slow_cmt_pairs, trajectories_for_pairs)
from engine.sampling.solvers import dpm_solver_pp

SHAPE = (1, 3, 5)
N = 16
SIGMAS = edm_lambda_uniform_sigmas(N)           # 80 … 0.002
MU = torch.linspace(-0.8, 0.9, math.prod(SHAPE)).reshape(SHAPE)


def point_mass_denoiser(x, sigma, labels=None):
    return MU.expand_as(x).clone()


def gaussian_denoiser(x, sigma, labels=None):
    """Data N(μ, 0.3²): D = μ + s²/(s²+σ²)·(x − μ); not exact under the solver, so states differ per order."""
    s2 = 0.09
    sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    return MU + s2 / (s2 + sigma ** 2) * (x - MU)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_consistency_pairs_closed_form_counts_order_and_targets():
    T = 3
    pairs = consistency_pairs(point_mass_denoiser, T, SHAPE, SIGMAS, order=3, generator=gen(1))
    x_T = 80.0 * torch.randn((T, *SHAPE), generator=gen(1))
    # counts: N pairs per trajectory, N calls on the T rollouts -> exactly one NFE per pair
    assert len(pairs) == T * N and pairs.num_trajectories == T
    assert pairs.teacher_calls == N and pairs.teacher_nfe == T * N
    # contiguity: trajectory k holds pairs k*N .. k*N+N-1, in rollout order (σ decreasing)
    assert pairs.trajectory.tolist() == [k for k in range(T) for _ in range(N)]
    assert pairs.level.tolist() == list(range(N, 0, -1)) * T
    assert torch.allclose(pairs.t.double(), SIGMAS[:N].repeat(T), rtol=1e-6)
    assert pairs.t[:N].tolist() == sorted(pairs.t[:N].tolist(), reverse=True)
    assert pairs.t.min() > SIGMAS[-1]                         # σ_min (the end itself) is never an input
    assert torch.equal(pairs.target_level, torch.zeros(T * N, dtype=torch.long))
    for p in range(T * N):
        k, sigma = p // N, float(SIGMAS[p % N])
        expected = MU + sigma / 80.0 * (x_T[k] - MU)
        torch.testing.assert_close(pairs.x[p], expected, atol=1e-4, rtol=1e-5)
    # targets: one end per trajectory, shared by all its pairs, different across trajectories
    ends = MU + 0.002 / 80.0 * (x_T - MU)
    for k in range(T):
        block = pairs.target[k * N:(k + 1) * N]
        assert (block == block[0]).all()
        torch.testing.assert_close(block[0], ends[k], atol=1e-5, rtol=1e-5)
    assert not torch.equal(pairs.target[0], pairs.target[N])


def test_consistency_pairs_are_the_solver_states_of_a_real_teacher():
    T = 2
    pairs = consistency_pairs(gaussian_denoiser, T, SHAPE, SIGMAS, order=3, generator=gen(2))
    states = dpm_solver_pp(gaussian_denoiser, 80.0 * torch.randn((T, *SHAPE), generator=gen(2)), SIGMAS, order=3)
    for k in range(T):
        for m in range(N):
            assert torch.equal(pairs.x[k * N + m], states[m][k])
        assert torch.equal(pairs.target[k * N], states[N][k])
    # order matters (the builder passes it through): order 1 gives other states
    first = consistency_pairs(gaussian_denoiser, T, SHAPE, SIGMAS, order=1, generator=gen(2))
    assert not torch.allclose(first.target, pairs.target)


def test_data_start_adds_the_data_image():
    T = 2
    x0 = torch.randn((T, *SHAPE), generator=gen(3))
    pairs = consistency_pairs(point_mass_denoiser, T, SHAPE, SIGMAS, generator=gen(4), x0=x0)
    x_T = x0 + 80.0 * torch.randn((T, *SHAPE), generator=gen(4))
    torch.testing.assert_close(pairs.x[0::N], x_T)
    torch.testing.assert_close(pairs.target[0::N], MU + 0.002 / 80.0 * (x_T - MU), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="x0 has shape"):
        consistency_pairs(point_mass_denoiser, 3, SHAPE, SIGMAS, generator=gen(4), x0=x0)


def test_labels_follow_their_trajectory():
    seen = []

    def teacher(x, sigma, labels):
        seen.append(labels)
        return point_mass_denoiser(x, sigma)

    pairs = consistency_pairs(teacher, 2, SHAPE, SIGMAS, generator=gen(), labels=torch.tensor([7, 3]))
    assert pairs.labels.tolist() == [7] * N + [3] * N
    assert all(l.tolist() == [7, 3] for l in seen)


def test_batch_must_be_a_whole_number_of_trajectories():
    assert trajectories_for_pairs(128, 16) == 8
    with pytest.raises(ValueError, match="multiple of 16"):
        trajectories_for_pairs(100, 16)


def test_kd_pairs_cost_a_full_rollout_each():
    pairs = kd_pairs(point_mass_denoiser, 16, SHAPE, SIGMAS, generator=gen(5))
    x_T = 80.0 * torch.randn((16, *SHAPE), generator=gen(5))
    assert len(pairs) == 16 and pairs.num_trajectories == 16
    assert pairs.teacher_calls == N and pairs.teacher_nfe == 16 * N        # 16 NFEs per pair
    assert torch.equal(pairs.x, x_T)
    assert torch.allclose(pairs.t, torch.full((16,), 80.0))
    assert pairs.level.tolist() == [N] * 16
    torch.testing.assert_close(pairs.target, MU + 0.002 / 80.0 * (x_T - MU), atol=1e-5, rtol=1e-5)


def test_slow_cmt_one_solve_per_pair_on_the_remaining_grid():
    P = 24
    x0 = torch.randn((P, *SHAPE), generator=gen(6))
    pairs = slow_cmt_pairs(point_mass_denoiser, x0, SIGMAS, order=3, generator=gen(7))
    g = gen(7)
    level = torch.randint(1, N + 1, (P,), generator=g)
    eps = torch.randn((P, *SHAPE), generator=g)
    t = SIGMAS[N - level].float()
    assert torch.equal(pairs.level, level) and torch.equal(pairs.t, t)
    torch.testing.assert_close(pairs.x, x0 + t.view(-1, 1, 1, 1) * eps)
    # target: the solve from t_i down to σ_min, in closed form for the point mass
    torch.testing.assert_close(pairs.target, MU + (0.002 / t).view(-1, 1, 1, 1) * (pairs.x - MU),
                               atol=1e-5, rtol=1e-5)
    # cost: i NFEs for a pair at level i (up to N), one batched solve per distinct level
    assert pairs.teacher_nfe == int(level.sum()) and pairs.num_trajectories == P
    assert pairs.teacher_calls == sum(set(level.tolist()))
    assert 1 <= pairs.teacher_nfe / P <= N
    assert len(set(level.tolist())) > 4                                    # levels are spread out


def test_slow_cmt_solves_each_level_like_a_separate_rollout():
    x0 = torch.randn((6, *SHAPE), generator=gen(8))
    pairs = slow_cmt_pairs(gaussian_denoiser, x0, SIGMAS, order=3, generator=gen(9))
    for p in range(6):
        i = int(pairs.level[p])
        ref = dpm_solver_pp(gaussian_denoiser, pairs.x[p:p + 1], SIGMAS[N - i:], order=3)[-1]
        torch.testing.assert_close(pairs.target[p:p + 1], ref, atol=1e-5, rtol=1e-5)


def test_slow_cmt_per_sample_grid_costs_k_per_pair():
    P, K = 10, 6
    x0 = torch.randn((P, *SHAPE), generator=gen(10))
    pairs = slow_cmt_pairs(point_mass_denoiser, x0, SIGMAS, generator=gen(11), solve_steps=K)
    assert pairs.teacher_calls == K and pairs.teacher_nfe == K * P
    torch.testing.assert_close(pairs.target, MU + (0.002 / pairs.t).view(-1, 1, 1, 1) * (pairs.x - MU),
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# MeanFlow form
# --------------------------------------------------------------------------------------------------
def point_mass_velocity(z, t, labels=None):
    return (z - MU) / t.reshape(-1, 1, 1, 1)


def test_meanflow_pair_set_is_every_ordered_pair_28_for_8_time_points():
    a, b = meanflow_pair_indices(8)
    assert len(a) == 28 == math.comb(8, 2)
    assert all(x < y for x, y in zip(a.tolist(), b.tolist()))
    assert len(set(zip(a.tolist(), b.tolist()))) == 28
    assert len(meanflow_pair_indices(9)[0]) == 36              # 8 solver steps = 9 points would give 36


def test_meanflow_pairs_point_mass_targets_and_counts():
    T, times = 4, fm_uniform_times(7)                          # the authors' 8 time points, 1 -> 0
    pairs = meanflow_pairs(point_mass_velocity, T, SHAPE, times, "fm_euler", generator=gen(12))
    eps = torch.randn((T, *SHAPE), generator=gen(12))
    assert len(pairs) == T * 28 and pairs.num_trajectories == T
    assert pairs.teacher_calls == 7 and pairs.teacher_nfe == 7 * T          # 0.25 NFE per pair
    assert pairs.trajectory.tolist() == [k for k in range(T) for _ in range(28)]
    assert (pairs.t > pairs.r).all()
    tr = {(round(t, 6), round(r, 6)) for t, r in zip(pairs.t[:28].tolist(), pairs.r[:28].tolist())}
    grid = [round(v, 6) for v in times.tolist()]
    assert tr == {(grid[a], grid[b]) for a in range(8) for b in range(a + 1, 8)}
    assert (0.0 in pairs.r.tolist()) and (1.0 in pairs.t.tolist())       # the 1-step map is a pair
    for p in range(len(pairs)):
        k = p // 28
        torch.testing.assert_close(pairs.x[p], MU + pairs.t[p] * (eps[k] - MU), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pairs.target[p], eps[k] - MU, atol=1e-4, rtol=1e-4)


def test_meanflow_targets_are_finite_differences_of_the_states():
    """A nonlinear teacher, checked against a hand-written Euler loop and a double loop over pairs."""
    def velocity(z, t, labels=None):
        return torch.sin(3 * z) * t.reshape(-1, 1, 1, 1) + 0.3

    T, K = 2, 6
    times = fm_uniform_times(K - 1)
    pairs = meanflow_pairs(velocity, T, SHAPE, times, "fm_euler", generator=gen(13))
    z = torch.randn((T, *SHAPE), generator=gen(13))
    states = [z]
    for k in range(K - 1):
        dt = float(times[k + 1] - times[k])
        z = z + dt * (torch.sin(3 * z) * float(times[k]) + 0.3)
        states.append(z)
    p = 0
    for traj in range(T):
        for a in range(K):
            for b in range(a + 1, K):
                ti, tj = float(times[a]), float(times[b])
                assert pairs.t[p].item() == pytest.approx(ti) and pairs.r[p].item() == pytest.approx(tj)
                assert pairs.level[p] == K - 1 - a and pairs.target_level[p] == K - 1 - b
                torch.testing.assert_close(pairs.x[p], states[a][traj], atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(pairs.target[p], (states[a][traj] - states[b][traj]) / (ti - tj),
                                           atol=1e-4, rtol=1e-4)
                p += 1
    assert p == len(pairs) == T * K * (K - 1) // 2


def test_meanflow_teacher_samplers_and_their_counted_cost():
    times = fm_uniform_times(7)
    heun = meanflow_pairs(point_mass_velocity, 2, SHAPE, times, "fm_heun", generator=gen(14))
    assert heun.teacher_calls == 14 and heun.teacher_nfe == 28               # Heun: 2 calls per step

    def avg_velocity(z, r, t, labels=None):                                  # exact for the point mass
        return (z - MU) / t.reshape(-1, 1, 1, 1)

    mf = meanflow_pairs(avg_velocity, 2, SHAPE, times, "meanflow", generator=gen(14))
    euler = meanflow_pairs(point_mass_velocity, 2, SHAPE, times, "fm_euler", generator=gen(14))
    assert mf.teacher_calls == 7 and mf.teacher_nfe == 14
    torch.testing.assert_close(mf.target, euler.target, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown MeanFlow-form teacher sampler"):
        meanflow_pairs(avg_velocity, 2, SHAPE, times, "dpm_solver_pp")


def test_meanflow_kd_keeps_only_the_one_step_pair():
    times = fm_uniform_times(7)
    pairs = meanflow_pairs(point_mass_velocity, 3, SHAPE, times, "fm_euler", generator=gen(15),
                           endpoints_only=True)
    eps = torch.randn((3, *SHAPE), generator=gen(15))
    assert len(pairs) == 3 and pairs.t.tolist() == [1.0] * 3 and pairs.r.tolist() == [0.0] * 3
    torch.testing.assert_close(pairs.x, eps)
    torch.testing.assert_close(pairs.target, eps - MU, atol=1e-5, rtol=1e-5)


def test_counted_teacher_counts_calls_and_samples_and_is_shared():
    counter = CountedTeacher(point_mass_denoiser)
    pairs = consistency_pairs(counter, 2, SHAPE, SIGMAS, generator=gen())
    assert (counter.calls, counter.nfe) == (N, 2 * N) == (pairs.teacher_calls, pairs.teacher_nfe)
    again = consistency_pairs(counter, 1, SHAPE, SIGMAS, generator=gen())
    assert (again.teacher_calls, again.teacher_nfe) == (N, N)             # per build, not cumulative
    assert (counter.calls, counter.nfe) == (2 * N, 3 * N)

    # a guided teacher evaluates its network on [x; x] (conditional and null labels): 2 NFEs per sample
    guided = CountedTeacher(lambda x, sigma, labels: point_mass_denoiser(x, sigma, None), cfg_scale=2.0, null_class=3)
    labels = torch.zeros(2, dtype=torch.long)
    pairs = consistency_pairs(guided, 2, SHAPE, SIGMAS, generator=gen(), labels=labels)
    assert pairs.teacher_nfe == 4 * N and pairs.teacher_calls == N
