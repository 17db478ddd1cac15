"""Mid-training: Consistency Mid-Training (CMT, SPEC §4/§5) and its ablation baselines (KD, Slow CMT).

A plain regression onto fixed targets made by a frozen teacher's ODE solver: no stop-gradient, no time
weighting. The work splits in two so the trainer can overlap them (issue #6):

- :meth:`MidTraining.make_pairs` — teacher side, no grad: a batch → :class:`engine.rollout.TrajectoryPairs`;
- :meth:`MidTraining.pair_loss` — student side: forward on the pairs, unit-weight distance, mean over pairs.

``loss(model, batch, generator) = pair_loss(model, make_pairs(batch, generator))``. The batch's size B is
the number of pairs; the number of trajectories follows from the method (B/N for consistency CMT).
Which batch images are used: with ``mid.data_start`` the first B/N images start the B/N trajectories;
Slow CMT uses all B images (one pair each); otherwise the images are not used (data-free), only their
labels (the first trajectories' worth) for a class-conditional teacher.

``mid.init=teacher`` starts the student from the teacher's raw weights (engine.build.transfer_weights):
a strict copy, or, for a flow-matching teacher and a MeanFlow student (use_r), every key but the
r-embedding's, whose last layer is zeroed so the student starts as the teacher (as the authors initialise
MeanFlow from SiT). ``init_report["left_at_init"]`` lists the keys left at init.
"""
from __future__ import annotations

import torch

from engine.build import build_raw_network, load_export, model_kind, transfer_weights, wrap_network
from engine.config import Config, ConfigError
from engine.grids import edm_lambda_uniform_sigmas, fm_uniform_times
from engine.guidance import guided
from engine.perceptual import build_distance
from engine.rollout import (CallCounter, TrajectoryPairs, consistency_pairs, kd_pairs, meanflow_pairs,
                            meanflow_pairs_per_trajectory, slow_cmt_pairs, trajectories_for_pairs)

# Teacher samplers each form accepts, by the teacher's kind (what its network computes).
_SAMPLERS = {
    ("consistency", "edm"): ("dpm_solver_pp",),
    ("meanflow", "flow"): ("fm_euler", "fm_heun"),
    ("meanflow", "meanflow"): ("meanflow",),
}


