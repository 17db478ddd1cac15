"""Classifier-free guidance: label dropout while training, the guided combination while sampling.

The null class is index ``num_classes`` (the networks' class embedding has num_classes + 1 rows).
"""
from __future__ import annotations

import torch


def drop_labels(labels: torch.Tensor | None, p: float, num_classes: int,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Labels with a share ``p`` replaced by the null class; no random draw at all when p = 0."""
    if labels is None or p == 0.0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale·(cond − uncond): scale 1 is the conditional model, 0 the unconditional one."""
    return uncond + scale * (cond - uncond)
