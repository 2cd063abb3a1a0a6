"""CountSyncs: a dispatch mode that records the ops whose result the host must wait for (the
trainer, model and loss tests assert that a step runs none)."""

from __future__ import annotations

import traceback

from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must wait for (data-dependent values or shapes).
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten.item")


class CountSyncs(TorchDispatchMode):
    """Records the sync ops run, with the line of minidistill that ran them. AdamW's own step
    counter is read on the host by design (it lives on the CPU even when training on a GPU),
    so ops called from torch.optim are not counted."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(name.startswith(op) for op in SYNC_OPS):
            stack = traceback.extract_stack()
            if not any("torch/optim/" in f.filename for f in stack):
                ours = [f for f in stack if "/minidistill/" in f.filename]
                self.seen.append(f"{name} at {ours[-1].filename.split('/')[-1]}:{ours[-1].lineno}" if ours else name)
        return func(*args, **(kwargs or {}))
