"""The trained side of a run: the DeepSpeed engine around the stage's model, its lr schedule and the EMA.

ZeRO-3 shards the parameters: the EMA update gathers them (deepspeed.zero.GatheredParameters), and the EMA
is exported through a copy of the network taken before DeepSpeed partitioned it.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Optional

import torch

from engine.config import Config
from engine.models.weights import export_network
from engine.trainer.distributed import World, deepspeed_config
from engine.trainer.optim import EMA, build_optimizer, lr_factor


class Student:
    def __init__(self, model: torch.nn.Module, cfg: Config, world: World):
        import deepspeed

        self.cfg = cfg
        self.model = model.to(world.device)
        # Taken while the weights are whole on every rank: ZeRO-3 partitions `model` in place below.
        self.ema = EMA(self.model, cfg.train.ema_beta, cfg.train.ema_warmup)
        self._export_copy = copy.deepcopy(self.model).cpu()
        optimizer = build_optimizer(cfg.optim, [p for p in self.model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(cfg, step * cfg.train.batch_size))
        ds_config = deepspeed_config(cfg, world.students)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        # Weights a network renormalises itself (EDM2's forced weight normalisation), see _renormalize_masters.
        self._forced_norm = [(m.weight, m.normalize_weight) for m in self.model.modules()
                             if hasattr(m, "normalize_weight")]

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward_and_step(self, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """Backward and (at the accumulation boundary) the optimizer step for one micro-step.

        Returns the global gradient norm before clipping at the boundary (a tensor where it is one, so the
        host need not wait for it), else None."""
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self.zero_stage == 0:   # gone after step(); ZeRO >= 1 keeps its own
            grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.zeros(())
        self.engine.step()
        if boundary:
            self._renormalize_masters()
            if self.zero_stage > 0:
                norm = self.engine.get_global_grad_norm()
        return norm

    @torch.no_grad()
    def _renormalize_masters(self) -> None:
        """Forced weight normalisation on DeepSpeed's fp32 master weights.

        A network like EDM2 renormalises its stored weights in each training forward; under ZeRO 1-3 or
        bf16 the optimizer owns a separate fp32 copy and writes it back after every step, which would undo
        that and let weight norms (and so the effective learning rate) drift. Plain fp32 ZeRO-0 has no
        master copy and needs nothing here. Collective under ZeRO-3: every rank runs the same loop.
        """
        if not self._forced_norm:
            return
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for param, normalize in self._forced_norm:
            master = safe_get_full_fp32_param(param)
            if master is not None:
                safe_set_full_fp32_param(param, normalize(master))

    def update_ema(self, step: int) -> None:
        """Under ZeRO-3 each rank holds a shard of each parameter: gather them whole for the update."""
        gathered = contextlib.nullcontext()
        if self.zero_stage == 3:
            import deepspeed
            gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        with gathered:
            self.ema.update(self.model, step)

    def export(self, out_dir: Path, meta: dict) -> Path:
        """The EMA weights of the raw network, with the run's config and ``meta``, to ``out_dir``."""
        self.ema.copy_to(self._export_copy)
        return export_network(self._export_copy.net, self.cfg, out_dir, meta=meta)
