"""The teacher side of CMT mid-training: roll a frozen teacher out and turn its states into pairs.

Framework-free (plain tensors and callables, no config, no DeepSpeed) and run under ``torch.no_grad``.
Every builder returns a :class:`TrajectoryPairs`: student inputs, their times, the fixed regression
targets, and the teacher work it cost, *counted* as it happened (:class:`CountedTeacher`), never derived
from a formula, so a benchmark can report teacher NFEs per pair by measurement.

Teachers are callables (wrapped in a :class:`CountedTeacher` unless they are one already):
- EDM denoiser ``teacher(x, sigma[B], labels)`` (consistency form: CMT, KD, Slow CMT);
- flow-matching velocity ``teacher(z, t[B], labels)`` (``fm_euler`` / ``fm_heun``);
- MeanFlow average velocity ``teacher(z, r[B], t[B], labels)`` (``meanflow``).
``labels`` is the per-sample class tensor or None.

Builders (P = pairs returned, N = solver steps, grids visited noise first):

==================  ==========================================  ============================  ============
builder             pairs                                       trajectories / solves         teacher NFE
==================  ==========================================  ============================  ============
consistency_pairs   (x̂_{t_i}, σ=t_i) → x̂_{t_0}, i = N..1       P/N trajectories, N pairs     N·P/N = P
kd_pairs            (x_T, σ_max) → x̂_{t_0}                      P trajectories, 1 pair        N·P
slow_cmt_pairs      (x_0 + t_i·ε, t_i) → its own solve's end    P solves, i ~ U{1..N}         Σ_p i_p
meanflow_pairs      (x̂_{t_i}, r=t_j, t=t_i) →                   T = P/(N(N+1)/2)              N·T (Euler,
                    (x̂_{t_i} − x̂_{t_j})/(t_i − t_j), all i > j  trajectories                  MF), 2N·T Heun
==================  ==========================================  ============================  ============

(NFE = per-sample network evaluations = Σ over calls of the call's batch size.)

MeanFlow pair set. The paper (App. B.4/B.6) reports "eight uniform steps" (an MF-B/4 teacher) and an
"8-step Heun solver" (SiT) with "28 pairs" per trajectory. 28 = C(8, 2): every ordered pair of 8 states.
In the SiT sampler the authors build on, ``num_steps`` counts time *points* (``linspace(t0, t1, num_steps)``,
all returned by odeint), so "8 steps" is 8 points = 7 intervals, and the pair set is simply all (i, j) with
t_i > t_j — no exclusions, which keeps both the paper's "t_j = 0 recovers the consistency case" (all
j = 0 pairs) and the one-step pair (t = 1 → r = 0). In this engine's convention (N = intervals) that is
N = 7 (``mid.solver_steps=7``); N = 8 gives all 36 pairs of 9 points. The three 28-subsets of 9 points
each drop something the paper relies on (all pairs from x_T / all pairs to x̂_0 / the adjacent pairs).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from engine.sampling.solvers import dpm_solver_pp, fm_euler, fm_heun, meanflow_multistep
from engine.stages.pairs import TrajectoryPairs, counted

FM_SAMPLERS = {"fm_euler": fm_euler, "fm_heun": fm_heun, "meanflow": meanflow_multistep}


def trajectories_for_pairs(num_pairs: int, pairs_per_trajectory: int, what: str = "pairs per trajectory") -> int:
    """num_pairs / pairs_per_trajectory, or a ValueError saying which batch sizes work."""
    if num_pairs <= 0 or num_pairs % pairs_per_trajectory:
        raise ValueError(f"a batch of {num_pairs} pairs is not a whole number of trajectories of "
                         f"{pairs_per_trajectory} {what}: use a (micro-)batch size that is a multiple of "
                         f"{pairs_per_trajectory}")
    return num_pairs // pairs_per_trajectory


def _noise(num: int, shape, generator, device, dtype) -> torch.Tensor:
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    return torch.randn((num, *shape), generator=generator, device=device, dtype=dtype)


def _bind(fn: Callable, labels: Optional[torch.Tensor]) -> Callable:
    """A solver-style callable (state, *times) with the labels bound."""
    return lambda x, *times: fn(x, *times, labels)


# --------------------------------------------------------------------------------------------------
# Consistency form (paper §3.2, Eq. 7): EDM teacher, DPM-Solver++ on a λ-uniform σ grid
# --------------------------------------------------------------------------------------------------
def _start(x0, num, shape, sigma_max, generator, device, dtype):
    """x_T = σ_max·ε, or x_0 + σ_max·ε (the authors' code) when data x0 [num, ...] is given."""
    if x0 is not None:
        if x0.shape[0] != num or tuple(x0.shape[1:]) != tuple(shape):
            raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected {(num, *shape)}")
        device, dtype = x0.device, x0.dtype
    x_T = sigma_max * _noise(num, shape, generator, device, dtype)
    return x_T if x0 is None else x0 + x_T


@torch.no_grad()
def consistency_pairs(teacher: Callable, num_trajectories: int, shape, sigmas: torch.Tensor, order: int = 3,
                      generator: Optional[torch.Generator] = None, x0: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None, device=None,
                      dtype: torch.dtype = torch.float32) -> TrajectoryPairs:
    """CMT pairs (paper Eq. 7): every state of a DPM-Solver++ rollout mapped to the rollout's end.

    ``sigmas`` is the [N+1] grid, σ_max first, ending at σ_min (``edm_lambda_uniform_sigmas``). Each of the
    ``num_trajectories`` rollouts starts at x_T = σ_max·ε (or x0 + σ_max·ε with data ``x0``
    [num_trajectories, *shape]) and yields N pairs (x̂_{t_i}, σ = t_i) → x̂_{t_0}, i = N..1, for N teacher
    calls on the batch of rollouts: one NFE per pair.

    Order: the pairs of one trajectory are contiguous, trajectory k holding pairs k·N … k·N + N − 1 in
    rollout order (pair k·N + m is the state after m steps, i = N − m, so σ decreases within a block).
    ``labels`` [num_trajectories] are the rollouts' classes, repeated over their pairs.
    """
    teacher = counted(teacher)
    calls0, nfe0 = teacher.calls, teacher.nfe
    n = sigmas.shape[0] - 1
    x_T = _start(x0, num_trajectories, shape, float(sigmas[0]), generator, device, dtype)
    T = num_trajectories
    # The pair inputs, trajectory-major [T, N, C, H, W], σ_max first: the solver writes state m straight into
    # inputs[:, m] (a strided slot of this buffer), so the trajectory is never stacked or copied afterwards.
    inputs = torch.empty((T, n, *x_T.shape[1:]), dtype=x_T.dtype, device=x_T.device)
    states = dpm_solver_pp(_bind(teacher, labels), x_T, sigmas, order=order, out=inputs.transpose(0, 1))
    dev = x_T.device
    grid_index = torch.arange(n, device=dev).repeat(T)              # position in the grid, 0 = x_T
    return TrajectoryPairs(
        x=inputs.view(T * n, *x_T.shape[1:]),
        t=sigmas[:n].to(device=dev, dtype=torch.float32).repeat(T),
        target=states[n].repeat_interleave(n, dim=0),
        level=n - grid_index,
        target_level=torch.zeros(T * n, dtype=torch.long, device=dev),
        trajectory=torch.arange(T, device=dev).repeat_interleave(n),
        labels=None if labels is None else labels.repeat_interleave(n),
        teacher_nfe=teacher.nfe - nfe0, teacher_calls=teacher.calls - calls0, num_trajectories=T)


@torch.no_grad()
def kd_pairs(teacher: Callable, num_pairs: int, shape, sigmas: torch.Tensor, order: int = 3,
             generator: Optional[torch.Generator] = None, x0: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None, device=None, dtype: torch.dtype = torch.float32) -> TrajectoryPairs:
    """Knowledge-distillation baseline: only (x_T, σ_max) → x̂_{t_0}; one full rollout per pair (N NFEs)."""
    teacher = counted(teacher)
    calls0, nfe0 = teacher.calls, teacher.nfe
    n = sigmas.shape[0] - 1
    x_T = _start(x0, num_pairs, shape, float(sigmas[0]), generator, device, dtype)
    end = dpm_solver_pp(_bind(teacher, labels), x_T, sigmas, order=order)[-1]
    dev = x_T.device
    return TrajectoryPairs(
        x=x_T, t=torch.full((num_pairs,), float(sigmas[0]), device=dev), target=end,
        level=torch.full((num_pairs,), n, dtype=torch.long, device=dev),
        target_level=torch.zeros(num_pairs, dtype=torch.long, device=dev),
        trajectory=torch.arange(num_pairs, device=dev), labels=labels,
        teacher_nfe=teacher.nfe - nfe0, teacher_calls=teacher.calls - calls0, num_trajectories=num_pairs)


@torch.no_grad()
def slow_cmt_pairs(teacher: Callable, x0: torch.Tensor, sigmas: torch.Tensor, order: int = 3,
                   generator: Optional[torch.Generator] = None, labels: Optional[torch.Tensor] = None,
                   solve_steps: Optional[int] = None) -> TrajectoryPairs:
    """Slow CMT baseline (paper §4 ablation): one teacher solve per pair, started from data.

    For each data image x_0 (row of ``x0``, one pair each) a level i is drawn uniformly from {1, …, N} (the
    paper does not say how t is sampled; uniform over the N grid levels gives the pairs the same σ
    distribution as CMT's), x_t = x_0 + t_i·ε, and the target is the teacher's solve from t_i down to σ_min:

    - ``solve_steps=None`` (default): on the remaining grid t_i, …, t_0 — exactly the grid points of
      CMT's rollouts, so the baseline differs from CMT only in not reusing states. i steps, i NFEs for
      the pair (N at most, (N+1)/2 on average). Solves of equal level are batched: one
      ``dpm_solver_pp`` call per distinct level drawn.
    - ``solve_steps=K``: one batched solve on a per-sample [K+1, P] grid, λ-uniform from each pair's t_i
      to σ_min; K NFEs for every pair.
    """
    teacher = counted(teacher)
    calls0, nfe0 = teacher.calls, teacher.nfe
    n = sigmas.shape[0] - 1
    P, dev = x0.shape[0], x0.device
    gen_device = generator.device if generator is not None else dev
    level = torch.randint(1, n + 1, (P,), generator=generator, device=gen_device).to(dev)
    eps = _noise(P, x0.shape[1:], generator, dev, x0.dtype)
    grid = sigmas.to(torch.float64).cpu()
    t_start = grid[n - level.cpu()]                                  # [P] float64
    x_t = x0 + t_start.to(device=dev, dtype=x0.dtype).view(-1, *[1] * (x0.ndim - 1)) * eps
    if solve_steps is None:
        target = torch.empty_like(x_t)
        for i in sorted(set(level.tolist()), reverse=True):
            idx = (level == i).nonzero().squeeze(1)
            sub_labels = None if labels is None else labels[idx]
            target[idx] = dpm_solver_pp(_bind(teacher, sub_labels), x_t[idx], grid[n - i:], order=order)[-1]
    else:
        if solve_steps < 1:
            raise ValueError(f"solve_steps must be >= 1, got {solve_steps}")
        frac = torch.arange(solve_steps + 1, dtype=torch.float64)[:, None] / solve_steps
        per_sample = t_start[None] * (grid[n] / t_start)[None] ** frac   # [K+1, P], λ-uniform per column
        target = dpm_solver_pp(_bind(teacher, labels), x_t, per_sample, order=order)[-1]
    return TrajectoryPairs(
        x=x_t, t=t_start.to(device=dev, dtype=torch.float32), target=target, level=level,
        target_level=torch.zeros(P, dtype=torch.long, device=dev), trajectory=torch.arange(P, device=dev),
        labels=labels, teacher_nfe=teacher.nfe - nfe0, teacher_calls=teacher.calls - calls0, num_trajectories=P)


# --------------------------------------------------------------------------------------------------
# MeanFlow form (paper §3.3, Eq. 8): FM / MeanFlow teacher on a uniform t grid
# --------------------------------------------------------------------------------------------------
def meanflow_pair_indices(num_points: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid positions (a, b), a < b, of every pair of trajectory states with t_a > t_b: K(K−1)/2 pairs.

    Positions count from the noise end (a = 0 is t = 1). Ordered by input a, then target b. With the
    authors' trajectory of 8 time points (7 uniform steps 1 → 0, the SiT sampler's ``num_steps=8``
    convention: ``linspace(1, 0, 8)``) this is C(8, 2) = 28 pairs per trajectory.
    """
    a, b = torch.triu_indices(num_points, num_points, offset=1, device=device)
    return a, b


@torch.no_grad()
def meanflow_pairs(teacher: Callable, num_trajectories: int, shape, times: torch.Tensor,
                   sampler: str = "fm_euler", generator: Optional[torch.Generator] = None,
                   labels: Optional[torch.Tensor] = None, endpoints_only: bool = False, device=None,
                   dtype: torch.dtype = torch.float32) -> TrajectoryPairs:
    """CMT pairs for MeanFlow (paper Eq. 8) from a teacher trajectory on the grid ``times`` (1 → 0).

    Each rollout starts at z_1 = ε and runs ``sampler`` ('fm_euler' / 'fm_heun' on a velocity teacher, or
    'meanflow' multistep on an average-velocity teacher) over ``times`` ([K] points, K − 1 steps), keeping
    all K states. Every pair of states (i, j) with t_i > t_j (:func:`meanflow_pair_indices`) gives the input
    x̂_{t_i} at (r = t_j, t = t_i) and the target (x̂_{t_i} − x̂_{t_j})/(t_i − t_j): K(K−1)/2 pairs per
    trajectory, contiguous per trajectory as in :func:`consistency_pairs`. ``endpoints_only`` keeps just the
    (t = 1 → r = 0) pair: the KD baseline of this form.
    """
    if sampler not in FM_SAMPLERS:
        raise ValueError(f"unknown MeanFlow-form teacher sampler '{sampler}': choose {', '.join(FM_SAMPLERS)}")
    teacher = counted(teacher)
    calls0, nfe0 = teacher.calls, teacher.nfe
    K = times.shape[0]
    T = num_trajectories
    z1 = _noise(T, shape, generator, device, dtype)
    states = torch.stack(FM_SAMPLERS[sampler](_bind(teacher, labels), z1, times), dim=1)   # [T, K, C, H, W]
    dev = z1.device
    if endpoints_only:
        a = torch.zeros(1, dtype=torch.long, device=dev)
        b = torch.full((1,), K - 1, dtype=torch.long, device=dev)
    else:
        a, b = meanflow_pair_indices(K, device=dev)
    grid = times.to(torch.float64)
    t_a, t_b = grid.to(dev)[a], grid.to(dev)[b]
    inv_dt = (1.0 / (t_a - t_b)).to(torch.float32)                   # [p], exact in float64 first
    x_a, x_b = states[:, a], states[:, b]                            # [T, p, C, H, W]
    target = (x_a.float() - x_b.float()) * inv_dt.view(1, -1, *[1] * (x_a.ndim - 2))
    p = a.shape[0]
    return TrajectoryPairs(
        x=x_a.reshape(T * p, *shape), t=t_a.float().repeat(T), r=t_b.float().repeat(T),
        target=target.to(dtype).reshape(T * p, *shape),
        level=(K - 1 - a).repeat(T), target_level=(K - 1 - b).repeat(T),
        trajectory=torch.arange(T, device=dev).repeat_interleave(p),
        labels=None if labels is None else labels.repeat_interleave(p),
        teacher_nfe=teacher.nfe - nfe0, teacher_calls=teacher.calls - calls0, num_trajectories=T)


def meanflow_pairs_per_trajectory(num_points: int, endpoints_only: bool = False) -> int:
    return 1 if endpoints_only else num_points * (num_points - 1) // 2
