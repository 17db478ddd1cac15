"""The DeepSpeed trainer: runs any stage the same way, resumable from one place.

Progress is counted in images (kimg), as in EDM. Every step's randomness (noise, dropout, augmentation,
which images) is derived from (seed, step, rank) and the data position from the image count, so a resumed
run needs only the checkpoint's model, optimizer, EMA, lr schedule and image count to continue exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import Config, ConfigError, save_config, to_dict
from engine.data import InfiniteSampler, build_dataset
from engine.export import export_network
from engine.stages import build_stage
from kernels import dispatch as kernel_dispatch


# --------------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; a plain `python` launch becomes a world of one.

    On a machine without CUDA, DeepSpeed's CPU accelerator is selected (it falls back to gloo).
    Returns (rank, world_size).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for this run: a user file if named, else built from train.*."""
    t = cfg.train
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config '{path}' does not exist: use a file from configs/deepspeed/")
        ds = json.loads(path.read_text())
    else:
        ds = {"zero_optimization": {"stage": t.zero_stage}}
        if t.precision == "bf16":
            ds["bf16"] = {"enabled": True}
    micro = t.batch_size // (world_size * t.grad_accum)
    if micro * world_size * t.grad_accum != t.batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by world size ({world_size}) "
                          f"x train.grad_accum ({t.grad_accum})")
    ds.update(train_batch_size=t.batch_size, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=t.grad_accum, steps_per_print=2**62, wall_clock_breakdown=False)
    # Always explicit: DeepSpeed's own default clips at 1.0, which would silently change "0 = off".
    ds["gradient_clipping"] = cfg.optim.grad_clip
    return ds


# --------------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for one (step, rank): a resumed or re-placed run draws the same numbers."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class EMA:
    """Exponential moving average of a module's parameters (and a copy of its buffers), kept in fp32."""

    def __init__(self, module: torch.nn.Module, beta: float, warmup: bool):
        self.beta, self.warmup = beta, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def beta_at(self, step: int) -> float:
        return min(self.beta, (1 + step) / (10 + step)) if self.warmup else self.beta

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        beta = self.beta_at(step)
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1.0 - beta)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}


def lr_factor(cfg: Config, nimg: int) -> float:
    o, total = cfg.optim, cfg.train.total_kimg * 1000
    f = 1.0
    if o.warmup_kimg > 0:
        f = min(1.0, nimg / (o.warmup_kimg * 1000))
    if o.schedule == "linear":
        f *= max(0.0, 1.0 - nimg / total)
    return f


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[o.name]
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


@dataclass
class Progress:
    step: int = 0
    nimg: int = 0


