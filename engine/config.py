"""One typed config tree, loaded from YAML once at the entry point and passed down.

Every section is a dataclass; `load_config` maps YAML (plus `--set a.b=value` overrides) onto it and
rejects unknown keys, wrong types and values outside a `Literal` with a one-line message that names the
key and the valid choices, so a typo never silently falls back to a default.

Fields built with :func:`setting` carry their valid range (``min``, ``above``, ``below``, ...), checked
when the tree is built; every float must be finite. A field (or a whole section) marked
``resume=True`` (or built with :func:`may_change_on_resume`) may differ when a run dir is resumed: it
changes how or how long a run goes, not what it computes. Every other field is the recipe, and the
trainer refuses to resume a run dir under a different one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from engine.errors import ConfigError
from engine.files import write_text_atomically

_RESUME = "may_change_on_resume"
_RANGE = "valid_range"


@dataclass(frozen=True)
class _Range:
    """Bounds of a number (of each element, for a list): min/max inclusive, above/below exclusive."""
    min: Optional[float] = None
    max: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    length: Optional[int] = None      # a list of exactly this many
    nonempty: bool = False            # a list with at least one element

    def problem(self, value) -> Optional[str]:
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                return f"must be a list of {self.length} numbers"
            if self.nonempty and not value:
                return "must not be empty"
            return next((p for p in map(self._number, value) if p), None)
        return None if value is None else self._number(value)

    def _number(self, v) -> Optional[str]:
        if self.min is not None and v < self.min:
            return f"must be at least {self.min:g}"
        if self.max is not None and v > self.max:
            return f"must be at most {self.max:g}"
        if self.above is not None and v <= self.above:
            return f"must be greater than {self.above:g}"
        if self.below is not None and v >= self.below:
            return f"must be less than {self.below:g}"
        return None


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            resume: bool = False, **bounds):
    """A config field with its valid range (see :class:`_Range`); ``resume``: it may change on resume."""
    metadata = {_RANGE: _Range(**bounds)} if bounds else {}
    if resume:
        metadata[_RESUME] = True
    return field(default=default, default_factory=default_factory, metadata=metadata)


def may_change_on_resume(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that may differ between a run dir's saved config and the config resuming it."""
    return setting(default, default_factory=default_factory, resume=True)


