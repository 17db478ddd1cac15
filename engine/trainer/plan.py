"""Plan a run before renting GPUs: parameters, per-GPU memory under ZeRO 0-3, activations, FLOPs, GPU count.

    cmt-plan --config configs/paper/imagenet512_cmt.yaml --stage mid --gpus 8 --gpu-mem 80

Every network is built on the meta device (no weights are allocated), so even EDM2-XXL plans in seconds.

- **Model states** per GPU, in DeepSpeed's accounting (bytes per parameter P over N GPUs). bf16 mixed
  precision: 16-bit weights 2, 16-bit grads 2, fp32 grads 4, fp32 master weights 4, Adam/RAdam m and v 8;
  ZeRO-1 partitions the last three, ZeRO-2 also the 16-bit grads, ZeRO-3 also the 16-bit weights (plus one
  gathered layer, 4·largest-layer) and, as DeepSpeed counts it, drops the separate 16-bit gradient copy.
  A jvp loss (MeanFlow) under ZeRO-3 gathers the whole 16-bit model for each micro-step instead of one
  layer at a time (engine/trainer/student.py): its weights are the partition plus the whole model.
  The ZeRO-2/3 totals are DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, no offload); ZeRO-0/1
  follow the same accounting. fp32: weights 4, grads 4, Adam 8, partitioned the same way.
  Besides: the trainer's fp32 EMA copy (4P, every rank), the frozen teacher and perceptual net (2 or 4 bytes
  per parameter by precision, replicated).
- **Activations**: bytes of the tensors autograd saves for backward in one training forward of the student
  (and of the perceptual net on its output), counted with ``torch.autograd.graph.saved_tensors_hooks`` on the
  meta device in the run's precision at batch 1 and 2: the difference is the per-sample cost, the rest is
  batch-independent (e.g. EDM2's normalised weight copies). A stage whose loss differentiates the network
  with ``torch.func.jvp`` is measured through one jvp instead: autograd also records the tangent's graph
  (the tangent depends on the weights), alive until the loss is formed. Transient buffers, the allocator and the CUDA
  context are not in it: ``--headroom`` (default 15%) of each GPU is kept free for them.
- **FLOPs** per training pair: ``torch.utils.flop_counter.FlopCounterMode`` on one meta forward (2 FLOPs per
  multiply-add); backward counted as 2 forwards (exact for conv/matmul); a jvp as counted on meta (primal and
  tangent), plus the backward of its primal. Network evaluations per pair are the
  stage's own ``cost_per_pair`` (docs/method.md §8), the formula its counters are tested against.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.config import Config, from_dict, load_config
from engine.errors import ConfigError, MissingFileError
from engine.losses.feature_nets import DIGITS_GNVGG_RECIPE, GNVGG
from engine.losses.lpips import LPIPS_VGG16_TAP_ENDS, LPIPSVGG16
from engine.models.factory import build_raw_network
from engine.models.weights import resolve_export_dir
from engine.stages import stage_class

GIB = 2 ** 30


@dataclass
class ModelStates:
    """Per-GPU bytes of a trained network's weights, gradients and optimizer states."""
    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def count_params(net: nn.Module) -> tuple[int, int]:
    """(total parameters, parameters of the largest single module): DeepSpeed's model_to_params."""
    total = sum(p.numel() for p in net.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    return total, largest


def model_states(params: int, largest: int, zero: int, gpus: int, precision: str, jvp: bool = False) -> ModelStates:
    """Bytes per GPU for `params` trained with Adam under ZeRO stage `zero` on `gpus` GPUs (module docstring);
    ``jvp``: ZeRO-3 holds the whole 16-bit model during the micro-step rather than one layer."""
    p, n = float(params), gpus
    if zero == 3 and jvp:
        plain = model_states(params, largest, zero, gpus, precision)
        wbytes = 2 if precision == "bf16" else 4
        return ModelStates(plain.weights - 4 * largest + wbytes * p, plain.grads, plain.optimizer)
    if precision == "bf16":
        w16, g16, g32, master, adam = 2 * p, 2 * p, 4 * p, 4 * p, 8 * p
        if zero == 0:
            return ModelStates(w16, g16 + g32, master + adam)
        if zero == 1:
            return ModelStates(w16, g16 + g32 / n, (master + adam) / n)
        if zero == 2:
            return ModelStates(w16, (g16 + g32) / n, (master + adam) / n)
        # DeepSpeed's ZeRO-3 estimate counts 18 bytes/param in all: gradients reduce-scattered straight into
        # the fp32 partition, without a separate 16-bit copy.
        return ModelStates(w16 / n + 4 * largest, g32 / n, (master + adam) / n)
    w, g, adam = 4 * p, 4 * p, 8 * p
    return ModelStates(w / n + 4 * largest if zero == 3 else w, g / n if zero >= 2 else g, adam / n if zero else adam)


def deepspeed_model_states(params: int, largest: int, zero: int, gpus: int) -> int:
    """DeepSpeed's own per-GPU estimate (bf16, no offload) for ZeRO-2 and ZeRO-3. Its GPU figure depends on
    the total GPU count only, so all GPUs are passed as one node."""
    with contextlib.redirect_stdout(io.StringIO()):   # the estimators' modules log on import
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    if zero == 2:
        return estimate_zero2_model_states_mem_needs(params, gpus, 1, cpu_offload=False)[1]
    if zero == 3:
        return estimate_zero3_model_states_mem_needs(params, largest, gpus, 1, cpu_offload=False)[1]
    raise ValueError("DeepSpeed has estimators for ZeRO-2 and ZeRO-3 only")


# --------------------------------------------------------------------------------------------------
# Measuring networks on the meta device
# --------------------------------------------------------------------------------------------------
def _inputs(cfg: Config, net: nn.Module, batch: int, dtype) -> tuple[tuple, dict]:
    x = torch.zeros(batch, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, device="meta", dtype=dtype)
    t = torch.zeros(batch, device="meta")
    kwargs = {}
    if getattr(net, "use_r", False):
        kwargs["r_label"] = t
    if cfg.network.num_classes:
        kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device="meta")
    return (x, t), kwargs


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn()` runs (views count their base)."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        seen[id(base)] = base   # keeping a reference stops ids being reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.numel() * t.element_size() for t in seen.values())


def measure_training_forward(cfg: Config, net: nn.Module, perceptual: nn.Module | None, dtype,
                             jvp: bool = False) -> dict:
    """Per-sample and batch-independent saved-activation bytes of one training forward (student, then the
    perceptual net on its output), or of one ``torch.func.jvp`` of the student along all its inputs, and the
    FLOPs of that forward (or jvp) per sample (counted during batch 1)."""
    net = net.to(dtype).train()
    if perceptual is not None:
        perceptual = perceptual.to(dtype).eval().requires_grad_(False)

    flops = FlopCounterMode(display=False)

    def run(batch):
        args, kwargs = _inputs(cfg, net, batch, dtype)
        with flops if batch == 1 else contextlib.nullcontext():
            if jvp:
                out, _ = torch.func.jvp(lambda *a: net(*a, **kwargs), args, tuple(torch.ones_like(a) for a in args))
            else:
                out = net(*args, **kwargs)
        if perceptual is not None:
            perceptual.taps(out)

    one = _saved_bytes(lambda: run(1))
    two = _saved_bytes(lambda: run(2))
    return {"per_sample": two - one, "fixed": 2 * one - two, "flops": flops.get_total_flops()}


def forward_flops(cfg: Config, net: nn.Module) -> int:
    """FLOPs of one no-grad forward of `net` on one sample."""
    args, kwargs = _inputs(cfg, net, 1, torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.float().eval()(*args, **kwargs)
    return counter.get_total_flops()


def perceptual_net(cfg: Config, loss: str) -> nn.Module | None:
    """The loss's feature network at its real size (weights on meta), or None for a pixel distance."""
    with torch.device("meta"):
        if loss == "lpips":
            from torchvision.models.vgg import cfgs, make_layers
            return LPIPSVGG16(make_layers(cfgs["D"])[:LPIPS_VGG16_TAP_ENDS[-1]], in_channels=cfg.data.channels)
        if loss == "elatentlpips":
            return GNVGG(in_channels=cfg.data.channels, resolution=cfg.data.resolution)
        if loss == "feature":
            return GNVGG(in_channels=cfg.data.channels, width=DIGITS_GNVGG_RECIPE["width"],
                         depth=DIGITS_GNVGG_RECIPE["depth"], resolution=cfg.data.resolution)
    return None


def teacher_config(cfg: Config, stage: str, path: str | None) -> Config | None:
    """The teacher's config: --teacher-config, else the export named by mid.teacher / post.teacher, else the
    student's own (CMT and ECD initialise from / distil a same-architecture teacher)."""
    import yaml

    if path:
        return load_config(path)
    if stage == "pre" or (stage == "post" and cfg.post.method != "ecd"):
        return None
    ref = cfg.mid.teacher if stage == "mid" else cfg.post.teacher
    if ref:
        try:
            return from_dict(Config, yaml.safe_load((resolve_export_dir(ref) / "config.yaml").read_text()))
        except MissingFileError:
            pass
    if stage == "mid" and cfg.mid.init == "random":
        raise ConfigError("mid.init=random: the teacher's architecture differs from the student's; pass "
                          "--teacher-config with the teacher's YAML")
    return cfg


def guide_config(cfg: Config, stage: str) -> Config | None:
    """The config of mid.guide's export when the run guides with it, else None."""
    import yaml

    if stage != "mid" or not cfg.mid.guide or cfg.mid.cfg_scale == 1.0:
        return None
    try:
        return from_dict(Config, yaml.safe_load((resolve_export_dir(cfg.mid.guide) / "config.yaml").read_text()))
    except MissingFileError as exc:
        raise MissingFileError(f"mid.guide='{cfg.mid.guide}': {exc} (the plan counts the guide's network)") from None


def plan(cfg: Config, stage: str = "mid", gpus: int = 8, gpu_mem_gb: float = 80.0, batch: int | None = None,
         teacher_cfg_path: str | None = None, headroom: float = 0.15, gpu_tflops: float = 989.0,
         mfu: float = 0.4) -> dict:
    """Everything the report prints, as a dict (see the module docstring for each method)."""
    precision = cfg.train.precision
    wbytes = 2 if precision == "bf16" else 4
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    batch = batch or cfg.train.batch_size
    costs = asdict(stage_class(stage).cost_per_pair(cfg))
    with torch.device("meta"):
        student = build_raw_network(cfg)
    tcfg = teacher_config(cfg, stage, teacher_cfg_path)
    teacher = None
    if tcfg is cfg:   # same architecture: measure the student's module again rather than build a copy
        teacher = student
    elif tcfg is not None:
        with torch.device("meta"):
            teacher = build_raw_network(tcfg)
    gcfg = guide_config(cfg, stage)
    with torch.device("meta"):
        guide = build_raw_network(gcfg) if gcfg is not None else None
    feat = perceptual_net(cfg, costs["distance"])
    params, largest = count_params(student)
    t_params = count_params(teacher)[0] if teacher is not None else 0
    g_params = count_params(guide)[0] if guide is not None else 0
    f_params = count_params(feat)[0] if feat is not None else 0

    t_fwd = forward_flops(tcfg, teacher) if teacher is not None else 0
    if guide is not None:   # half the guided NFEs are the guide's
        t_fwd = (t_fwd + forward_flops(gcfg, guide)) / 2
    f_fwd = 0
    if feat is not None:
        x = torch.zeros(1, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            feat.float().taps(x)
        f_fwd = counter.get_total_flops()
    jvp = costs["jvp"] > 0
    act = measure_training_forward(cfg, student, feat, dtype, jvp=jvp)
    if jvp:   # the jvp's primal forward and tangent, and the backward of its primal (2 forwards)
        s_fwd = forward_flops(cfg, student)
        act["student_fwd_flops"], act["student_jvp_flops"] = s_fwd, act.pop("flops")
        grad_forwards = costs["student_grad"] - 2 * costs["jvp"]
        student_flops = (costs["jvp"] * (act["student_jvp_flops"] + 2 * s_fwd) + 3 * grad_forwards * s_fwd
                         + costs["student_nograd"] * s_fwd)
    else:
        s_fwd = act["student_fwd_flops"] = act.pop("flops")
        student_flops = 3 * costs["student_grad"] * s_fwd + costs["student_nograd"] * s_fwd
    flops = {"teacher": costs["teacher_nfe"] * t_fwd, "student": student_flops,
             "perceptual": 4 * f_fwd}   # forward + backward (to the input) on the output, forward on the target

    def per_gpu(zero: int, n: int, micro: int) -> dict:
        states = model_states(params, largest, zero, n, precision, jvp)
        fixed = 4 * params + wbytes * (t_params + g_params + f_params) + act["fixed"]
        return {"states": states, "fixed": fixed, "activations": act["per_sample"] * micro,
                "total": states.total + fixed + act["per_sample"] * micro}

    usable = gpu_mem_gb * GIB * (1 - headroom)
    zero = cfg.train.zero_stage
    micro = math.ceil(batch / gpus)
    table = {z: per_gpu(z, gpus, micro) for z in range(4)}
    ds = {z: deepspeed_model_states(params, largest, z, gpus) for z in (2, 3)}
    max_micro = {z: max(0, int((usable - per_gpu(z, gpus, 0)["total"]) // act["per_sample"])) for z in range(4)}
    needed = next((n for n in range(1, batch + 1) if per_gpu(zero, n, math.ceil(batch / n))["total"] <= usable), None)
    total_pairs = cfg.train.total_kimg * 1000
    total_flops = sum(flops.values()) * total_pairs
    return {"stage": stage, "precision": precision, "gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "batch": batch,
            "micro": micro, "zero": zero, "params": {"student": params, "largest_layer": largest, "teacher": t_params,
                                                     "guide": g_params, "perceptual": f_params},
            "teacher_arch": tcfg.network.arch if tcfg is not None else None, "costs": costs,
            "act": act, "flops": flops, "table": table, "deepspeed": ds, "max_micro": max_micro,
            "gpus_needed": needed, "usable": usable, "total_pairs": total_pairs, "total_flops": total_flops,
            "gpu_hours": total_flops / (gpu_tflops * 1e12 * mfu) / 3600, "gpu_tflops": gpu_tflops, "mfu": mfu}


def format_plan(r: dict, name: str) -> str:
    g = lambda b: f"{b / GIB:7.2f}"   # noqa: E731
    p = r["params"]
    guide = f"guide {p['guide'] / 1e6:.1f}M, " if p["guide"] else ""
    lines = [f"plan: {name}, stage {r['stage']}, {r['precision']}, {r['gpus']} GPUs x {r['gpu_mem_gb']:g} GB, "
             f"global batch {r['batch']} ({r['micro']} per GPU)",
             f"parameters: student {p['student'] / 1e6:.1f}M (largest layer {p['largest_layer'] / 1e6:.2f}M), "
             f"teacher {p['teacher'] / 1e6:.1f}M ({r['teacher_arch'] or 'none'}), {guide}perceptual net "
             f"{p['perceptual'] / 1e6:.1f}M ({r['costs']['distance']})",
             f"activations saved for backward: {r['act']['per_sample'] / GIB:.2f} GiB per sample "
             f"+ {r['act']['fixed'] / GIB:.2f} GiB batch-independent (meta-device count, {r['precision']}"
             + (", one torch.func.jvp: primal and tangent graphs)" if r["costs"]["jvp"] else ")"),
             "per-GPU memory, GiB (micro-batch as above; fixed = fp32 EMA + frozen teacher/perceptual + "
             "batch-independent saved tensors):",
             "  ZeRO | weights |   grads | optim   | fixed   | activ.  | total   | DS w+g+o est. | max micro",
             ]
    if r["costs"]["jvp"]:
        lines.insert(-1, "  (jvp loss: ZeRO-3 gathers the whole 16-bit model for each micro-step, in its weights column)")
    for z, row in r["table"].items():
        s = row["states"]
        ds = f"{r['deepspeed'][z] / GIB:7.2f}" if z in r["deepspeed"] else "      -"
        mark = " <- config" if z == r["zero"] else ""
        lines.append(f"  {z:>4} | {g(s.weights)} | {g(s.grads)} | {g(s.optimizer)} | {g(row['fixed'])} | "
                     f"{g(row['activations'])} | {g(row['total'])} | {ds:>13} | {r['max_micro'][z]:>9}{mark}")
    f, c = r["flops"], r["costs"]
    grad = (f"jvp+bwd x{c['jvp']:g}" + (f", fwd+bwd x{c['student_grad'] - 2 * c['jvp']:g}"
                                       if c["student_grad"] > 2 * c["jvp"] else "")
            if c["jvp"] else f"fwd+bwd x{c['student_grad']:g}")
    lines += [f"FLOPs per pair: teacher {f['teacher'] / 1e9:.1f} G ({c['teacher_nfe']:g} NFE), student "
              f"{f['student'] / 1e9:.1f} G ({grad}, no-grad fwd x{c['student_nograd']:g}), "
              f"perceptual {f['perceptual'] / 1e9:.1f} G",
              f"run: {r['total_pairs'] / 1e6:.1f} M pairs, {r['total_flops'] / 1e18:.1f} EFLOP, ~{r['gpu_hours']:.0f} "
              f"GPU-h at {r['gpu_tflops']:g} TFLOP/s x {r['mfu']:.0%} utilisation",
              f"GPUs needed for global batch {r['batch']} without gradient accumulation at ZeRO-{r['zero']} "
              f"({r['usable'] / GIB:.1f} GiB usable each): "
              f"{r['gpus_needed'] or 'none: one sample does not fit; raise ZeRO or cut the batch'}"]
    return "\n".join(lines)
