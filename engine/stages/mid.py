"""Mid-training: Consistency Mid-Training (CMT; paper §3.2 Eq. 7 and §3.3 Eq. 8) and its ablation baselines
(KD, Slow CMT; paper §4.3).

A plain regression onto fixed targets made by a frozen teacher's ODE solver: no stop-gradient, no time
weighting. The stage protocol's halves (engine/stages/base.py):

- ``prepare`` — teacher side, no grad: a batch → :class:`engine.stages.pairs.TrajectoryPairs`, drawing only
  from its generator, so it can run ahead in a thread or on a teacher rank;
- ``loss`` — student side: forward on the pairs, unit-weight distance, mean over pairs. It adds what the
  pairs cost to ``counters`` as they are used, so every schedule logs the same counts.

The batch's size B is the number of pairs; the number of trajectories follows from the method (B/N for
consistency CMT). Which batch images are used: with ``mid.data_start`` the first B/N images start the B/N
trajectories; Slow CMT uses all B images (one pair each); otherwise the images are not used (data-free),
only their labels (the first trajectories' worth) for a class-conditional teacher.

``mid.init=teacher`` starts the student from the teacher's raw weights (engine.models.weights.transfer_weights):
a strict copy, or, for a flow-matching teacher and a MeanFlow student (use_r), every key but the
r-embedding's, whose last layer is zeroed so the student starts as the teacher (as the authors initialise
MeanFlow from SiT). ``init_report["left_at_init"]`` lists the keys left at init.
"""
from __future__ import annotations

import torch

from engine.config import Config
from engine.errors import ConfigError
from engine.formulas.grids import edm_lambda_uniform_sigmas, fm_uniform_times
from engine.losses.distances import build_distance
from engine.models.factory import build_raw_network, model_kind, wrap_network
from engine.files import file_identity
from engine.models.weights import load_exported, resolve_export_dir, transfer_weights
from engine.stages.base import PairCost, Pipeline, Stage
from engine.stages.pairs import CountedTeacher, TrajectoryPairs
from engine.stages.rollout import (consistency_pairs, kd_pairs, meanflow_pairs, meanflow_pairs_per_trajectory,
                                   slow_cmt_pairs, trajectories_for_pairs)

# Teacher samplers each form accepts, by the teacher's kind (what its network computes).
_SAMPLERS = {
    ("consistency", "edm"): ("dpm_solver_pp",),
    ("meanflow", "flow"): ("fm_euler", "fm_heun"),
    ("meanflow", "meanflow"): ("meanflow",),
}


def mid_distance(cfg: Config) -> str:
    """The distance of ``mid.loss``: ``l2`` is the squared error (MeanFlow's regression always is), averaged
    over each sample's elements or, with ``mid.l2_reduction=sum`` (the authors' code), summed."""
    if cfg.mid.form == "meanflow" or cfg.mid.loss == "l2":
        return "sum_squared" if cfg.mid.l2_reduction == "sum" else "mean_squared"
    return cfg.mid.loss


def pairs_per_trajectory(cfg: Config) -> int:
    mid = cfg.mid
    if mid.form == "consistency":
        return {"cmt": mid.solver_steps, "kd": 1, "slow_cmt": 1}[mid.method]
    return meanflow_pairs_per_trajectory(mid.solver_steps + 1, mid.method == "kd")


