"""Post-training of the flow map (paper §2.2, Eq. 3 and 5; docs/method.md §6): ECT, ECD (one teacher ODE
step) and MeanFlow.

The stage owns the student ``model`` (a :class:`ConsistencyFunction` for ect/ecd, a :class:`MeanFlowModel`
for meanflow) and, for ECD, a frozen EDM teacher kept outside ``model`` (so DeepSpeed neither optimises
nor checkpoints it). ``prepare`` draws the times and noise (and takes ECD's teacher step); ``loss`` runs
the student, with the DeepSpeed engine wrapping ``model``. ``prepare`` runs in line (no pipeline).

Decisions worth knowing:

- **Same dropout mask for the ECT/ECD target.** The target ``sg f(x_r, r)`` is computed first, under
  ``no_grad``, inside :func:`_replayed_rng`, which restores the global RNG state (CPU, and the device's on
  CUDA) on exit; the student forward ``f(x_t, t)`` then draws exactly the random numbers the target drew.
  Both forwards run the same module on same-shaped inputs, so every dropout layer gets the same mask, and
  the RNG leaves the step as if only one forward had run (the trainer's per-step reseed stays the only
  source of randomness).
- **Boundary.** f is defined for σ ≥ σ_min (f(x, σ_min) = x). Where r ≤ σ_min the target is x_r itself,
  i.e. the boundary condition extended below σ_min: for ECT at r = 0 that is exactly x_0 (docs/method.md §6); for
  0 < r ≤ σ_min it is x_0 + r·ε rather than x_0, because with the 1/(t − r) weight a target of x_0 there
  would add ‖t·ε‖/(t − r) ≈ q/5·‖ε‖ (t ≈ σ_min, t − r ≈ 5t/q) to the loss. For ECD the teacher steps to
  max(r, σ_min) (solvers cannot mix σ = 0 with σ > 0 in one grid row, and the target there is again the
  state itself). The weight always uses the sampled r, so t − r > 0.
- **MeanFlow jvp through DeepSpeed.** ``torch.func.jvp`` is applied to the model passed in: the engine
  under ZeRO 0/1/2 (its forward is the module's forward plus host-side bookkeeping, which functorch traces
  through; the stage's tests check u and du/dt against the plain module and a DeepSpeed step), and under
  ZeRO-3 a functional call on gathered parameters (engine/trainer/student.py, tests/trainer/test_zero.py). The
  loss backpropagates through the jvp's primal output u; du/dt only enters the stop-gradient target.
  Dropout inside the jvp is one forward, so u and du/dt share its mask.
- **Initialisation** (post.init=mid/teacher) is engine.models.weights' load_exported + transfer_weights, shared with
  mid-training: strict, except a MeanFlow student from a flow-matching teacher (use_r=False → use_r=True),
  which starts as exactly the teacher (u(z, r, t) = v(z, t) for every r; the r-embedding's keys are left
  at init, listed in ``init_report["left_at_init"]`` and printed to stderr). This stage only adds which
  source kinds each method accepts (``_COMPATIBLE_SOURCES``).

``counters`` count batched network calls as they happen (each call covers the whole micro-batch; multiply
by ``counters["samples"] / calls`` for per-image figures): ``teacher_nfe`` (ECD teacher denoiser calls),
``student_fwd_grad`` / ``student_fwd_nograd`` (plain student forwards with / without autograd),
``jvp`` (MeanFlow ``torch.func.jvp`` calls, each one forward plus its tangent; not counted as forwards).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from engine.config import Config
from engine.errors import ConfigError, UnsupportedError
from engine.formulas.broadcast import expand_like
from engine.formulas.edm import ect_r_schedule, sample_edm_sigma
from engine.formulas.flow import fm_interpolate, fm_velocity_target, sample_meanflow_times
from engine.formulas.guidance import drop_labels, guided
from engine.losses.distances import build_distance
from engine.models.factory import build_raw_network, model_kind, wrap_network
from engine.files import file_identity
from engine.models.weights import load_exported, resolve_export_dir, transfer_weights
from engine.sampling.solvers import edm_euler, edm_heun
from engine.stages.base import PairCost, Stage, check_label_dropout

# Which source parameterisations each student can start from (by the exporting stage's model_kind).
_COMPATIBLE_SOURCES = {"consistency": ("edm", "consistency"), "meanflow": ("flow", "meanflow")}


def post_distance(cfg: Config) -> str:
    """The distance of ``post.loss``: ``l2`` is ECT's unsquared ‖·‖₂ per sample (docs/method.md §6),
    ``l2_squared`` its square ‖·‖₂², the others engine.losses' perceptual distances (also squared)."""
    return {"l2": "l2_norm", "l2_squared": "sum_squared"}.get(cfg.post.loss, cfg.post.loss)


