"""Opt-in, revertible routing of a model's ``F.scaled_dot_product_attention`` calls to ``jvp_attention``.

Why: diffusers / timm style models call ``torch.nn.functional.scaled_dot_product_attention`` directly, and
its fused backends have no forward-mode AD, so ``torch.func.jvp`` through them fails ("Trying to use
forward AD with _scaled_dot_product_flash_attention…"). ``patch_sdpa(model)`` makes that model's calls
under forward-mode AD use the JVP-capable kernel, without editing the model's code:

    handle = patch_sdpa(model)          # or: with patch_sdpa(model): ...
    u, dudt = torch.func.jvp(model, primals, tangents)
    handle.revert()

What goes where (``kernels.attention.routed_sdpa``), for calls inside a patched forward:
- under forward-mode AD, arguments the kernel implements → ``jvp_attention`` (which follows
  ``kernels.dispatch`` op ``attention``); everything else (``attn_mask``, ``dropout_p > 0``, ``is_causal``,
  ``enable_gqa``, and when the triton kernels would run, inputs they do not take: not [B, heads, N, d],
  head dim > 128, float64, k/v of different shapes) → SDPA's math backend, which has a forward-mode rule;
- plain forward and backward calls → the original SDPA (flash / cuDNN stay with the model), unless
  ``patch_sdpa(model, route_plain_calls=True)`` opts in to the kernel for those too.
A fallback inside a patched forward is recorded as ``torch``.

How: a forward pre-hook on ``model`` swaps the module attribute ``torch.nn.functional.
scaled_dot_product_attention`` for the router, and a forward hook (``always_call``: it also runs when the
forward raises) puts the original object back once no patched forward is running.

Threads and nesting: the swap is process-wide while any patched forward runs, but a per-thread stack
decides whether a call is routed, so another thread's SDPA calls in that window reach the original.
Nested or re-entrant patched forwards (a patched submodule inside a patched model, one model patched
twice, recursion) are counted: the original comes back when the outermost one returns; the innermost
patch's ``route_plain_calls`` applies.

Limits: calls that do not look the function up on ``torch.nn.functional`` at call time (``from
torch.nn.functional import scaled_dot_product_attention`` bound at import, ``torch._C._nn...``) are not
routed; work the forward hands to other threads is not routed; recomputation outside the forward
(activation checkpointing in backward) uses the original SDPA; under ``torch.compile`` the swap is not
supported. If other code replaces ``F.scaled_dot_product_attention`` while a patched forward runs, the
hook leaves that replacement in place rather than overwrite it.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from kernels.attention import enter_patched_forward, exit_patched_forward, routed_sdpa

_lock = threading.Lock()
_in_flight = 0            # patched forwards running, all threads
_original = None          # what F.scaled_dot_product_attention was when the first of them started
_router = None            # what stands in for it meanwhile


def _enter(route_plain_calls: bool):
    global _in_flight, _original, _router
    enter_patched_forward(route_plain_calls)
    with _lock:
        if _in_flight == 0:
            _original = F.scaled_dot_product_attention
            _router = functools.partial(routed_sdpa, _original)
            F.scaled_dot_product_attention = _router
        _in_flight += 1


def _exit(*_):
    global _in_flight
    exit_patched_forward()
    with _lock:
        _in_flight -= 1
        if _in_flight == 0 and F.scaled_dot_product_attention is _router:
            F.scaled_dot_product_attention = _original


class SDPAPatch:
    """Handle of one ``patch_sdpa``: ``revert()`` (idempotent) removes its hooks; also a context manager
    that reverts on exit. Outside a patched forward ``F.scaled_dot_product_attention`` is always the
    original object, so reverting between forwards restores the model exactly."""

    def __init__(self, model: torch.nn.Module, route_plain_calls: bool = False):
        self.model, self.route_plain_calls = model, route_plain_calls
        self._hooks = [model.register_forward_pre_hook(lambda *_: _enter(route_plain_calls)),
                       model.register_forward_hook(_exit, always_call=True)]

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def revert(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "SDPAPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def patch_sdpa(model: torch.nn.Module, route_plain_calls: bool = False) -> SDPAPatch:
    """Route ``model``'s ``F.scaled_dot_product_attention`` calls under forward-mode AD to ``jvp_attention``
    (and its plain calls too with ``route_plain_calls``) while its forward runs; see the module doc for
    what falls back and the limits. Returns the revertible handle."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_sdpa takes an nn.Module (its forward hooks delimit the patch), got "
                        f"{type(model).__name__}")
    return SDPAPatch(model, route_plain_calls)


__all__ = ["SDPAPatch", "patch_sdpa"]