class MidTraining(Stage):
    name = "mid"
    prepared_type = TrajectoryPairs

    def __init__(self, cfg: Config):
        self.cfg = cfg
        mid = cfg.mid
        self.form, self.method = mid.form, mid.method
        _check_mid_config(cfg)
        self.pipeline = Pipeline(mid.pipeline, mid.pipeline_depth, mid.teacher_ranks, mid.producer_timeout_s)
        # The student first, so its seeded init does not depend on the teacher (building it draws from
        # the global RNG that the trainer seeded).
        student = build_raw_network(cfg)
        if not mid.teacher:
            raise ConfigError("mid.teacher is not set: set mid.teacher to the pre-training run dir "
                              "(e.g. --set mid.teacher=runs/digits-pre)")
        teacher_cfg, teacher_net, meta = load_exported(mid.teacher, "mid.teacher")
        self.teacher_dir = resolve_export_dir(mid.teacher)
        self.teacher_cfg = teacher_cfg
        self.teacher_kind = model_kind(teacher_cfg, meta.get("stage", "pre"))
        _check_teacher(cfg, teacher_cfg, self.teacher_kind, mid.teacher)
        # Kept outside self.model: DeepSpeed neither optimises nor checkpoints it.
        self.teacher = wrap_network(teacher_net, teacher_cfg, self.teacher_kind).eval().requires_grad_(False)
        # A MeanFlow teacher has its guidance trained in (its post.cfg_scale), so it is called as is.
        scale = 1.0 if self.teacher_kind == "meanflow" else mid.cfg_scale
        if mid.guide and scale == 1.0:
            why = "a MeanFlow teacher has its guidance trained in" if mid.cfg_scale != 1.0 else "mid.cfg_scale=1"
            raise ConfigError(f"mid.guide is set but nothing is guided ({why}): unset mid.guide")
        self.guide, guide_labels = self._load_guide(meta.get("stage", "pre")) if scale != 1.0 else (None, False)
        self.counted_teacher = CountedTeacher(self.teacher, scale, teacher_cfg.network.num_classes,
                                              guide=self.guide, guide_labels=guide_labels)
        self.init_report = {"init": mid.init, "left_at_init": []}
        if mid.init == "teacher":   # strict, or an FM teacher -> MeanFlow student starting as the teacher
            self.init_report.update(transfer_weights(student, cfg, teacher_cfg, teacher_net, config_key="mid.teacher",
                                                     path=mid.teacher, hint="or set mid.init=random"))
        try:
            self.model = wrap_network(student, cfg, model_kind(cfg, "mid"))
        except ValueError as exc:
            raise ConfigError(f"mid.form={self.form}: {exc} (set network.use_r=true)") from None
        self.distance = build_distance(mid_distance(cfg), channels=cfg.data.channels,
                                       resolution=cfg.data.resolution, feature_net=mid.feature_net,
                                       config_key="mid.feature_net")
        if self.form == "consistency":
            self.grid = edm_lambda_uniform_sigmas(mid.solver_steps, cfg.model.sigma_min, cfg.model.sigma_max)
        else:
            self.grid = fm_uniform_times(mid.solver_steps)
        self.pairs_per_trajectory = pairs_per_trajectory(cfg)
        self.counters = {"teacher_nfe": 0, "teacher_calls": 0, "pairs": 0, "trajectories": 0}

    @staticmethod
    def cost_per_pair(cfg: Config) -> PairCost:
        """Teacher NFEs per pair (docs/method.md §8): CMT 1, KD N, Slow CMT (N+1)/2 on average (a solve from
        a level drawn uniformly from 1..N); MeanFlow CMT the trajectory's NFEs over its pairs. Guidance of an
        EDM or flow-matching teacher doubles them (one [x; x] call)."""
        mid = cfg.mid
        n = mid.solver_steps
        if mid.form == "consistency":
            per_trajectory = {"cmt": n, "kd": n, "slow_cmt": (n + 1) / 2}[mid.method]
        else:
            per_trajectory = n * (2 if mid.teacher_sampler == "fm_heun" else 1)
        guided = mid.cfg_scale != 1.0 and mid.teacher_sampler != "meanflow"
        nfe = per_trajectory * (2 if guided else 1) / pairs_per_trajectory(cfg)
        return PairCost(teacher_nfe=nfe, student_grad=1.0, student_nograd=0.0, distance=mid_distance(cfg))

    def _load_guide(self, teacher_stage: str) -> tuple[torch.nn.Module | None, bool]:
        """The guide network of mid.guide (and whether it takes the labels), or None when the teacher guides
        itself with its null label, which it must then have been trained with (a dropped label)."""
        mid, tcfg = self.cfg.mid, self.teacher_cfg
        if not mid.guide:
            dropout = tcfg.pre.label_dropout if teacher_stage == "pre" else tcfg.post.label_dropout
            if dropout == 0:
                raise ConfigError(f"mid.cfg_scale={mid.cfg_scale} needs the teacher's unconditional output, but "
                                  f"mid.teacher='{mid.teacher}' was never trained with a dropped label "
                                  f"({teacher_stage}.label_dropout=0, e.g. EDM2): set mid.guide to an unconditional "
                                  "(or smaller) network's export, or mid.cfg_scale=1")
            return None, False
        gcfg, gnet, gmeta = load_exported(mid.guide, "mid.guide")
        kind = model_kind(gcfg, gmeta.get("stage", "pre"))
        if kind != self.teacher_kind:
            raise ConfigError(f"mid.guide='{mid.guide}' is a '{kind}' model, the teacher a '{self.teacher_kind}' one: "
                              "the guide must compute the same kind of output")
        if (gcfg.data.channels, gcfg.data.resolution) != (tcfg.data.channels, tcfg.data.resolution):
            raise ConfigError(f"mid.guide='{mid.guide}' was trained on {gcfg.data.channels}x{gcfg.data.resolution}px "
                              f"data, the teacher on {tcfg.data.channels}x{tcfg.data.resolution}px: use a guide for "
                              "the same data")
        classes = gcfg.network.num_classes
        if classes not in (0, tcfg.network.num_classes):
            raise ConfigError(f"mid.guide='{mid.guide}' has network.num_classes={classes}, the teacher "
                              f"{tcfg.network.num_classes}: use an unconditional guide or one with the same classes")
        self.guide_dir = resolve_export_dir(mid.guide)
        return wrap_network(gnet, gcfg, kind).eval().requires_grad_(False), classes > 0

    def to(self, device: torch.device) -> "MidTraining":
        self.teacher.to(device)
        if self.guide is not None:
            self.guide.to(device)
        self.distance.to(device)
        return self

    def identity(self) -> dict[str, str]:
        return {"mid.teacher": file_identity(self.teacher_dir),
                **({"mid.guide": file_identity(self.guide_dir)} if self.guide is not None else {}),
                **({"mid.feature_net": file_identity(self.cfg.mid.feature_net)} if self.cfg.mid.feature_net else {})}

    def check_batch(self, micro_batch: int) -> None:
        if micro_batch % self.pairs_per_trajectory:
            raise ConfigError(
                f"a micro-batch of {micro_batch} pairs per rank is not a whole number of trajectories of "
                f"{self.pairs_per_trajectory} pairs (mid.form={self.form}, mid.method={self.method}, "
                f"mid.solver_steps={self.cfg.mid.solver_steps}): make train.batch_size / (ranks × "
                f"train.grad_accum) a multiple of {self.pairs_per_trajectory}")

    # -- teacher side ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: dict, generator: torch.Generator) -> TrajectoryPairs:
        """Roll the teacher out for this batch (B = number of pairs) and return the pairs.

        Draws only from ``generator``, never from the global RNG (the teacher is in eval mode), so a
        producer thread can run it while the student's dropout draws from the global RNG.
        """
        images, labels = batch["images"], batch.get("labels")
        B, shape, device = images.shape[0], tuple(images.shape[1:]), images.device
        mid, teacher = self.cfg.mid, self.counted_teacher
        T = trajectories_for_pairs(B, self.pairs_per_trajectory)
        common = dict(generator=generator, labels=None if labels is None else labels[:T])
        if self.form == "meanflow":
            return meanflow_pairs(teacher, T, shape, self.grid, mid.teacher_sampler,
                                  endpoints_only=self.method == "kd", device=device, **common)
        x0 = images[:T] if mid.data_start else None
        if self.method == "cmt":
            return consistency_pairs(teacher, T, shape, self.grid, mid.solver_order, x0=x0, device=device, **common)
        if self.method == "kd":
            return kd_pairs(teacher, B, shape, self.grid, mid.solver_order, x0=x0, device=device, **common)
        return slow_cmt_pairs(teacher, images, self.grid, mid.solver_order, generator=generator, labels=labels)

    # -- student side ---------------------------------------------------------------------------------
    def loss(self, model, pairs: TrajectoryPairs) -> torch.Tensor:
        """Student forward on the pairs and the unit-weight distance to the targets, mean over pairs.

        The ELatentLPIPS augmentation draws from the global RNG, which the trainer seeds per micro-step, so
        where the pairs were made does not change its draws.
        """
        self.counters["teacher_nfe"] += pairs.teacher_nfe
        self.counters["teacher_calls"] += pairs.teacher_calls
        self.counters["pairs"] += len(pairs)
        self.counters["trajectories"] += pairs.num_trajectories
        labels = pairs.labels if self.cfg.network.num_classes > 0 else None
        if self.form == "consistency":
            return self.distance(model(pairs.x, pairs.t, labels), pairs.target).mean()
        pred = model(pairs.x, pairs.r, pairs.t, labels)
        return self.distance(pred.float(), pairs.target.float()).mean()


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
    if mid.pipeline_depth < 1:
        raise ConfigError(f"mid.pipeline_depth={mid.pipeline_depth}: the producer must be allowed at least "
                          "one micro-batch ahead, set it to 1 or more")
    if mid.pipeline == "teacher_ranks" and mid.teacher_ranks < 1:
        raise ConfigError(f"mid.teacher_ranks={mid.teacher_ranks}: mid.pipeline=teacher_ranks needs 1 or more")


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
                          f"mid.cfg_scale={mid.cfg_scale} must match it (paper §3.3)")

