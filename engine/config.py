"""One typed config tree, loaded from YAML once at the entry point and passed down.

Every section is a dataclass; `load_config` maps YAML (plus `--set a.b=value` overrides) onto it and
rejects unknown keys, wrong types and values outside a `Literal` with a one-line message that names the
key and the valid choices, so a typo never silently falls back to a default.

A field (or a whole section) built with :func:`may_change_on_resume` may differ when a run dir is
resumed: it changes how or how long a run goes, not what it computes. Every other field is the recipe,
and the trainer refuses to resume a run dir under a different one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from engine.errors import ConfigError
from engine.files import write_text_atomically

_RESUME = "may_change_on_resume"


def may_change_on_resume(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that may differ between a run dir's saved config and the config resuming it."""
    return field(default=default, default_factory=default_factory, metadata={_RESUME: True})


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
    resolution: int = 16
    channels: int = 1
    xflip: bool = False
    # dali: NVIDIA DALI decodes each batch (pip install -e '.[dali]'); both loaders give the same batches
    loader: Literal["torch", "dali"] = may_change_on_resume("torch")
    on_corrupt: Literal["fail", "skip"] = "fail"  # skip: an unreadable file stands in for the next readable one


@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    num_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [4])


@dataclass
class DiTConfig:
    patch_size: int = 2
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class EDM2Config:
    """The EDM2 magnitude-preserving U-Net (engine/networks/edm2.py): a published size preset, or
    model_channels for a custom width (set exactly one of the two)."""
    size: Optional[Literal["xs", "s", "m", "l", "xl", "xxl"]] = None   # 128/192/256/320/384/448 channels
    model_channels: Optional[int] = None
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_blocks: int = 3
    attn_resolutions: list[int] = field(default_factory=lambda: [16, 8])


@dataclass
class NetworkConfig:
    arch: Literal["unet", "dit", "edm2"] = "unet"
    dropout: float = 0.0
    num_classes: int = 0
    use_r: bool = False   # second time input, for MeanFlow's u(z, r, t)
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    edm2: EDM2Config = field(default_factory=EDM2Config)


@dataclass
class ModelConfig:
    """The parameterisation wrapped around the raw network (docs/method.md §2, §5)."""
    kind: Literal["edm", "flow"] = "edm"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0


@dataclass
class PreConfig:
    """Pre-training losses: EDM denoising (model.kind=edm) or flow matching (model.kind=flow)."""
    P_mean: float = -1.2          # ln sigma ~ N(P_mean, P_std^2)   (EDM)
    P_std: float = 1.2
    t_mean: float = 0.0           # t ~ logit-normal(t_mean, t_std) (flow matching)
    t_std: float = 1.0
    label_dropout: float = 0.0    # share of labels replaced by the null class: trains the unconditional
                                  # model that classifier-free guidance needs (class-conditional nets only)


@dataclass
class MidConfig:
    """CMT mid-training (paper §3.2 consistency form, §3.3 MeanFlow form) and its ablation baselines."""
    form: Literal["consistency", "meanflow"] = "consistency"
    method: Literal["cmt", "kd", "slow_cmt"] = "cmt"   # kd: only (x_T -> end); slow_cmt: one solve per pair
    teacher: Optional[str] = None        # run dir (or export dir) of the pre-trained teacher; required
    init: Literal["teacher", "random"] = "teacher"      # the student's starting weights
    teacher_sampler: Literal["dpm_solver_pp", "fm_euler", "fm_heun", "meanflow"] = "dpm_solver_pp"
    solver_steps: int = 16               # N steps. consistency: DPM-Solver++ on the lambda-uniform grid;
                                         # meanflow: the authors' "8 steps, 28 pairs" is 8 time points = 7 here
    solver_order: Literal[1, 2, 3] = 3
    data_start: bool = False             # x_T = x_0 + sigma_max*eps (authors' code) instead of sigma_max*eps
    loss: Literal["l2", "feature", "lpips", "elatentlpips"] = "l2"
    feature_net: Optional[str] = None    # weights of the perceptual network for lpips / elatentlpips
    cfg_scale: float = 1.0               # must match across the three stages (docs/method.md §5)
    # Where the pairs are made, not which (the same pairs and losses either way): serial = in line; thread =
    # ahead of the student in a background thread; teacher_ranks = on mid.teacher_ranks dedicated ranks
    # (docs/scale-out.md). Not "off": YAML reads a bare off as false.
    pipeline: Literal["serial", "thread", "teacher_ranks"] = may_change_on_resume("serial")
    pipeline_depth: int = may_change_on_resume(2)   # micro-batches of pairs the producer may hold ready (>= 1)
    teacher_ranks: int = may_change_on_resume(1)    # mid.pipeline=teacher_ranks: how many of the launched
                                                    # ranks only roll the teacher out