def changeable_on_resume(cls: type = None, prefix: str = "") -> set[str]:
    """Dotted names of the fields and sections marked with :func:`may_change_on_resume`."""
    cls = cls or Config
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if f.metadata.get(_RESUME):
            out.add(name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out |= changeable_on_resume(hints[f.name], name + ".")
    return out


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    source: Literal["digits", "folder", "zip", "npy"] = "digits"
    path: Optional[str] = None          # folder / zip / .npy file for user data
    labels_path: Optional[str] = None   # optional .npy of integer labels (npy source)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    resolution: int = setting(16, min=1)
    channels: int = setting(1, min=1)
    xflip: bool = False
    # dali: NVIDIA DALI decodes each batch (pip install -e '.[dali]'); both loaders give the same batches
    loader: Literal["torch", "dali"] = may_change_on_resume("torch")
    on_corrupt: Literal["fail", "skip"] = "fail"  # skip: an unreadable file stands in for the next readable one


@dataclass
class UNetConfig:
    channels: list[int] = setting(default_factory=lambda: [16, 32, 64], min=1, nonempty=True)
    num_blocks: int = setting(2, min=1)
    attn_resolutions: list[int] = setting(default_factory=lambda: [4], min=1)


@dataclass
class DiTConfig:
    patch_size: int = setting(2, min=1)
    hidden_size: int = setting(128, min=1)
    depth: int = setting(4, min=1)
    num_heads: int = setting(4, min=1)
    mlp_ratio: float = setting(4.0, above=0)
    learn_sigma: bool = False     # the released DiT/SiT: a second output half (a variance), unused here


@dataclass
class EDM2Config:
    """The EDM2 magnitude-preserving U-Net (engine/models/edm2.py): a published size preset, or
    model_channels for a custom width (set exactly one of the two)."""
    size: Optional[Literal["xs", "s", "m", "l", "xl", "xxl"]] = None   # 128/192/256/320/384/448 channels
    model_channels: Optional[int] = setting(None, min=1)
    channel_mult: list[int] = setting(default_factory=lambda: [1, 2, 3, 4], min=1, nonempty=True)
    num_blocks: int = setting(3, min=1)
    attn_resolutions: list[int] = setting(default_factory=lambda: [16, 8], min=1)
    channels_per_head: int = setting(64, min=1)


@dataclass
class SongUNetConfig:
    """EDM's SongUNet (engine/models/song_unet.py): DDPM++ (positional, standard, resample [1, 1]) or NCSN++
    (fourier, residual, resample [1, 3, 3, 1], channel_mult_noise 2), as the released EDM networks. The
    defaults are the original constructor's (configs/teachers/ holds each released network's settings)."""
    model_channels: int = setting(128, min=1)
    channel_mult: list[int] = setting(default_factory=lambda: [1, 2, 2, 2], min=1, nonempty=True)
    channel_mult_emb: int = setting(4, min=1)
    num_blocks: int = setting(4, min=1)
    attn_resolutions: list[int] = setting(default_factory=lambda: [16], min=1)
    augment_dim: int = setting(0, min=0)     # 9 in the released networks trained with augmentation
    embedding_type: Literal["positional", "fourier"] = "positional"
    channel_mult_noise: int = setting(1, min=1)
    encoder_type: Literal["standard", "residual"] = "standard"   # the original's "skip" variants: not built
    decoder_type: Literal["standard"] = "standard"
    resample_filter: list[int] = setting(default_factory=lambda: [1, 1], min=1, nonempty=True)


@dataclass
class ADMConfig:
    """ADM (Dhariwal & Nichol 2021) as EDM trained it on ImageNet-64 (engine/models/adm.py)."""
    model_channels: int = setting(192, min=1)
    channel_mult: list[int] = setting(default_factory=lambda: [1, 2, 3, 4], min=1, nonempty=True)
    channel_mult_emb: int = setting(4, min=1)
    num_blocks: int = setting(3, min=1)
    attn_resolutions: list[int] = setting(default_factory=lambda: [32, 16, 8], min=1)
    augment_dim: int = setting(0, min=0)     # 0 in the released network (trained without augmentation)


@dataclass
class NetworkConfig:
    # unet: the small U-Net of the embedded demo; songunet / adm / edm2 / dit: the published architectures, key
    # for key (their released weights import with cmt-import-weights; docs/teachers.md)
    arch: Literal["unet", "dit", "edm2", "songunet", "adm"] = "unet"
    dropout: float = setting(0.0, min=0, below=1)
    num_classes: int = setting(0, min=0)
    use_r: bool = False   # second time input, for MeanFlow's u(z, r, t)
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    edm2: EDM2Config = field(default_factory=EDM2Config)
    songunet: SongUNetConfig = field(default_factory=SongUNetConfig)
    adm: ADMConfig = field(default_factory=ADMConfig)


@dataclass
class ModelConfig:
    """The parameterisation wrapped around the raw network (docs/method.md §2, §5)."""
    kind: Literal["edm", "flow"] = "edm"
    # How the raw network's time and output relate to the engine's (docs/teachers.md): native = EDM's
    # preconditioning (edm) or v = ε − x at t (flow); ddpm_eps = DiT: ε on the discrete 1000-step VP schedule,
    # turned into an EDM denoiser; sit_velocity = SiT: x − ε at time 1 − t (t = 0 noise), turned into v.
    convention: Literal["native", "ddpm_eps", "sit_velocity"] = "native"
    sigma_data: float = setting(0.5, above=0)
    sigma_min: float = setting(0.002, above=0)
    sigma_max: float = setting(80.0, above=0)
    # A consistency student's c_skip/c_out (docs/deviations.md): boundary = the σ_min boundary-condition form
    # in training and sampling (the engine's default); edm = EDM's plain coefficients while training, the
    # boundary form at evaluation (the authors' preconditioner), with eval_sigma_min (None: sigma_min).
    train_coeffs: Literal["boundary", "edm"] = "boundary"
    eval_sigma_min: Optional[float] = setting(None, above=0)


@dataclass
class PreConfig:
    """Pre-training losses: EDM denoising (model.kind=edm) or flow matching (model.kind=flow)."""
    P_mean: float = -1.2          # ln sigma ~ N(P_mean, P_std^2)   (EDM)
    P_std: float = setting(1.2, above=0)
    t_mean: float = 0.0           # t ~ logit-normal(t_mean, t_std) (flow matching)
    t_std: float = setting(1.0, above=0)
    # share of labels replaced by the null class: trains the unconditional model that classifier-free
    # guidance needs (class-conditional nets only)
    label_dropout: float = setting(0.0, min=0, below=1)


@dataclass
class MidConfig:
    """CMT mid-training (paper §3.2 consistency form, §3.3 MeanFlow form) and its ablation baselines."""
    form: Literal["consistency", "meanflow"] = "consistency"
    method: Literal["cmt", "kd", "slow_cmt"] = "cmt"   # kd: only (x_T -> end); slow_cmt: one solve per pair
    teacher: Optional[str] = None        # run dir (or export dir) of the pre-trained teacher; required
    init: Literal["teacher", "random"] = "teacher"      # the student's starting weights
    teacher_sampler: Literal["dpm_solver_pp", "fm_euler", "fm_heun", "meanflow"] = "dpm_solver_pp"
    solver_steps: int = setting(16, min=1)   # N steps. consistency: DPM-Solver++ on the lambda-uniform grid;
                                         # meanflow: the authors' "8 steps, 28 pairs" is 8 time points = 7 here
    solver_order: Literal[1, 2, 3] = 3
    data_start: bool = False             # x_T = x_0 + sigma_max*eps (authors' code) instead of sigma_max*eps
    loss: Literal["l2", "feature", "lpips", "elatentlpips"] = "l2"
    # l2 (and the MeanFlow form's squared error): the mean over a sample's elements, or their sum (the
    # authors' code: C·H·W times larger)
    l2_reduction: Literal["mean", "sum"] = "mean"
    feature_net: Optional[str] = None    # weights of the perceptual network for lpips / elatentlpips
    cfg_scale: float = setting(1.0, min=0)   # must match across the three stages (docs/method.md §5)
    # Run or export dir of a guide network for cfg_scale != 1 with a teacher never trained with a dropped label
    # (EDM2): uncond + scale·(cond − uncond) with the guide's output as uncond (docs/teachers.md)
    guide: Optional[str] = None
    # Where the pairs are made, not which (the same pairs and losses either way): serial = in line; thread =
    # ahead of the student in a background thread; teacher_ranks = on mid.teacher_ranks dedicated ranks
    # (docs/scale-out.md). Not "off": YAML reads a bare off as false.
    pipeline: Literal["serial", "thread", "teacher_ranks"] = may_change_on_resume("serial")
    pipeline_depth: int = setting(2, min=1, resume=True)   # micro-batches of pairs the producer may hold ready
    teacher_ranks: int = setting(1, min=1, resume=True)    # mid.pipeline=teacher_ranks: how many of the
                                                           # launched ranks only roll the teacher out
    # A pipelined producer (thread or teacher ranks) that delivers nothing for this long stops training
    producer_timeout_s: float = setting(1800.0, above=0, resume=True)


@dataclass
class PostConfig:
    """Post-training of the flow map (paper §2.2, docs/method.md §6): ECT, ECD (teacher ODE step) or MeanFlow."""
    method: Literal["ect", "ecd", "meanflow"] = "ect"
    init: Literal["mid", "teacher", "random"] = "mid"
    init_from: Optional[str] = None      # run dir of the mid-training run (init=mid) or the teacher (init=teacher)
    teacher: Optional[str] = None        # ECD's teacher run dir
    ecd_solver: Literal["euler", "heun"] = "heun"
    P_mean: float = -1.1                 # ECT/ECD: ln t ~ N(P_mean, P_std^2)
    P_std: float = setting(2.0, above=0)
    q: float = setting(4096.0, above=0)  # ECT's fixed q (CIFAR-10 4096, AFHQ 1024, FFHQ 512)
    k: float = setting(8.0, min=0)
    b: float = setting(1.0, min=0)
    # ECT/ECD: d(f(x_t), sg f(x_r)) / (t - r). l2: ECT's unsquared norm, the authors'; l2_squared (the sum of
    # squares) and the perceptual ones are squared distances, which that weight makes vanish with t - r
    loss: Literal["l2", "l2_squared", "feature", "lpips", "elatentlpips"] = "l2"
    feature_net: Optional[str] = None
    mf_P_mean: float = -0.4              # MeanFlow: (r, t) logit-normal, sorted
    mf_P_std: float = setting(1.0, above=0)
    mf_equal_fraction: float = setting(0.75, min=0, max=1)   # share of samples with r = t
    mf_adaptive_p: float = setting(1.0, min=0)     # adaptive weight 1 / (||u - u_tgt||^2 + c)^p
    mf_adaptive_c: float = setting(1.0e-3, above=0)   # the MeanFlow paper's c; its official code uses 0.01
    cfg_scale: float = setting(1.0, min=0)   # MeanFlow: guidance ω trained into u (MeanFlow Eq. 13); ECT/ECD: 1
    cfg_kappa: float = setting(0.0, min=0, below=1)   # MeanFlow Eq. 13's κ: weight of the conditional u in ṽ
    clamp_t: bool = True                 # ECT/ECD: clamp t to [σ_min, σ_max] (the authors do not)
    # MeanFlow: share of labels dropped to the null class (their target stays v)
    label_dropout: float = setting(0.0, min=0, below=1)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "radam"] = "adam"
    lr: float = setting(2e-3, above=0)
    betas: list[float] = setting(default_factory=lambda: [0.9, 0.999], min=0, below=1, length=2)
    eps: float = setting(1e-8, above=0)
    weight_decay: float = setting(0.0, min=0)
    schedule: Literal["constant", "linear"] = "constant"   # linear: decays to 0 at train.total_kimg
    warmup_kimg: float = setting(0.0, min=0)
    grad_clip: float = setting(0.0, min=0)   # 0 disables clipping


