"""Scores during training (train.eval_every_kimg): the EMA network through the evaluation protocol of
engine/eval/protocol.py with eval.*'s metrics, on every student rank (each its share of the seeds)."""
from __future__ import annotations

import torch

from engine.config import Config
from engine.eval.generate import sampler_settings
from engine.eval.protocol import build_metrics, latent_decoder, score, seed_format
from engine.models.factory import model_kind
from engine.trainer.distributed import World


def gather_to_main(obj):
    """Every student rank's `obj` on rank 0 (a list, in rank order), None elsewhere."""
    if torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


class Scorer:
    def __init__(self, cfg: Config, stage_name: str, world: World):
        e = cfg.eval
        self.cfg, self.world = cfg, world
        self.sampler = sampler_settings(cfg, model_kind(cfg, stage_name))
        self.metrics = build_metrics(cfg, list(e.metrics), ref=e.ref, inception=e.inception, dinov2=e.dinov2,
                                     device=world.device)
        self.decode = latent_decoder(cfg, e.vae, world.device) if e.vae else None
        self.seeds = list(range(e.num))

    def __call__(self, net: torch.nn.Module) -> dict | None:
        """The scores of `net` (on rank 0; None on the other ranks), with what made them."""
        e = self.cfg.eval
        results = score(net, self.cfg, self.sampler, self.seeds, self.metrics, batch_size=e.batch_size,
                        device=self.world.device, rank=self.world.rank, world_size=self.world.students,
                        gather=gather_to_main, decode=self.decode, progress=False)
        if results is None:
            return None
        return {**results, "seeds": seed_format(self.seeds), **{f"sampler_{k}": v for k, v in self.sampler.items()}}
