"""Where the teacher lives in multi-process runs: DDP, FSDP and DeepSpeed ZeRO-3.

The teacher only runs forward passes (no gradients, no optimizer), so it is never wrapped for gradient
synchronisation. What :func:`prepare_teacher` does under each mode the ``Accelerator`` runs:

- **single process, DDP (GPU or CPU processes), DeepSpeed ZeRO-0/1/2**: a full copy of the teacher on each
  process's device (``accelerator.device``), frozen, in eval mode, never wrapped in ``DistributedDataParallel``.
- **FSDP2** (``fsdp_config={"version": 2}``, the transformers default): the teacher is *sharded* with
  ``fully_shard`` over the same mesh as the student: one FSDP unit per ``_no_split_modules`` block (the
  transformer layers) plus the root, ``reshard_after_forward=True``, and the plugin's mixed-precision and
  CPU-offload policies. Each process keeps ``1/world_size`` of the teacher's parameters on its device (on the CPU
  with ``cpu_offload``); a layer's full weights exist only while that layer runs. The teacher is never given
  the student's auto-wrap policy (the two models may have different layer classes), and never joins
  ``accelerator._models``. ``fully_shard`` keeps module identity, so attention capture is unaffected.
- **FSDP1** (``fsdp_config={"version": 1}``, deprecated by transformers): the teacher is replicated on each
  device as under DDP; use FSDP2 to shard it.
- **DeepSpeed ZeRO-3**: the teacher becomes its own DeepSpeed inference engine, as TRL prepares reference and
  teacher models: the run's DeepSpeed config with stage 3 kept, ``optimizer``/``scheduler`` removed and the
  ``"auto"`` bucket sizes set from the teacher's hidden size, then ``deepspeed.initialize(model=teacher)``
  and ``.eval()``. Its parameters are partitioned across processes. The engine's forward runs under
  ``torch.no_grad`` rather than ``torch.inference_mode`` (ZeRO-3 gathers parameters into tensors that
  inference mode would make unusable outside it).

Combinations that cannot work raise a ``ValueError`` naming the fix (:func:`check_distributed_setup`); asking
for DeepSpeed without the package raises an ``ImportError`` naming ``pip install deepspeed``
(:func:`require_deepspeed`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from hf_attn_distill.config import deepspeed_requested, require_deepspeed

__all__ = [
    "TEACHER_PLACEMENTS",
    "check_distributed_setup",
    "deepspeed_requested",
    "prepare_teacher",
    "require_deepspeed",
    "teacher_placement",
]

TEACHER_PLACEMENTS = ("replicated", "fsdp2_sharded", "deepspeed_zero3")
"""What :func:`teacher_placement` returns: a full copy per device, ``fully_shard`` shards, a ZeRO-3 engine."""

_ZERO3_AUTO_KEYS = ("reduce_bucket_size", "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size")


def _distributed_type(accelerator) -> str:
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()


def _zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def _fsdp_version(accelerator) -> int | None:
    if _distributed_type(accelerator) != "FSDP":
        return None
    return int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1))


def teacher_placement(accelerator) -> str:
    """One of :data:`TEACHER_PLACEMENTS`: how :func:`prepare_teacher` places the teacher under ``accelerator``."""
    if _zero_stage(accelerator) == 3:
        return "deepspeed_zero3"
    if _fsdp_version(accelerator) == 2:
        return "fsdp2_sharded"
    return "replicated"


def check_distributed_setup(args: Any, accelerator) -> None:
    """Refuse combinations of ``args`` and the running ``accelerator`` that cannot work, naming the fix.

    - DeepSpeed asked for but not installed (:func:`require_deepspeed`);
    - ``fsdp`` asked for but the accelerator does not run FSDP: accelerate enables FSDP only for processes on
      accelerators (GPUs, ...); CPU processes silently fall back to DDP, which would leave student and teacher
      unsharded;
    - ``teacher_logits_cache`` with a sharded teacher (FSDP2 or ZeRO-3): the cache is built by process 0 alone,
      while a sharded teacher's forward needs every process.
    """
    require_deepspeed(args)
    xla_fsdp = (getattr(args, "fsdp_config", None) or {}).get("xla", False)  # TPU FSDP runs outside accelerate's
    if getattr(args, "fsdp", None) and not xla_fsdp and _distributed_type(accelerator) != "FSDP":
        raise ValueError(
            f"fsdp is set but the accelerator runs {_distributed_type(accelerator)}: accelerate enables FSDP only for "
            "processes on GPUs (or other accelerators); on CPU processes it falls back to DDP and nothing would be "
            "sharded. Drop fsdp/fsdp_config to train with DDP on CPU, or launch on GPUs."
        )
    placement = teacher_placement(accelerator)
    if getattr(args, "teacher_logits_cache", None) and placement != "replicated":
        raise ValueError(
            f"teacher_logits_cache with a sharded teacher ({placement}): process 0 builds the cache alone, but a "
            "sharded teacher's forward needs every process. Build the cache once in a single-process run with the "
            "same teacher_logits_cache folder (the sharded run then reuses it), or train without FSDP/ZeRO-3."
        )


def prepare_teacher(teacher: nn.Module, accelerator, args: Any = None) -> nn.Module:
    """Return ``teacher`` (frozen, in eval mode) placed for inference under ``accelerator``'s distributed mode.

    See the module docstring for what each mode does; :func:`check_distributed_setup` runs first.
    """
    check_distributed_setup(args, accelerator)
    teacher.eval().requires_grad_(False)
    placement = teacher_placement(accelerator)
    if placement == "deepspeed_zero3":
        return _deepspeed_zero3_teacher(teacher, accelerator)
    if placement == "fsdp2_sharded":
        return _fsdp2_sharded_teacher(teacher, accelerator)
    if _distributed_type(accelerator) == "FSDP":  # FSDP1: accelerate would leave the teacher where it is
        return teacher.to(accelerator.device)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def _fsdp2_sharded_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    parallelism = getattr(accelerator, "parallelism_config", None)
    if mesh is not None and parallelism is not None:
        mesh = mesh[tuple(parallelism.fsdp_dim_names)]
    offload = plugin.cpu_offload if isinstance(plugin.cpu_offload, OffloadPolicy) else OffloadPolicy()
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": True,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": offload,
    }
    blocks = set(getattr(teacher, "_no_split_modules", None) or ())
    for module in reversed(list(teacher.modules())):  # children before parents
        if module is not teacher and type(module).__name__ in blocks and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
    if not isinstance(teacher, FSDPModule):
        fully_shard(teacher, **kwargs)
    return teacher.eval()


class _NoGradForward(nn.Module):
    """Calls a DeepSpeed ``engine`` under ``torch.no_grad`` even inside ``torch.inference_mode`` (ZeRO-3 gathers
    parameters into tensors that must not be inference tensors); other attributes (``config``, ...) are the
    wrapped model's, not the engine's (whose ``config`` is the DeepSpeed config)."""

    def __init__(self, engine: nn.Module) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.engine(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "engine":
                raise
            return getattr(self.engine.module, name)


def _deepspeed_zero3_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    require_deepspeed(force=True)
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    model_config = getattr(teacher, "config", None)
    hidden = getattr(model_config, "hidden_size", None) or max(getattr(model_config, "hidden_sizes", None) or [0])
    if hidden:
        values = {
            "reduce_bucket_size": hidden * hidden,
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        }
        for key in _ZERO3_AUTO_KEYS:
            if zero.get(key, "auto") == "auto":
                zero[key] = values[key]
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return _NoGradForward(engine).eval()