@dataclass
class TrainConfig:
    batch_size: int = setting(128, min=1)   # global batch, in images (pairs for mid-training)
    total_kimg: float = setting(200.0, above=0, resume=True)   # progress is counted in images, as in EDM
    seed: int = setting(0, min=0, below=2**63)
    ema_beta: float = setting(0.999, min=0, max=1)
    ema_warmup: bool = True       # beta_t = min(beta, (1+s)/(10+s)): without it EMA lags at small step counts
    checkpoint_every_kimg: float = setting(25.0, above=0, resume=True)
    keep_checkpoints: int = setting(2, min=1, resume=True)
    log_every_kimg: float = setting(2.0, above=0, resume=True)
    # also export the EMA net to snapshots/kimg-XXXXXX.XXX/ this often; 0 = off
    snapshot_every_kimg: float = setting(0.0, min=0, resume=True)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum: int = setting(1, min=1)
    deepspeed_config: Optional[str] = None   # a JSON file; overrides zero_stage / precision / grad_accum
    progress: bool = may_change_on_resume(True)
    # score the EMA network every this many kimg with eval.* (log.jsonl "eval" rows, TensorBoard); 0 = off
    eval_every_kimg: float = setting(0.0, min=0, resume=True)
    tensorboard: bool = may_change_on_resume(True)   # TensorBoard scalars in RUN/tensorboard beside log.jsonl
    # before_step: every optimizer step checks, before the update is applied, that the step's inputs, loss
    # and gradients are finite (one host sync per step); deferred: only at log rows, snapshots and
    # checkpoints (no per-step sync). Either way no checkpoint or export holds a non-finite step.
    nan_check: Literal["before_step", "deferred"] = may_change_on_resume("before_step")


