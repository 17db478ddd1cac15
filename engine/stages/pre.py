"""Pre-training: the diffusion teacher, as an EDM denoiser or a flow-matching velocity (SPEC §2, §5)."""
from __future__ import annotations

import torch

from engine.build import build_raw_network, wrap_network
from engine.config import Config
from engine.edm import edm_loss_weight, sample_edm_sigma
from engine.flow import fm_interpolate, fm_velocity_target, sample_logit_normal
from engine.guidance import check_label_dropout, drop_labels


class PreTraining:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = wrap_network(build_raw_network(cfg), cfg, cfg.model.kind)
        check_label_dropout(cfg.pre.label_dropout, cfg.network.num_classes, "pre.label_dropout")

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        x0 = batch["images"]
        labels = drop_labels(batch.get("labels"), self.cfg.pre.label_dropout, self.cfg.network.num_classes,
                             generator)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.cfg.model.kind == "edm":
            # EDM: lambda(sigma) * ||D(x0 + sigma*eps; sigma) - x0||^2, ln sigma ~ N(P_mean, P_std^2).
            pre = self.cfg.pre
            sigma = sample_edm_sigma(x0.shape[0], P_mean=pre.P_mean, P_std=pre.P_std,
                                     generator=generator, device=x0.device)
            denoised = model(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, labels)
            weight = edm_loss_weight(sigma, self.cfg.model.sigma_data).view(-1, 1, 1, 1)
            return (weight * (denoised - x0).square()).mean()
        # Flow matching: z_t = (1-t) x + t eps, regress v(z_t, t) onto eps - x.
        t = sample_logit_normal(x0.shape[0], self.cfg.pre.t_mean, self.cfg.pre.t_std,
                                generator=generator, device=x0.device)
        v = model(fm_interpolate(x0, eps, t), t, labels)
        return (v - fm_velocity_target(x0, eps)).square().mean()
