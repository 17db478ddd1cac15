"""Raw networks F(x, noise_label, r_label=None, class_labels=None) and their factory."""

import inspect

from engine.networks.dit import DiT
from engine.networks.unet import UNet

ARCHS = {"unet": UNet, "dit": DiT}


def build_network(arch: str, **kwargs):
    """Construct a raw network by name; unknown names or keyword arguments raise ValueError listing
    the valid choices (so config typos fail at build time, not as a silent default)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown network arch {arch!r}; valid: {sorted(ARCHS)}")
    cls = ARCHS[arch]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for arch {arch!r}; valid: {valid}")
    return cls(**kwargs)


__all__ = ["ARCHS", "DiT", "UNet", "build_network"]