@dataclass
class SampleConfig:
    solver: Literal["dpm_solver_pp", "heun", "euler"] = "dpm_solver_pp"
    steps: int = setting(16, min=1)
    order: Literal[1, 2, 3] = 3
    num_images: int = setting(100, min=1)   # grid size: a square number looks best
    t_mid: float = setting(0.77569, above=0)   # consistency 2-step sampling: re-noise to this σ (t_7 of the
                                               # λ-uniform N=16 grid; the authors' ECT post-training: 0.821)
    # the re-noise std at level τ: tau (ECT's and the authors' code) or sqrt(τ² − σ_min²) (the engine's default)
    renoise_std: Literal["tau", "sqrt_tau2_minus_sigma_min2"] = "sqrt_tau2_minus_sigma_min2"
    batch_size: int = setting(250, min=1)


@dataclass
class EvalConfig:
    """Scoring (docs/evaluation.md): cmt-evaluate's defaults, and the scores written into the log every
    train.eval_every_kimg. fd_digits_cnn needs no files (the embedded digits only); fid and fd_dinov2 need
    the detector's weights and a reference statistics file."""
    num: int = setting(1000, min=2)        # images scored during training (cmt-evaluate: --num-images, default 50,000)
    batch_size: int = setting(250, min=1)
    seed: int = setting(12345, min=0)      # the digits report's noise seed (the protocol uses seeds 0..num-1)
    metrics: list[Literal["fd_digits_cnn", "fid", "fd_dinov2"]] = setting(
        default_factory=lambda: ["fd_digits_cnn"], nonempty=True)
    ref: Optional[str] = None              # reference statistics: EDM .npz, EDM2 refs .pkl, ADM .npz
    inception: Optional[str] = None        # Inception-v3 weights for fid (pytorch-fid's .pth)
    dinov2: Optional[str] = None           # DINOv2 ViT-L/14 weights for fd_dinov2
    vae: Optional[str] = None              # latent runs: the SD-VAE (diffusers dir) that decodes the samples


