"""Where the model runs and in which precision: every choice that depends on the device.

The rest of the code never asks `torch.cuda` anything (a test checks): it asks here, so that
the CUDA path is one short file to read, and a test can stand in for a GPU by mocking
`torch.cuda` in this module alone. What is chosen here:

- the device (CUDA, Apple MPS or CPU) and, under torchrun, each process's GPU and backend;
- the precision (bf16, fp16 with a grad scaler, fp32), autocast, and TF32 for fp32 matmuls;
- how batches reach the device (pinned memory, copies that do not wait);
- the random state a checkpoint keeps, and the memory statistics a run reports;
- what an out-of-memory error tells the user.
"""
import contextlib
import ctypes
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.settings import setting

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class DeviceSettings:
    """device and precision"""

    device: str = setting("auto", "auto (CUDA, else Apple MPS, else CPU), or cpu, cuda, cuda:1, mps")
    precision: str = setting("auto", "autocast precision; auto: bf16 on GPUs that support it, fp16 on older GPUs; on "
                                     "a CPU, bf16 where it was measured faster than fp32 on that kind of CPU (the log "
                                     "says why)", choices=PRECISIONS)


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise UserError(f"--device {requested!r} is not a device name ({error})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"numbered from 0")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {requested}: Apple MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def process_device(device: torch.device, local_rank: int) -> torch.device:
    """Under torchrun: each process on its own GPU, cuda:LOCAL_RANK, made the current one (so that
    kernels and NCCL buffers land there); processes on the CPU share it."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"torchrun started process {local_rank} of this machine, which has only "
                        f"{torch.cuda.device_count()} GPU(s): give --nproc_per_node {torch.cuda.device_count()} or less")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def process_group_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def collective_device(backend: str) -> torch.device:
    """Where a collective's tensors must be: NCCL reduces on the current GPU, gloo on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def configure_device(device: torch.device) -> None:
    """On the CPU, `keep_freed_memory`. On CUDA (Ampere and later), TF32 for fp32 matrix products
    and convolutions: about 8x the fp32 rate with a 10-bit mantissa, the precision of bf16
    autocast's inputs, with fp32 accumulation. It matters where fp32 matmuls remain: --precision
    fp32, and the fp32 islands of autocast."""
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        # The classic switches: torch 2.13's finer `fp32_precision` settings would make its classic
        # getters, which torch.compile still calls, raise for mixing the two interfaces.
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True



def keep_freed_memory() -> bool:
    """Make glibc's malloc keep large freed blocks in the process instead of returning them to the
    system; False where the C library is not glibc.

    By default glibc maps every block over 32 MB afresh and unmaps it when freed, and gives the
    top of its heap back past a threshold. A training step frees and reallocates the same large
    tensors every step (a word-embedding gradient, activations, attention gradients), so each time
    the kernel faults in and zeroes their pages again: `fill_` of MiniLM's 30522 x 384 embedding
    gradient took 43 ms, and the fp32 MiniLM step took 9-18% less time with this on an AMD EPYC,
    for 2% more peak memory over 10 steps. Memory the process has freed is not given back."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers, from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def cpuinfo_field(name: str) -> str | None:
    """The first value of a /proc/cpuinfo field (None off Linux or when the field is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


AMX, AMD_BF16, INTEL_BF16, NO_BF16 = ("CPU with AMX", "AMD CPU with AVX512-BF16", "Intel CPU with AVX512-BF16 and no AMX",
                                      "CPU without bf16 instructions")
# bf16 autocast against fp32 on each kind of CPU, as measured by bench/profile_step.py (2 cores, train.py's
# step): --precision auto takes bf16 only where it was measured faster, for training and evaluation.
CPU_BF16_MEASURED = {
    AMX: (False, "bf16 trained at 0.97x fp32's speed on an AMX Xeon (MiniLM QA, before fp32 attention and mask "
                 "dropout); --precision bf16 to try it"),
    AMD_BF16: (True, "bf16 steps ran 1.86x (MiniLM QA) and 1.82x (SmolLM2 CLM) as fast as fp32 on an AMD EPYC, "
                     "evaluation 1.6x and 2.0x"),
    INTEL_BF16: (False, "bf16 trained at 0.77x fp32's speed on a Xeon without AMX (MiniLM QA, before fp32 attention "
                        "and mask dropout)"),
    NO_BF16: (False, "bf16 is emulated there"),
}


def cpu_kind() -> str:
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return AMX
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return AMD_BF16 if cpuinfo_field("vendor_id") == "AuthenticAMD" else INTEL_BF16
    return NO_BF16


def pick_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, why): `auto` is bf16 on GPUs that have it, fp16 on older GPUs, and on a CPU bf16
    only where it was measured faster than fp32 on that kind of CPU."""
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise UserError("--precision fp16 needs a CUDA device (use bf16 or fp32 here)")
        return requested, "as requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU supports bf16"
        return "fp16", "the GPU has no bf16; fp16 with loss scaling"
    if device.type != "cpu":
        return "fp32", f"autocast is not tuned for {device.type}"
    kind = cpu_kind()
    faster, measured = CPU_BF16_MEASURED[kind]
    return ("bf16" if faster else "fp32"), f"{kind}: {measured}"


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass; the weights and optimizer stay in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def autocast_for_pass(model: torch.nn.Module, device: torch.device, precision: str):
    """autocast around a whole evaluation or generation pass, casting each weight once for it.

    autocast keeps its casts of tensors that require grad until its outermost context exits, so one
    context around the pass casts each weight once instead of at every forward pass (at every
    generated token). Frozen weights (LoRA's base model, frozen layers) are marked as requiring
    grad for the pass, which computes no gradients, so that their casts are kept too: autocast
    caches only those that require grad. Generating 24 tokens for 4 prompts with a frozen
    SmolLM2-135M in bf16 took 2.35-2.62 s against 2.68-3.15 s with autocast alone; MiniLM's
    evaluation, whose weights are trainable and cast once per batch of 64 windows anyway, showed no
    difference (AMD EPYC, 2 cores)."""
    if precision == "fp32":
        yield
        return
    frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad]
    try:
        for parameter in frozen:
            parameter.requires_grad_(True)
        with torch.no_grad(), autocast(device, precision):
            yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler then
    passes everything through). With the fused AdamW the scaler hands its inf check and scale to
    the optimizer's kernel as tensors, so a scaled step reads nothing back to the host."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def pins_memory(device: torch.device) -> bool:
    """Batches are copied to a CUDA GPU from page-locked memory: only such a copy runs alongside
    the GPU's work instead of waiting for it."""
    return device.type == "cuda"


def pinned(batch: dict, device: torch.device) -> dict:
    """The batch in page-locked memory when the device copies from it (see `pins_memory`). Called
    from the prefetch thread too, whose current GPU would be GPU 0: pinning there would open a
    CUDA context on GPU 0 for every torchrun process."""
    if not pins_memory(device):
        return batch
    with torch.cuda.device(device):
        return {key: value.pin_memory() for key, value in batch.items()}


def to_device(batch: dict, device: torch.device) -> dict:
    """Copies that do not make the host wait for the device (from pinned memory on CUDA)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def host_values(*tensors: torch.Tensor) -> list[float]:
    """Scalars from the device, in one copy: each read makes the host wait until the device has
    finished everything queued before it, so a training step reads once, at its end."""
    return torch.stack([t.detach().float() for t in tensors]).cpu().tolist()


def rng_state(device: torch.device) -> dict:
    """Every random generator a run draws from: Python, NumPy, torch's CPU generator and, on
    CUDA, the GPUs' (as CPU tensors, which is how torch sets them back)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(position),
        "numpy_gauss": [int(has_gauss), float(cached_gaussian)],  # the second of a pair of normal draws
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state.get("numpy_gauss", (0, 0.0))))
    torch.set_rng_state(state["torch"])
    # A state saved on as many GPUs as this machine has; otherwise each GPU keeps its seeded state.
    if device.type == "cuda" and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def forked_rng(device: torch.device):
    """Random draws inside leave the run's random streams (CPU, and the GPU's) as they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory tensors held on the GPU during the run (None off CUDA: the process's peak
    resident memory says it there)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@contextlib.contextmanager
def out_of_memory_as_error(device: torch.device, what: str, remedies: str):
    """An out-of-memory error on the device becomes one line: `what` failed (with its batch
    shape), and `remedies`, the settings that lower the memory it needs."""
    try:
        yield
    except torch.OutOfMemoryError:
        free = ""
        if device.type == "cuda":
            with contextlib.suppress(RuntimeError):  # the line matters more than this detail
                free_bytes, total_bytes = torch.cuda.mem_get_info(device)
                free = f" ({free_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB free)"
        raise OutOfMemory(f"out of memory on {device}{free} {what}: {remedies}") from None


class OutOfMemory(UserError):
    """The device ran out of memory: a --dry-run reports it as its verdict."""


def memory_mb(device: torch.device) -> dict:
    """The run's peak memory and what the device has, in MB: on CUDA the allocator's peak and the GPU's
    free and total memory; on the CPU the process's peak resident memory, its current one, and the
    machine's available and total memory (/proc/meminfo)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "measured": "CUDA allocator peak",
                "free_mb": free / 2**20, "total_mb": total / 2**20}
    import resource

    memory = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "measured": "peak resident memory of the process"}
    with contextlib.suppress(OSError, ValueError):
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        memory["free_mb"] = int(fields["MemAvailable"].split()[0]) / 1024
        memory["total_mb"] = int(fields["MemTotal"].split()[0]) / 1024
        memory["resident_mb"] = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return memory

