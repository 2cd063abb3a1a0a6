"""Processes without torchrun (every collective a no-op), the optimizer state keyed by name, and
Ctrl-C turned into a stop request at a step boundary. Two-process DDP / FSDP runs are in
test_train.py."""

import io
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from minidistill.distributed import (
    CtrlC,
    all_reduce,
    full_optimizer_state,
    full_params,
    grad_sync,
    init_distributed,
    load_full_optimizer_state,
    shutdown_distributed,
)


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() == (0, 1)
    assert not dist.is_initialized()
    shutdown_distributed()  # nothing to destroy: no error
    t = torch.tensor([1.5, -2.0])
    out = all_reduce(t, 1)
    assert out is t and out.tolist() == [1.5, -2.0]  # the identity, in place


class _Block:
    def __init__(self, log, i):
        self.log, self.i = log, i

    def unshard(self):
        self.log.append(("unshard", self.i))

    def reshard(self):
        self.log.append(("reshard", self.i))


def _fake_model(log):
    model = SimpleNamespace(model=SimpleNamespace(layers=[_Block(log, 0), _Block(log, 1)]))
    model.set_requires_gradient_sync = lambda on: log.append(("sync", on))
    return model


def test_full_params_and_grad_sync_touch_blocks_only_under_fsdp():
    log = []
    model = _fake_model(log)
    with full_params(model, fsdp=False):
        pass
    grad_sync(model, False, fsdp=False)
    assert log == []
    with pytest.raises(RuntimeError, match="inside"):
        with full_params(model, fsdp=True):
            log.append("body")
            raise RuntimeError("inside")
    # Every block gathered before the body and resharded after it, even when the body fails.
    assert log == [("unshard", 0), ("unshard", 1), "body", ("reshard", 0), ("reshard", 1)]
    grad_sync(model, True, fsdp=True)
    assert log[-1] == ("sync", True)


def test_optimizer_state_is_keyed_by_parameter_name_and_loads_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    opt.step()
    state = full_optimizer_state(model, opt)
    assert sorted(state["state"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert torch.equal(state["state"]["1.weight"]["exp_avg"], opt.state[model[1].weight]["exp_avg"])
    # Through a file, as a checkpoint keeps it (on the CPU the dict shares the live tensors).
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    # A fresh copy given that state takes the same next step as the original.
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.1)
    load_full_optimizer_state(twin, twin_opt, state)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def _interrupt():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the Python-level handler runs at the next bytecode boundary of the main thread


@pytest.fixture
def guard():
    """A SIGINT handler that only records, in place of Python's default one for the test: a signal
    that CtrlC failed to take fails the test instead of interrupting the whole session."""
    seen = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    yield seen
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_first_requests_a_stop_second_stops_at_once(capsys, guard):
    before = signal.getsignal(signal.SIGINT)
    with CtrlC() as stop:
        assert stop.requested is False
        _interrupt()
        assert stop.requested is True
        assert "Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)" in \
            capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            _interrupt()
    assert guard == [] and signal.getsignal(signal.SIGINT) is before  # CtrlC took both; the old handler is back
    _interrupt()
    assert guard == [signal.SIGINT]


def test_ctrl_c_outside_the_main_thread_installs_nothing():
    before, seen = signal.getsignal(signal.SIGINT), []

    def body():
        with CtrlC() as stop:
            seen.append((stop._old, signal.getsignal(signal.SIGINT)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [(None, before)] and signal.getsignal(signal.SIGINT) is before
