"""Processes: joining the torchrun process group, FSDP2 sharding of the blocks, the few
collective helpers the training loop needs, and Ctrl-C (a stop request every rank honours at
the same step boundary). Without torchrun the collective parts are no-ops."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over processes in place (nothing to do in a single process)."""
    if world > 1:
        dist.all_reduce(t)
    return t


def shard_blocks(model, dtype: torch.dtype, device: torch.device) -> None:
    """FSDP2: each block's parameters sharded across the processes (fully_shard moves a block
    to `device` as it shards it). Embeddings, final norm and head stay whole on every rank:
    they are frozen, and the chunked loss reads the head outside the model's forward. Mixed
    precision keeps fp32 LoRA weights and reduces gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    whole_parts = (model.model.embed_tokens, model.model.norm, model.lm_head)
    for part in whole_parts:
        part.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    kw = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for block in model.model.layers:
        fully_shard(block, **kw)
    # A root over the blocks (owning none of the whole parts) makes the blocks non-roots, which
    # reshard after every forward; a block left as its own root would stay gathered.
    whole = {p for part in whole_parts for p in part.parameters()}
    fully_shard(model, ignored_params=whole, **kw)


def grad_sync(model, on: bool, fsdp: bool) -> None:
    """FSDP: reduce-scatter gradients only on the last micro-batch of a step."""
    if fsdp:
        model.set_requires_gradient_sync(on)  # recurses into the blocks


@contextmanager
def full_params(model, fsdp: bool):
    """Inside, every parameter is whole on every rank (FSDP blocks all-gathered; a collective,
    so all ranks enter). Without FSDP it does nothing."""
    blocks = list(model.model.layers) if fsdp else []
    for b in blocks:
        b.unshard()
    try:
        yield
    finally:
        for b in blocks:
            b.reshard()


def full_optimizer_state(model, opt) -> dict:
    """The optimizer state keyed by parameter name, whole (FSDP: gathered to every rank's CPU),
    so a checkpoint resumes on any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


class CtrlC:
    """Turns the first Ctrl-C into a request that the loop honours at the next step boundary
    (save, then stop); a second Ctrl-C stops at once. Only the main thread can take signals."""

    def __init__(self):
        self.requested, self._old = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