@dataclass
class KernelsConfig:
    """Which implementation each fused op uses (kernels.dispatch): auto = the fast path on CUDA when
    available, the PyTorch reference otherwise. Forcing a fast path that cannot run is an error."""
    dpm_solver_step: Literal["auto", "triton", "torch"] = "auto"
    attention: Literal["auto", "triton", "torch"] = "auto"
    feature_distance: Literal["auto", "cuda", "cpp", "torch"] = "auto"


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    pre: PreConfig = field(default_factory=PreConfig)
    mid: MidConfig = field(default_factory=MidConfig)
    post: PostConfig = field(default_factory=PostConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = may_change_on_resume(default_factory=SampleConfig)
    eval: EvalConfig = may_change_on_resume(default_factory=EvalConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


# --------------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply `a.b=value` overrides, validate, return Config."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return from_dict(Config, raw)


def _read_yaml(path: Path, seen: tuple = ()) -> dict[str, Any]:
    """A YAML mapping; a top-level `base: other.yaml` (relative to this file), or a list of them merged in order,
    is read first and merged under it."""
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory: pass --config a YAML file, e.g. configs/digits.yaml")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass --config with a YAML file from configs/")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(raw).__name__}")
    bases = raw.pop("base", None)
    merged: dict[str, Any] = {}
    for base in [] if bases is None else bases if isinstance(bases, list) else [bases]:
        merged = _merge(merged, _read_yaml(path.parent / str(base), (*seen, path.resolve())))
    return _merge(merged, raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override to a raw dict; the value is parsed as YAML (so 1e-3, true, [1,2])."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.batch_size=64")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from `raw`, checking every key and type against the annotations."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where}' must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}': {hint}valid keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get(_RANGE)
        problem = bounds and f.name in kwargs and bounds.problem(kwargs[f.name])
        if problem:
            raise ConfigError(f"config key '{prefix}{f.name}' is {kwargs[f.name]!r}; it {problem}")
    out = cls(**kwargs)
    if cls is Config:
        _check_across_sections(out)
    return out


def _check_across_sections(cfg: "Config") -> None:
    """Rules that tie two fields together (each field's own range is checked where it is built)."""
    m = cfg.model
    if not m.sigma_min < m.sigma_max:
        raise ConfigError(f"model.sigma_min={m.sigma_min:g} must be below model.sigma_max={m.sigma_max:g}")
    if not m.sigma_min < cfg.sample.t_mid < m.sigma_max:
        raise ConfigError(f"sample.t_mid={cfg.sample.t_mid:g} (where 2-step sampling re-noises to) must lie between "
                          f"model.sigma_min={m.sigma_min:g} and model.sigma_max={m.sigma_max:g}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is Literal:
        if value not in args or type(value) is not type(args[args.index(value)]):
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, e.g. [1, 2], got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{key}' must be a whole number, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):   # YAML reads '1e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"config field '{key}' has an unsupported annotation {tp!r}")  # a bug in this file


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomically(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Keys earlier versions of the engine wrote into run dirs and exports, and what they are called now.
RENAMED_KEYS = {("eval", "num_samples"): ("eval", "num")}


def read_saved_config(path: str | Path) -> Config:
    """A config.yaml this engine wrote (a run dir's or an export's), validated like any other; keys an
    earlier version wrote under another name (RENAMED_KEYS) are read under their new one."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"'{path}' is not valid YAML ({str(exc).splitlines()[0]}): restore it or use a "
                          "new --run-dir") from None
    raw = raw or {}
    for (section, old), (_, new) in RENAMED_KEYS.items():
        part = raw.get(section)
        if isinstance(part, dict) and old in part and new not in part:
            part[new] = part.pop(old)
    return from_dict(Config, raw)