@dataclass
class PostConfig:
    """Post-training of the flow map (paper §2.2, docs/method.md §6): ECT, ECD (teacher ODE step) or MeanFlow."""
    method: Literal["ect", "ecd", "meanflow"] = "ect"
    init: Literal["mid", "teacher", "random"] = "mid"
    init_from: Optional[str] = None      # run dir of the mid-training run (init=mid) or the teacher (init=teacher)
    teacher: Optional[str] = None        # ECD's teacher run dir
    ecd_solver: Literal["euler", "heun"] = "heun"
    P_mean: float = -1.1                 # ECT/ECD: ln t ~ N(P_mean, P_std^2)
    P_std: float = 2.0
    q: float = 4096.0                    # ECT's fixed q (CIFAR-10 4096, AFHQ 1024, FFHQ 512)
    k: float = 8.0
    b: float = 1.0
    loss: Literal["l2", "feature", "lpips", "elatentlpips"] = "l2"
    feature_net: Optional[str] = None
    mf_P_mean: float = -0.4              # MeanFlow: (r, t) logit-normal, sorted
    mf_P_std: float = 1.0
    mf_equal_fraction: float = 0.75      # share of samples with r = t
    mf_adaptive_p: float = 1.0           # adaptive weight 1 / (||u - u_tgt||^2 + c)^p
    mf_adaptive_c: float = 1.0e-3
    cfg_scale: float = 1.0               # MeanFlow: guidance trained into u (MeanFlow Eq. 13); ECT/ECD: 1 only
    label_dropout: float = 0.0           # MeanFlow: share of labels dropped to the null class (their target stays v)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "radam"] = "adam"
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear"] = "constant"   # linear: decays to 0 at train.total_kimg
    warmup_kimg: float = 0.0
    grad_clip: float = 0.0        # 0 disables clipping


@dataclass
class TrainConfig:
    batch_size: int = 128         # global batch, in images (pairs for mid-training)
    total_kimg: float = may_change_on_resume(200.0)   # progress is counted in images, as in EDM
    seed: int = 0
    ema_beta: float = 0.999
    ema_warmup: bool = True       # beta_t = min(beta, (1+s)/(10+s)): without it EMA lags at small step counts
    checkpoint_every_kimg: float = may_change_on_resume(25.0)
    keep_checkpoints: int = may_change_on_resume(2)
    log_every_kimg: float = may_change_on_resume(2.0)
    # also export the EMA net to snapshots/kimg-XXXXXX.X/ this often; 0 = off
    snapshot_every_kimg: float = may_change_on_resume(0.0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum: int = 1
    deepspeed_config: Optional[str] = None   # a JSON file; overrides zero_stage / precision / grad_accum
    progress: bool = may_change_on_resume(True)


@dataclass
class SampleConfig:
    solver: Literal["dpm_solver_pp", "heun", "euler"] = "dpm_solver_pp"
    steps: int = 16
    order: Literal[1, 2, 3] = 3
    num_images: int = 100         # grid size: a square number looks best
    t_mid: float = 0.77569        # consistency 2-step sampling: re-noise to this σ (t_7 of the λ-uniform N=16 grid)
    batch_size: int = 250


@dataclass
class EvalConfig:
    num_samples: int = 1000
    batch_size: int = 250
    seed: int = 12345


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
    """A YAML mapping; a top-level `base: other.yaml` (relative to this file) is read first and merged under it."""
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
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_yaml(path.parent / str(base), (*seen, path.resolve())), raw)


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
    return cls(**kwargs)


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


def read_saved_config(path: str | Path) -> Config:
    """A config.yaml this engine wrote (a run dir's or an export's), validated like any other."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"'{path}' is not valid YAML ({str(exc).splitlines()[0]}): restore it or use a "
                          "new --run-dir") from None
    return from_dict(Config, raw or {})