CHANGEABLE_ON_RESUME = {"train.total_kimg", "train.progress", "train.checkpoint_every_kimg",
                        "train.log_every_kimg", "train.snapshot_every_kimg", "train.keep_checkpoints",
                        "sample", "eval"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: dict, cfg: Config) -> None:
    """Refuse to resume a run dir with a different recipe: that would silently mix two runs."""
    a, b = _flatten(saved), _flatten(to_dict(cfg))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == c or k.startswith(c + ".") for c in CHANGEABLE_ON_RESUME)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"the run dir holds a run with a different config ({shown}"
                          f"{', ...' if len(diff) > 4 else ''}): use a new --run-dir, or the same config")


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, stage_name: str, run_dir: str | Path):
        self.cfg, self.stage_name, self.run_dir = cfg, stage_name, Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Data and stage first: a bad path or an unimplemented stage fails before distributed start-up.
        self.dataset = build_dataset(cfg.data.source, cfg.data.path, resolution=cfg.data.resolution,
                                     channels=cfg.data.channels, split="train", layout=cfg.data.layout,
                                     labels_path=cfg.data.labels_path)
        for op, impl in dataclasses.asdict(cfg.kernels).items():
            kernel_dispatch.set_policy(op, impl)
        torch.manual_seed(cfg.train.seed)   # the initial weights are fixed by the seed
        self.stage = build_stage(stage_name, cfg)
        self.rank, self.world = init_distributed()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")

        import deepspeed

        model = self.stage.model.to(self.device)
        optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(cfg, step * cfg.train.batch_size))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.world))
        self.ema = EMA(self.stage.model, cfg.train.ema_beta, cfg.train.ema_warmup)
        # Every rank draws the same global batch and keeps its slice, so the data stream is fixed by the seed.
        self.sampler = InfiniteSampler(len(self.dataset), cfg.train.batch_size // cfg.train.grad_accum,
                                       seed=cfg.train.seed, random_flip=cfg.data.xflip)
        self.progress = Progress()

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write to a temporary tag, then rename and repoint latest.json: a kill never leaves half a checkpoint."""
        tag = f"step-{self.progress.step:08d}"
        tmp_tag = f"tmp-{tag}"
        if self.rank == 0:
            shutil.rmtree(self.ckpt_dir / tmp_tag, ignore_errors=True)
        torch.distributed.barrier()
        client = {"progress": vars(self.progress).copy(), "ema": self.ema.state_dict(),
                  "sampler": self.sampler.state_dict()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)
            os.replace(self.ckpt_dir / tmp_tag, self.ckpt_dir / tag)
            _atomic_write(self.ckpt_dir / "latest.json", json.dumps({"tag": tag, **vars(self.progress)}))
            for old in sorted(self.ckpt_dir.glob("step-*"))[:-max(1, self.cfg.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
            self.export()
        torch.distributed.barrier()

    def maybe_resume(self) -> bool:
        latest = self.ckpt_dir / "latest.json"
        if not latest.is_file():
            return False
        tag = json.loads(latest.read_text())["tag"]
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"checkpoint {self.ckpt_dir / tag} could not be loaded: delete it to restart "
                               "from the previous one, or use a new --run-dir")
        self.progress = Progress(**client["progress"])
        self.ema.load_state_dict(client["ema"])
        self.sampler.load_state_dict(client["sampler"])
        self._trim_log(self.progress.nimg)
        if self.rank == 0:
            print(f"resumed from {self.ckpt_dir / tag} at {self.progress.nimg / 1000:g} kimg", file=sys.stderr)
        return True

    def export(self, out_dir: Path | None = None) -> None:
        ema_model = copy.deepcopy(self.stage.model)
        self.ema.copy_to(ema_model)
        export_network(ema_model.net, self.cfg, out_dir or self.run_dir / "export",
                       meta={"stage": self.stage_name, "kimg": self.progress.nimg / 1000, "step": self.progress.step})

    # -- logging ------------------------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _trim_log(self, nimg: int) -> None:
        """Drop log rows written after the checkpoint we resume from, so the log reads as one run."""
        path = self.run_dir / "log.jsonl"
        if self.rank == 0 and path.is_file():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["kimg"] * 1000 <= nimg]
            _atomic_write(path, "".join(r + "\n" for r in rows))

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved = self.run_dir / "config.yaml"
            if saved.is_file() and (self.ckpt_dir / "latest.json").is_file():
                import yaml
                check_resume_compatible(yaml.safe_load(saved.read_text()), cfg)
            save_config(cfg, saved)
        torch.distributed.barrier()
        resumed = self.maybe_resume()
        total = int(t.total_kimg * 1000)
        next_ckpt = _next_multiple(self.progress.nimg, t.checkpoint_every_kimg * 1000)
        next_log = _next_multiple(self.progress.nimg, t.log_every_kimg * 1000)
        next_snapshot = _next_multiple(self.progress.nimg, t.snapshot_every_kimg * 1000)
        bar = _progress_bar(self.rank == 0 and t.progress, total, self.progress.nimg, self.stage_name, resumed)
        micro = t.batch_size // (self.world * t.grad_accum)
        losses, tick = [], time.time()
        while self.progress.nimg < total:
            for micro_step in range(t.grad_accum):
                gen_seed = step_seed(t.seed, self.progress.step * t.grad_accum + micro_step, self.rank)
                torch.manual_seed(gen_seed ^ 1)      # dropout and any other global-RNG use
                generator = torch.Generator(self.device).manual_seed(gen_seed)
                batch = self._collate(next(self.sampler), micro)
                loss = self.stage.loss(self.engine, batch, generator)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach())
            self.progress.step += 1
            self.progress.nimg += t.batch_size
            self.ema.update(self.stage.model, self.progress.step)
            if not math.isfinite(losses[-1].item()):
                raise FloatingPointError(f"loss became {losses[-1].item()} at kimg {self.progress.nimg / 1000:.1f}: "
                                         "lower optim.lr or set optim.grad_clip")
            bar.update(t.batch_size)
            if self.progress.nimg >= next_log or self.progress.nimg >= total:
                mean_loss = _mean_over_ranks(torch.stack(losses).mean())
                elapsed = time.time() - tick
                row = {"kimg": self.progress.nimg / 1000, "step": self.progress.step, "loss": mean_loss,
                       "lr": self.scheduler.get_last_lr()[0], "sec_per_kimg": elapsed / max(len(losses) * micro * self.world / 1000, 1e-9)}
                row.update(getattr(self.stage, "counters", {}))   # counted work (teacher NFEs, pairs, ...)
                row["kernels"] = kernel_dispatch.implementations_run()   # which implementation each op used
                self._log(row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{row['lr']:.2e}")
                losses, tick = [], time.time()
                next_log = _next_multiple(self.progress.nimg, t.log_every_kimg * 1000)
            if self.progress.nimg >= next_snapshot:
                if self.rank == 0:
                    self.export(self.run_dir / "snapshots" / f"kimg-{self.progress.nimg / 1000:08.1f}")
                next_snapshot = _next_multiple(self.progress.nimg, t.snapshot_every_kimg * 1000)
            if self.progress.nimg >= next_ckpt or self.progress.nimg >= total:
                self.save_checkpoint()
                next_ckpt = _next_multiple(self.progress.nimg, t.checkpoint_every_kimg * 1000)
        bar.close()
        if self.rank == 0 and not (self.run_dir / "export").is_dir():
            self.export()
        torch.distributed.barrier()
        return self.run_dir / "export"

    def _collate(self, sampled, micro: int) -> dict:
        """This rank's slice of the global (micro-)batch, on the device."""
        lo = self.rank * micro
        flip = None if sampled.flip is None else sampled.flip[lo:lo + micro]
        images, labels = self.dataset.gather(sampled.indices[lo:lo + micro], flip)
        batch = {"images": images.to(self.device)}
        if self.cfg.network.num_classes > 0:
            batch["labels"] = labels.to(self.device)
        return batch


# --------------------------------------------------------------------------------------------------
def _next_multiple(nimg: int, every: float) -> float:
    if every <= 0:
        return float("inf")
    return (math.floor(nimg / every) + 1) * every


def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().float().clone()
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x.item()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _NullBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress_bar(enabled: bool, total: int, start: int, stage: str, resumed: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    desc = f"{stage}{' (resumed)' if resumed else ''}"
    return tqdm(total=total, initial=start, desc=desc, unit="img", unit_scale=True, file=sys.stderr,
                mininterval=2.0, dynamic_ncols=True)
