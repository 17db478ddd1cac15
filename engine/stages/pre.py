"""Pre-training: the diffusion teacher, as an EDM denoiser or a flow-matching velocity (paper §2.1;
docs/method.md §2, §5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.config import Config
from engine.formulas.broadcast import expand_like
from engine.formulas.edm import edm_loss_weight, sample_edm_sigma
from engine.formulas.flow import fm_interpolate, fm_velocity_target, sample_logit_normal
from engine.formulas.guidance import drop_labels
from engine.models.factory import build_raw_network, wrap_network
from engine.stages.base import PairCost, Stage, check_label_dropout


@dataclass
class NoisedImages:
    """A batch with its noise drawn: data x0, noise eps, the per-sample noise level (EDM σ or FM time t)."""
    x0: torch.Tensor
    eps: torch.Tensor
    time: torch.Tensor
    labels: Optional[torch.Tensor] = None


class PreTraining(Stage):
    name = "pre"
    prepared_type = NoisedImages

    def __init__(self, cfg: Config):
        self.cfg = cfg
        check_label_dropout(cfg.pre.label_dropout, cfg.network.num_classes, "pre.label_dropout")
        self.model = wrap_network(build_raw_network(cfg), cfg, cfg.model.kind)
        self.counters = {}

    @staticmethod
    def cost_per_pair(cfg: Config) -> PairCost:
        return PairCost(teacher_nfe=0.0, student_grad=1.0, student_nograd=0.0, distance="mean_squared")

    @torch.no_grad()
    def prepare(self, batch: dict, generator: torch.Generator) -> NoisedImages:
        x0, pre = batch["images"], self.cfg.pre
        labels = drop_labels(batch.get("labels"), pre.label_dropout, self.cfg.network.num_classes, generator)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.cfg.model.kind == "edm":   # ln σ ~ N(P_mean, P_std²)
            time = sample_edm_sigma(x0.shape[0], P_mean=pre.P_mean, P_std=pre.P_std, generator=generator,
                                    device=x0.device)
        else:                              # t ~ logit-normal(t_mean, t_std)
            time = sample_logit_normal(x0.shape[0], pre.t_mean, pre.t_std, generator=generator, device=x0.device)
        return NoisedImages(x0, eps, time, labels)

    def loss(self, model, batch: NoisedImages) -> torch.Tensor:
        x0, eps, time = batch.x0, batch.eps, batch.time
        if self.cfg.model.kind == "edm":
            # EDM: λ(σ)·‖D(x0 + σ·ε; σ) − x0‖², λ = 1/c_out².
            denoised = model(x0 + expand_like(time, x0) * eps, time, batch.labels)
            weight = expand_like(edm_loss_weight(time, self.cfg.model.sigma_data), x0)
            return (weight * (denoised - x0).square()).mean()
        # Flow matching: z_t = (1 − t)·x + t·ε, regress v(z_t, t) onto ε − x.
        v = model(fm_interpolate(x0, eps, time), time, batch.labels)
        return (v - fm_velocity_target(x0, eps)).square().mean()
