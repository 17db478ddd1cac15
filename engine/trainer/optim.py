"""The optimizer, its learning-rate schedule (counted in images, as in EDM) and the EMA of the weights."""
from __future__ import annotations

import torch

from engine.config import Config, OptimConfig


def build_optimizer(optim: OptimConfig, params) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[optim.name]
    return cls(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)


def lr_factor(cfg: Config, nimg: int) -> float:
    """The multiple of optim.lr after ``nimg`` images: linear warm-up, then constant or linear decay to 0."""
    o, total = cfg.optim, cfg.train.total_kimg * 1000
    f = 1.0
    if o.warmup_kimg > 0:
        f = min(1.0, nimg / (o.warmup_kimg * 1000))
    if o.schedule == "linear":
        f *= max(0.0, 1.0 - nimg / total)
    return f


class EMA:
    """Exponential moving average of a module's parameters (and a copy of its buffers), kept in fp32.

    Whole on every rank, also under ZeRO-3: the student gathers the sharded parameters for the update.
    """

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
