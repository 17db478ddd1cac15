"""The trained side of a run: the DeepSpeed engine around the stage's model, its lr schedule and the EMA.

ZeRO-3 shards the parameters: the EMA update gathers them (deepspeed.zero.GatheredParameters), and the EMA
is exported through a copy of the network taken before DeepSpeed partitioned it. Checkpoints are read
without running code from them (:func:`safe_load`).

A loss that differentiates the network with ``torch.func.jvp`` (MeanFlow) cannot run through ZeRO-3's
module hooks: they gather and release parameters inside autograd Functions that have no forward-mode rule.
Such a stage runs the student as a functional call (:meth:`Student.forward`): every parameter is gathered
whole for the micro-step, a hook-free twin of the network is called on the gathered tensors, and the
backward runs inside the gather, so ZeRO-3's gradient hooks reduce-scatter full-size gradients as usual.
The cost is the whole 16-bit model on every rank for the micro-step (engine.trainer.plan counts it).
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


# --------------------------------------------------------------------------------------------------
# Loading DeepSpeed's files without running code
# --------------------------------------------------------------------------------------------------
def _deepspeed_types() -> list:
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoints (ZeRO 1-3, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path, map_location=None):
    """torch.load that unpickles tensors, containers and the DeepSpeed types of _deepspeed_types only: a
    planted payload is refused."""
    with torch.serialization.safe_globals(_deepspeed_types()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_safe_loading(engine) -> None:
    """Make a DeepSpeed engine read every checkpoint file through :func:`safe_load`."""
    engine.checkpoint_engine.load = safe_load



class Student:
    def __init__(self, model: torch.nn.Module, cfg: Config, world: World, uses_jvp: bool = False):
        import deepspeed

        self.cfg = cfg
        self.model = model.to(world.device)
        # Taken while the weights are whole on every rank: ZeRO-3 partitions `model` in place below.
        self.ema = EMA(self.model, cfg.train.ema_beta, cfg.train.ema_warmup)
        self._export_copy = copy.deepcopy(self.model).cpu()
        self._twin = _hook_free_twin(self.model) if uses_jvp else None
        optimizer = build_optimizer(cfg.optim, [p for p in self.model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(cfg, step * cfg.train.batch_size))
        ds_config = deepspeed_config(cfg, world.students)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        use_safe_loading(self.engine)
        # Weights a network renormalises itself (EDM2's forced weight normalisation), see _renormalize_masters.
        self._forced_norm = [(m.weight, m.normalize_weight) for m in self.model.modules()
                             if hasattr(m, "normalize_weight")]

    @contextlib.contextmanager
    def forward(self):
        """The student as the stage's loss calls it, for one micro-step: the DeepSpeed engine, or under
        ZeRO-3 with a jvp loss, the functional call on whole parameters (the module doc). Backpropagate
        inside the ``with``."""
        if self._twin is None or self.zero_stage != 3:
            yield self.engine
            return
        import deepspeed

        module = self.engine.module
        params = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None), _plain_linear():
            tensors = {**params, **dict(module.named_buffers())}
            yield lambda *args, **kwargs: torch.func.functional_call(self._twin, tensors, args, kwargs)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate one micro-step; True at the accumulation boundary (the next step() updates)."""
        self.engine.backward(loss)
        return self.engine.is_gradient_accumulation_boundary()

    def grad_norm_before_step(self) -> Optional[torch.Tensor]:
        """The global gradient norm before clipping, on the device, where it exists before the update
        (ZeRO-0: the gradients are the parameters' own; ZeRO 1-3 give theirs after step())."""
        if self.zero_stage > 0:
            return None
        grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        return torch.stack(grads).norm() if grads else torch.zeros((), device=self.engine.device)

    def step(self, boundary: bool) -> Optional[float]:
        """DeepSpeed's step (an update at the boundary); returns ZeRO 1-3's gradient norm there."""
        self.engine.step()
        if not boundary:
            return None
        self._renormalize_masters()
        return self.engine.get_global_grad_norm() if self.zero_stage > 0 else None

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

    def ema_network(self, device) -> torch.nn.Module:
        """A copy of the EMA weights' raw network on ``device``, in eval mode, for scoring."""
        self.ema.copy_to(self._export_copy)
        return copy.deepcopy(self._export_copy.net).to(device).eval()

    def export(self, out_dir: Path, meta: dict) -> Path:
        """The EMA weights of the raw network, with the run's config and ``meta``, to ``out_dir``."""
        self.ema.copy_to(self._export_copy)
        return export_network(self._export_copy.net, self.cfg, out_dir, meta=meta)


def _hook_free_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` without storage of its own (functional calls supply every parameter and buffer)
    and without the hooks DeepSpeed adds to ``model``: ZeRO-3's functional forward runs through it."""
    twin = copy.deepcopy(model)
    for tensor in [*twin.parameters(), *twin.buffers()]:
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return twin


@contextlib.contextmanager
def _plain_linear():
    """torch's own F.linear for the functional forward: ZeRO-3's memory-efficient replacement is an autograd
    Function without a forward-mode rule, which torch.func.jvp refuses."""
    import torch.nn.functional as F

    patched, original = F.linear, getattr(torch._C._nn, "linear")
    F.linear = original
    try:
        yield
    finally:
        F.linear = patched