@dataclass
class PostInputs:
    """One micro-batch with its draws: data, noise, t and r (both [B]) and labels; for ECT/ECD also x_t, x_r
    and the step's generator, which a perceptual distance's augmentation draws from after the noise."""
    x0: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    r: torch.Tensor
    labels: Optional[torch.Tensor] = None
    x_t: Optional[torch.Tensor] = None
    x_r: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None


@contextlib.contextmanager
def _replayed_rng(device: torch.device):
    """Run a block, then put the global RNG back as it was before it: the next block sees the same numbers."""
    cpu_state = torch.get_rng_state()
    dev_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if dev_state is not None:
            torch.cuda.set_rng_state(dev_state, device)


class PostTraining(Stage):
    name = "post"
    prepared_type = PostInputs

    def __init__(self, cfg: Config):
        self.cfg = cfg
        p = cfg.post
        self.method = p.method
        self.uses_jvp = "post.method=meanflow" if self.method == "meanflow" else None
        self.guided = p.cfg_scale != 1.0 or p.cfg_kappa > 0
        if self.guided and self.method != "meanflow":
            raise UnsupportedError(f"post.cfg_scale={p.cfg_scale}, post.cfg_kappa={p.cfg_kappa}: guidance is "
                                   "trained in only for post.method=meanflow (ECT/ECD are unguided, docs/method.md "
                                   "§4); use post.cfg_scale=1.0 and post.cfg_kappa=0")
        if self.method != "meanflow" and p.label_dropout:
            raise ConfigError(f"post.label_dropout={p.label_dropout} applies to post.method=meanflow only")
        if self.method == "meanflow":
            check_label_dropout(p.label_dropout, cfg.network.num_classes, "post.label_dropout")
            if self.guided and cfg.network.num_classes == 0:
                raise ConfigError(f"post.cfg_scale={p.cfg_scale}, post.cfg_kappa={p.cfg_kappa}: guidance needs a "
                                  "class-conditional network: set network.num_classes, or post.cfg_scale=1 and "
                                  "post.cfg_kappa=0")
            if not cfg.network.use_r:
                raise ConfigError("post.method=meanflow trains u(z, r, t), which needs a second time input: "
                                  "set network.use_r=true")
            if p.loss != "l2":
                raise ConfigError(f"post.loss={p.loss} does not apply to post.method=meanflow (its loss is the "
                                  "adaptive squared L2 of docs/method.md §6): set post.loss=l2")
        net = build_raw_network(cfg)
        self.init_report = self._initialise(net)
        self.model = wrap_network(net, cfg, model_kind(cfg, "post"))
        self.teacher = self._load_teacher() if self.method == "ecd" else None
        self.teacher_labels = bool(self.teacher is not None and self.teacher_cfg.network.num_classes)
        self.distance = None if self.method == "meanflow" else build_distance(
            post_distance(cfg), channels=cfg.data.channels, resolution=cfg.data.resolution,
            feature_net=p.feature_net, config_key="post.feature_net")
        self.counters = {"teacher_nfe": 0, "student_fwd_grad": 0, "student_fwd_nograd": 0, "jvp": 0, "samples": 0}

    @staticmethod
    def cost_per_pair(cfg: Config) -> PairCost:
        """Per image: ECT one student forward with and one without grad; ECD adds its teacher step (Euler 1,
        Heun 2 NFEs); MeanFlow's jvp counts as two forwards, plus one no-grad forward under guidance (two with κ > 0)."""
        p = cfg.post
        if p.method == "meanflow":
            guided_forwards = (1.0 + (p.cfg_kappa > 0)) if p.cfg_scale != 1.0 or p.cfg_kappa > 0 else 0.0
            return PairCost(teacher_nfe=0.0, student_grad=2.0, student_nograd=guided_forwards,
                            distance="mean_squared", jvp=1.0)
        nfe = 0.0 if p.method == "ect" else (1.0 if p.ecd_solver == "euler" else 2.0)
        return PairCost(teacher_nfe=nfe, student_grad=1.0, student_nograd=1.0, distance=post_distance(cfg))

    def identity(self) -> dict[str, str]:
        p = self.cfg.post
        out = {"post.teacher": file_identity(resolve_export_dir(p.teacher))} if self.method == "ecd" else {}
        if p.feature_net and self.method != "meanflow":
            out["post.feature_net"] = file_identity(p.feature_net)
        return out

    def to(self, device: torch.device) -> "PostTraining":
        if self.teacher is not None:
            self.teacher.to(device)
        if self.distance is not None:
            self.distance.to(device)
        return self

    # -- construction ---------------------------------------------------------------------------------
    def _initialise(self, net: torch.nn.Module) -> dict:
        p = self.cfg.post
        if p.init == "random":
            return {"init": "random", "left_at_init": []}
        what = "mid-training run" if p.init == "mid" else "pre-trained teacher"
        if not p.init_from:
            raise ConfigError(f"post.init={p.init} needs post.init_from: the run dir of the {what} "
                              "(or set post.init=random)")
        src_cfg, src_net, meta = load_exported(p.init_from, "post.init_from")
        student_kind = model_kind(self.cfg, "post")
        stage = meta.get("stage")
        expected = ("mid", "post") if p.init == "mid" else ("pre",)
        if stage is not None and stage not in expected:
            raise ConfigError(f"post.init={p.init} starts from a {what}, but post.init_from='{p.init_from}' holds a "
                              f"{stage}-stage export: point post.init_from at the {what}'s run dir, or set "
                              f"post.init={'teacher' if stage == 'pre' else 'mid'}")
        src_kind = model_kind(src_cfg, stage) if stage in ("pre", "mid", "post") else None
        if src_kind is not None and src_kind not in _COMPATIBLE_SOURCES[student_kind]:
            raise ConfigError(f"post.init_from='{p.init_from}' holds a '{src_kind}' network ({stage} stage) but "
                              f"post.method={self.method} needs one of {list(_COMPATIBLE_SOURCES[student_kind])}")
        report = transfer_weights(net, self.cfg, src_cfg, src_net, config_key="post.init_from", path=p.init_from,
                                  hint="or set post.init=random")
        return {"init": p.init, "source_kind": src_kind, **report}

    def _load_teacher(self) -> torch.nn.Module:
        p = self.cfg.post
        if not p.teacher:
            raise ConfigError("post.method=ecd needs post.teacher: the run dir of the pre-trained EDM teacher")
        tcfg, tnet, meta = load_exported(p.teacher, "post.teacher")
        if tcfg.model.kind != "edm" or meta.get("stage", "pre") != "pre":
            raise ConfigError(f"post.teacher='{p.teacher}' is not an EDM teacher (model.kind={tcfg.model.kind}, "
                              f"stage {meta.get('stage')}): ECD steps the PF-ODE of a pre-trained EDM denoiser")
        for key in ("resolution", "channels"):
            if getattr(tcfg.data, key) != getattr(self.cfg.data, key):
                raise ConfigError(f"post.teacher='{p.teacher}' has data.{key}={getattr(tcfg.data, key)}, "
                                  f"this run {getattr(self.cfg.data, key)}")
        self.teacher_cfg = tcfg
        teacher = wrap_network(tnet, tcfg, "edm").float().eval()
        teacher.requires_grad_(False)
        return teacher

    # -- the loss -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: dict, generator: torch.Generator) -> "PostInputs":
        """The step's draws: (r, t), the noise and dropped labels for MeanFlow; t, r = r(t), x_t and x_r (ECT:
        the same noise; ECD: the teacher's step from x_t) for the consistency methods."""
        x0 = batch["images"]
        labels = batch.get("labels")
        if self.method == "meanflow":
            p = self.cfg.post
            r, t = sample_meanflow_times(x0.shape[0], p.mf_P_mean, p.mf_P_std, p.mf_equal_fraction,
                                         generator=generator, device=x0.device)
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            labels = drop_labels(labels, p.label_dropout, self.cfg.network.num_classes, generator)
            return PostInputs(x0, eps, t, r, labels)
        t, r = self.sample_times(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = x0 + expand_like(t, x0) * eps
        x_r = x0 + expand_like(r, x0) * eps if self.method == "ect" else self.teacher_step(x_t, t, r, labels)
        return PostInputs(x0, eps, t, r, labels, x_t=x_t, x_r=x_r, generator=generator)

    def loss(self, model, inputs: "PostInputs") -> torch.Tensor:
        self.counters["samples"] += inputs.x0.shape[0]
        if self.method == "meanflow":
            return self.meanflow_loss(model, inputs.x0, inputs.eps, inputs.r, inputs.t, inputs.labels).mean()
        return self.consistency_loss(model, inputs.x_t, inputs.t, inputs.x_r, inputs.r, inputs.labels,
                                     inputs.generator).mean()

    def sample_times(self, batch: int, generator=None, device=None):
        """(t, r): ln t ~ N(P_mean, P_std²), clamped to [σ_min, σ_max] unless post.clamp_t=false (the
        authors'), r = ect_r_schedule(t)."""
        p, m = self.cfg.post, self.cfg.model
        t = sample_edm_sigma(batch, p.P_mean, p.P_std, generator=generator, device=device)
        if p.clamp_t:
            t = t.clamp(m.sigma_min, m.sigma_max)
        return t, ect_r_schedule(t, p.q, p.k, p.b)

    @torch.no_grad()
    def teacher_step(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, labels=None) -> torch.Tensor:
        """ECD's x_r: one Euler/Heun step of the frozen teacher's PF-ODE from t to max(r, σ_min) (per sample)."""
        tl = labels if self.teacher_labels else None

        def denoise(x, sigma):
            self.counters["teacher_nfe"] += 1
            return self.teacher(x.float(), sigma, tl)

        grid = torch.stack([t, r.clamp(min=self.cfg.model.sigma_min)]).to(torch.float64)
        solver = edm_heun if self.cfg.post.ecd_solver == "heun" else edm_euler
        return solver(denoise, x_t, grid)[-1]

    def consistency_loss(self, model, x_t, t, x_r, r, labels=None, generator=None) -> torch.Tensor:
        """Per-sample d(f(x_t, t), sg f(x_r, r)) / (t − r), the target sharing the student's dropout mask.

        Where r ≤ σ_min the target is x_r (the boundary condition; x_0 when r = 0), see the module doc.
        ``generator`` feeds a perceptual distance's augmentation (ELatentLPIPS), if any.
        """
        sigma_min = self.cfg.model.sigma_min
        boundary = r <= sigma_min
        target = x_r
        if not bool(boundary.all()):
            with _replayed_rng(x_t.device), torch.no_grad():
                target = model(x_r, r.clamp(min=sigma_min), labels)
                self.counters["student_fwd_nograd"] += 1
            target = torch.where(expand_like(boundary, x_r), x_r, target.to(x_r.dtype))
        out = model(x_t, t, labels)
        self.counters["student_fwd_grad"] += 1
        d = self.distance(out, target.detach(), generator)
        return d / (t - r).to(d.dtype)

    def meanflow_jvp(self, model, z_t, v, r, t, labels=None):
        """(u, du/dt) with du/dt = ∂u/∂z·v + ∂u/∂t, one ``torch.func.jvp`` along (v, 0, 1)."""
        self.counters["jvp"] += 1
        return torch.func.jvp(lambda z, r_, t_: model(z, r_, t_, labels), (z_t, r, t),
                              (v, torch.zeros_like(r), torch.ones_like(t)))

    def meanflow_target(self, dudt, v, r, t) -> torch.Tensor:
        """u_tgt = sg(v − (t − r)·du/dt): the MeanFlow identity u = v − (t − r)·du/dt."""
        return (v - expand_like(t - r, v).to(dudt.dtype) * dudt).detach()

    def guided_velocity(self, model, z_t, v, t, labels) -> torch.Tensor:
        """MeanFlow's guided field (its Eq. 13): ṽ = ω·v + κ·sg u(z_t, t, t | c) + (1 − ω − κ)·sg u(z_t, t, t | ∅).

        The network's own instantaneous velocities stand in for the teacher's, so u learns the guided flow
        and is sampled as is; κ = 0 needs only the unconditional one. Samples whose label was dropped keep
        ṽ = v.
        """
        p, null = self.cfg.post, self.cfg.network.num_classes
        nulls = torch.full_like(labels, null)
        with torch.no_grad():
            if p.cfg_kappa > 0:     # both velocities in one batched call (counted as the two forwards it is)
                both = model(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([labels, nulls]))
                cond, uncond = both.to(v.dtype).chunk(2)
                self.counters["student_fwd_nograd"] += 2
            else:
                uncond = model(z_t, t, t, nulls).to(v.dtype)
                self.counters["student_fwd_nograd"] += 1
        if p.cfg_kappa > 0:
            out = p.cfg_scale * v + p.cfg_kappa * cond + (1 - p.cfg_scale - p.cfg_kappa) * uncond
        else:
            out = guided(v, uncond, p.cfg_scale)
        return torch.where(expand_like(labels == null, v), v, out)

    def meanflow_loss(self, model, x0, eps, r, t, labels=None) -> torch.Tensor:
        """Per-sample sg(w)·‖u − u_tgt‖², w = 1/(‖u − u_tgt‖² + c)^p (MeanFlow's adaptive loss, docs/method.md §6)."""
        p = self.cfg.post
        z_t, v = fm_interpolate(x0, eps, t), fm_velocity_target(x0, eps)
        if self.guided and labels is not None:
            v = self.guided_velocity(model, z_t, v, t, labels)
        u, dudt = self.meanflow_jvp(model, z_t, v, r, t, labels)
        err = (u - self.meanflow_target(dudt, v, r, t)).flatten(1).square().sum(dim=1)
        w = 1.0 / (err.detach() + p.mf_adaptive_c) ** p.mf_adaptive_p
        return w * err
