"""A fake accelerator, so that the GPU code paths run in a test suite without a GPU.

`fakegpu` is a second device, registered in PyTorch's PrivateUse1 slot from Python. Its tensors
come from `FakeTensorMode`: they carry a shape, a dtype and a device, and no data. Every operator
checks its inputs' devices as CUDA would, so a tensor left on the CPU (a mask, labels, an index)
raises `FakeTensorDeviceMismatchError: ... fakegpu:0 and cpu!` exactly where it would crash a GPU
user. The device's hooks say it is unavailable, so fake mode never tries to run a real kernel.

Data-dependent host reads (`.item()`, `.tolist()`, `.cpu()`) cannot be answered by tensors
without data: `HostReads` counts each one, with the line of code that made it, and answers it
with zeros, as a real device would answer with numbers. So the whole path runs through (a
training step, evaluation with its post-processing, generation), and a test can assert how often
the host waited for the device.

What fake mode cannot check: numbers (use the CPU for those), autocast (a no-op on this device),
kernels that exist only on CUDA, and pinned memory (the CPU wheel cannot pin).
"""
import contextlib
import traceback
from pathlib import Path

import pytest
import torch
import torch.utils.backend_registration as backend_registration
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from transformers.generation.utils import StopCheck

from data.batching import PadToLongest

NAME = "fakegpu"
PROJECT = Path(__file__).resolve().parent.parent
_library = None  # the autocast fallthrough registration, kept alive for the process


class _Hooks(backend_registration._DummyPrivateUse1Hook):
    def is_available(self) -> bool:  # False: FakeTensorMode never looks for a real kernel
        return False


class _Module(backend_registration._DummyBackendModule):
    def is_available(self) -> bool:
        return False

    def get_amp_supported_dtype(self):  # lets torch.autocast("fakegpu", ...) be entered
        return [torch.float16, torch.bfloat16]


def register() -> torch.device:
    """Register `fakegpu` once per process (PyTorch allows one PrivateUse1 backend); its device 0."""
    global _library
    if torch._C._get_privateuse1_backend_name() != NAME:
        backend_registration._setup_privateuseone_for_python_backend(NAME, backend_module=_Module(), hook=_Hooks())
        # No autocast kernels exist for the device: let autocast fall through (it then does nothing).
        _library = torch.library.Library("_", "IMPL")
        _library.fallback(torch.library.fallthrough_kernel, "AutocastPrivateUse1")
    return torch.device(NAME, 0)


aten = torch.ops.aten


class HostReads(TorchDispatchMode):
    """Counts the reads of device data by the host and answers them with zeros.

    A read is a scalar taken from a device tensor (`.item()`, `float(t)`, `if t:`) or a copy from
    the device to the CPU (`.cpu()`, `.tolist()`, `.numpy()` after a copy). `where` holds, for each
    read, the innermost line of the project's own code that made it."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            if _on_device(args[0]):
                self._record()
            else:  # a CPU tensor made under fake mode (a seed drawn by a DataLoader): no read of the device
                try:
                    return func(*args, **kwargs)
                except DataDependentOutputException:
                    pass
            return False if args[0].dtype == torch.bool else 0
        if func is aten._to_copy.default and _on_device(args[0]) and _is_cpu(kwargs.get("device")):
            self._record()
            with unset_fake_temporarily():
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten.copy_.default and _is_cpu(args[0].device) and _on_device(args[1]):
            self._record()
            with unset_fake_temporarily():
                return args[0].zero_()
        return func(*args, **kwargs)

    def _record(self):
        frames = [f for f in traceback.extract_stack()[:-2] if _is_project_code(f.filename)]
        self.where.append(f"{Path(frames[-1].filename).relative_to(PROJECT)}:{frames[-1].lineno}" if frames else "?")

    def count(self) -> int:
        return len(self.where)


def _on_device(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type == NAME


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _is_project_code(filename: str) -> bool:
    path = Path(filename).resolve()
    return PROJECT in path.parents and "tests" not in path.relative_to(PROJECT).parts[:1]


@contextlib.contextmanager
def on_fake_device():
    """Run the body with `fakegpu` tensors; yields the `HostReads` of the body. Build models (and
    anything else loaded from files) outside, or under `unset_fake_temporarily()`: fake mode
    cannot create a module's real weights, only move real ones to the device."""
    register()
    reads = HostReads()
    with FakeTensorMode(allow_non_fake_inputs=True), reads, pytest.MonkeyPatch.context() as patch:
        # Collating is host work on real data, which on a GPU happens before the copy to the device.
        patch.setattr(PadToLongest, "__call__", _real(PadToLongest.__call__))
        # Generation stops when the host reads that every sequence has ended; here that read has no
        # answer, so it stops after a fixed number of tokens instead.
        patch.setattr(StopCheck, "__call__", _stop_after_fixed_tokens)
        yield reads


GENERATED_TOKENS = 3


def _stop_after_fixed_tokens(check, unfinished_sequences, tokens, length) -> bool:
    check.first_length = getattr(check, "first_length", length)
    return length - check.first_length + 1 >= GENERATED_TOKENS


def _real(function):
    """`function` run outside fake mode: on real tensors, as the host runs it."""
    def outside_fake_mode(*args, **kwargs):
        with unset_fake_temporarily():
            return function(*args, **kwargs)
    return outside_fake_mode


def gradient_devices(model: torch.nn.Module) -> list[torch.device]:
    """Records the device of every gradient as it is accumulated. A custom autograd Function that
    returns a CPU gradient is not flagged by fake mode (the gradient is not an operator's input
    until AdamW reads it): this catches it where it lands."""
    devices = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(lambda p: devices.append(p.grad.device))
    return devices