class MidTraining:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        mid = cfg.mid
        self.form, self.method = mid.form, mid.method
        _check_mid_config(cfg)
        # The student first, so its seeded init does not depend on the teacher (building it draws from
        # the global RNG that the trainer seeded).
        student = build_raw_network(cfg)
        if not mid.teacher:
            raise ConfigError("mid.teacher is not set: set mid.teacher to the pre-training run dir "
                              "(e.g. --set mid.teacher=runs/digits-pre)")
        teacher_cfg, teacher_net, meta = load_export(mid.teacher, "mid.teacher")
        self.teacher_cfg = teacher_cfg
        self.teacher_kind = model_kind(teacher_cfg, meta.get("stage", "pre"))
        _check_teacher(cfg, teacher_cfg, self.teacher_kind, mid.teacher)
        # Kept outside self.model: DeepSpeed neither optimises nor checkpoints it.
        self.teacher = wrap_network(teacher_net, teacher_cfg, self.teacher_kind).eval().requires_grad_(False)
        self.init_report = {"init": mid.init, "left_at_init": []}
        if mid.init == "teacher":   # strict, or an FM teacher -> MeanFlow student starting as the teacher
            self.init_report.update(transfer_weights(student, cfg, teacher_cfg, teacher_net, config_key="mid.teacher",
                                                     path=mid.teacher, hint="or set mid.init=random"))
        try:
            self.model = wrap_network(student, cfg, model_kind(cfg, "mid"))
        except ValueError as exc:
            raise ConfigError(f"mid.form={self.form}: {exc} (set network.use_r=true)") from None
        self.distance = None   # the MeanFlow form regresses velocities with the squared loss
        if self.form == "consistency":
            self.distance = build_distance(mid.loss, channels=cfg.data.channels, resolution=cfg.data.resolution,
                                           feature_net=mid.feature_net, config_key="mid.feature_net")
            self.grid = edm_lambda_uniform_sigmas(mid.solver_steps, cfg.model.sigma_min, cfg.model.sigma_max)
            self.pairs_per_trajectory = {"cmt": mid.solver_steps, "kd": 1, "slow_cmt": 1}[self.method]
        else:
            self.grid = fm_uniform_times(mid.solver_steps)
            self.pairs_per_trajectory = meanflow_pairs_per_trajectory(mid.solver_steps + 1, self.method == "kd")
        per_step = cfg.train.batch_size // max(1, cfg.train.grad_accum)
        if per_step % self.pairs_per_trajectory:
            raise ConfigError(self._batch_message(per_step))
        self._net_counter = CallCounter(self.teacher)   # sees every teacher network evaluation
        self.counters = {"teacher_nfe": 0, "teacher_calls": 0, "pairs": 0, "trajectories": 0}

    def _batch_message(self, pairs: int) -> str:
        return (f"a batch of {pairs} pairs is not a whole number of trajectories of {self.pairs_per_trajectory} "
                f"pairs (mid.form={self.form}, mid.method={self.method}, mid.solver_steps="
                f"{self.cfg.mid.solver_steps}): make train.batch_size per micro-step and rank a multiple of "
                f"{self.pairs_per_trajectory}")

    # -- teacher side ---------------------------------------------------------------------------------
    def _teacher_fn(self, x: torch.Tensor, *times_and_labels):
        """The teacher as the rollout calls it, with classifier-free guidance for EDM / FM teachers.

        Guidance is one batched call on [x; x] with [labels; null]; it counts as 2 NFEs per sample. A
        MeanFlow teacher has its guidance trained in (its post.cfg_scale), so it is called as is.
        """
        *times, labels = times_and_labels
        scale = self.cfg.mid.cfg_scale
        if scale == 1.0 or labels is None or self.teacher_kind == "meanflow":
            return self._net_counter(x, *times, labels)
        null = torch.full_like(labels, self.teacher_cfg.network.num_classes)
        out = self._net_counter(torch.cat([x, x]), *(torch.cat([t, t]) for t in times), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return guided(cond, uncond, scale)

    def _place(self, device: torch.device) -> None:
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        if self.distance is not None and any(True for _ in self.distance.parameters()) \
                and next(self.distance.parameters()).device != device:
            self.distance.to(device)

    @torch.no_grad()
    def make_pairs(self, batch: dict, generator: torch.Generator, count: bool = True) -> TrajectoryPairs:
        """Roll the teacher out for this batch (B = number of pairs) and return the pairs.

        Draws only from ``generator``, never from the global RNG (the teacher is in eval mode), so a
        producer thread can run it while the student's dropout draws from the global RNG. ``count=False``
        leaves :attr:`counters` alone: a pipelined producer makes pairs ahead of use, and the trainer
        adds them with :meth:`count_pairs` when the student consumes them, so the logged counters are
        the same as in a serial run.
        """
        images = batch["images"]
        labels = batch.get("labels")
        B, shape, device = images.shape[0], tuple(images.shape[1:]), images.device
        self._place(device)
        mid = self.cfg.mid
        if B % self.pairs_per_trajectory:
            raise ConfigError(self._batch_message(B))
        T = trajectories_for_pairs(B, self.pairs_per_trajectory)
        traj_labels = None if labels is None else labels[:T]
        common = dict(generator=generator, labels=traj_labels, counter=self._net_counter)
        if self.form == "consistency":
            x0 = images[:T] if mid.data_start else None
            if self.method == "cmt":
                pairs = consistency_pairs(self._teacher_fn, T, shape, self.grid, mid.solver_order, x0=x0,
                                          device=device, **common)
            elif self.method == "kd":
                pairs = kd_pairs(self._teacher_fn, B, shape, self.grid, mid.solver_order, x0=x0,
                                 device=device, **common)
            else:
                pairs = slow_cmt_pairs(self._teacher_fn, images, self.grid, mid.solver_order, **common)
        else:
            pairs = meanflow_pairs(self._teacher_fn, T, shape, self.grid, mid.teacher_sampler,
                                   endpoints_only=self.method == "kd", device=device, **common)
        if count:
            self.count_pairs(pairs)
        return pairs

    def count_pairs(self, pairs: TrajectoryPairs) -> None:
        """Add what ``pairs`` cost to :attr:`counters` (done by make_pairs unless count=False)."""
        self.counters["teacher_nfe"] += pairs.teacher_nfe
        self.counters["teacher_calls"] += pairs.teacher_calls
        self.counters["pairs"] += len(pairs)
        self.counters["trajectories"] += pairs.num_trajectories

    # -- student side ---------------------------------------------------------------------------------
    def pair_loss(self, model, pairs: TrajectoryPairs, generator: torch.Generator | None = None) -> torch.Tensor:
        """Student forward on the pairs and the unit-weight distance to the targets, mean over pairs.

        ``generator`` only drives the ELatentLPIPS augmentation (default: the global RNG, which the trainer
        seeds per step, so pipelining pair generation does not change the draws).
        """
        labels = pairs.labels if self.cfg.network.num_classes > 0 else None
        if self.form == "consistency":
            pred = model(pairs.x, pairs.t, labels)
            return self.distance(pred, pairs.target, generator).mean()
        pred = model(pairs.x, pairs.r, pairs.t, labels)
        return (pred.float() - pairs.target.float()).square().flatten(1).mean(dim=1).mean()

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self.pair_loss(model, self.make_pairs(batch, generator))


# --------------------------------------------------------------------------------------------------
def _check_mid_config(cfg: Config) -> None:
    mid = cfg.mid
    if mid.form == "meanflow":
        if mid.method == "slow_cmt":
            raise ConfigError("mid.method=slow_cmt is defined for mid.form=consistency only: use cmt or kd")
        if mid.data_start:
            raise ConfigError("mid.data_start applies to mid.form=consistency (x_T = x_0 + σ_max·ε); the "
                              "MeanFlow trajectory starts at pure noise z_1 = ε: set mid.data_start=false")
        if mid.loss != "l2":
            raise ConfigError(f"mid.loss={mid.loss} with mid.form=meanflow: the targets are average velocities, "
                              "not images, so the paper uses the squared loss: set mid.loss=l2")
    if mid.solver_steps < 1:
        raise ConfigError(f"mid.solver_steps must be >= 1, got {mid.solver_steps}")


def _check_teacher(cfg: Config, tcfg: Config, kind: str, path) -> None:
    mid = cfg.mid
    allowed = _SAMPLERS.get((mid.form, kind))
    if allowed is None:
        need = "an EDM teacher (model.kind=edm)" if mid.form == "consistency" else \
            "a flow-matching (model.kind=flow) or MeanFlow teacher"
        raise ConfigError(f"mid.form={mid.form} needs {need}, but mid.teacher='{path}' is a '{kind}' model")
    if mid.teacher_sampler not in allowed:
        raise ConfigError(f"mid.teacher_sampler={mid.teacher_sampler} does not drive a '{kind}' teacher: "
                          f"choose {' or '.join(allowed)}")
    if (tcfg.data.channels, tcfg.data.resolution) != (cfg.data.channels, cfg.data.resolution):
        raise ConfigError(f"mid.teacher='{path}' was trained on {tcfg.data.channels}x{tcfg.data.resolution}px "
                          f"data, this run has {cfg.data.channels}x{cfg.data.resolution}px: use the same data.*")
    if tcfg.network.num_classes != cfg.network.num_classes:
        raise ConfigError(f"mid.teacher='{path}' has network.num_classes={tcfg.network.num_classes}, the student "
                          f"{cfg.network.num_classes}: they must match")
    if mid.cfg_scale != 1.0 and tcfg.network.num_classes == 0:
        raise ConfigError(f"mid.cfg_scale={mid.cfg_scale} needs a class-conditional teacher: set mid.cfg_scale=1")
    if kind == "meanflow" and tcfg.post.cfg_scale != mid.cfg_scale:
        raise ConfigError(f"the MeanFlow teacher was trained with post.cfg_scale={tcfg.post.cfg_scale}; "
                          f"mid.cfg_scale={mid.cfg_scale} must match it (SPEC §5)")

