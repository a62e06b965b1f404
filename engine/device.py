"""Where the model runs and in which precision: every choice that depends on the device.

The rest of the code never asks `torch.cuda` anything (a test checks): it asks here, so that
the CUDA path is one short file to read, and a test can stand in for a GPU by mocking
`torch.cuda` in this module alone. What is chosen here:

- the device (CUDA, Apple MPS or CPU) and, under torchrun, each process's GPU and backend;
- the precision (bf16, fp16 with a grad scaler, fp32), autocast, and TF32 for fp32 matmuls;
- how batches reach the device (pinned memory, copies that do not wait);
- the random state a checkpoint keeps, and the memory statistics a run reports;
- what an out-of-memory error tells the user;
- the device's peak FLOP/s in the precision of the run, the denominator of MFU.
"""
import contextlib
import ctypes
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.files import atomic_write_text
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
    """The run's peak memory, and the most it could have (`available_mb`: what it holds plus what is
    free), in MB: on CUDA the allocator's peak, and the GPU's free memory plus what torch reserved; on
    the CPU the process's peak resident memory, and the machine's available memory (/proc/meminfo)
    plus the process's resident memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"peak_memory_mb": peak_memory_mb(device), "measured": "CUDA allocator peak",
                "available_mb": (free + torch.cuda.memory_reserved(device)) / 2**20, "total_mb": total / 2**20}
    import resource

    memory = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "measured": "peak resident memory of the process"}
    with contextlib.suppress(OSError, ValueError, KeyError):
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        memory["available_mb"] = int(fields["MemAvailable"].split()[0]) / 1024 + resident / 2**20
        memory["total_mb"] = int(fields["MemTotal"].split()[0]) / 1024
    return memory


# Dense (no 2:4 sparsity) peak TFLOP/s of each GPU's tensor cores (fp32: its CUDA cores), from NVIDIA's
# datasheets, whose tensor-core figures are given with sparsity: halved here. bf16 and fp16 are with fp32
# accumulation, as autocast runs them. None: the GPU has no such units (Volta and Turing have neither bf16
# nor TF32). Matched to torch.cuda.get_device_name by substring, the longest match winning ("A100" over "A10").
GPU_PEAK_TFLOPS = {
    # H100 datasheet: SXM 1,979* bf16/fp16, 989* TF32, 67 fp32; PCIe 1,513*, 756*, 51; NVL 1,671*, 835*, 60
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # H200 datasheet: SXM as the H100 SXM (the same GH100 chip, more memory); NVL as the H100 NVL
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # A100 datasheet (40 and 80 GB, SXM and PCIe): 312 bf16/fp16, 156 TF32, 19.5 fp32
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    # A10 datasheet: 250* bf16/fp16, 125* TF32, 31.2 fp32. A10G (AWS G5): no NVIDIA datasheet; AWS's
    # figures as Baseten's A10-vs-A10G comparison gives them: 70 bf16/fp16, 35 TF32, 35 fp32
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 35.0},
    # L4 datasheet: 242* bf16/fp16, 120* TF32, 30.3 fp32; L40S: 733*, 366*, 91.6; L40: 362.1*, 181*, 90.5
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5},
    # Ada (RTX 4090) and Ampere GA102 (RTX 3090) whitepapers: GeForce tensor cores run fp16/bf16 with fp32
    # accumulation at half the rate of fp16 accumulation
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    # V100 datasheet: SXM2 125 fp16, 15.7 fp32 (PCIe: 112, 14); T4 datasheet: 65 fp16 (mixed), 8.1 fp32
    "V100": {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7},
    "T4": {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1},
}
PEAK_FLOPS_CACHE_VARIABLE = "FINETUNE_PEAK_FLOPS_CACHE"
CPU_MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(FLOP/s, where the number comes from) of the device's matrix products in `precision` (bf16,
    fp16 or fp32, as run: fp32 matmuls run in TF32 on CUDA once `configure_device` allowed it); None,
    with the reason, where it is unknown.

    On CUDA, the datasheet's dense peak of the GPU (`GPU_PEAK_TFLOPS`). On the CPU, measured: a square
    `torch.mm` in the precision's dtype with this process's threads, the best of a few calls after a
    warm-up, about a second; kept in a JSON file (default ~/.cache/finetune/peak_flops.json,
    $FINETUNE_PEAK_FLOPS_CACHE), by CPU model, torch version, thread count and dtype, so that later
    runs on such a machine read it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        matches = [known for known in GPU_PEAK_TFLOPS if known in name]
        if not matches:
            return None, f"no datasheet peak known for {name}"
        known = max(matches, key=len)
        peaks = GPU_PEAK_TFLOPS[known]
        unit = precision
        if precision == "fp32" and peaks["tf32"] and torch.get_float32_matmul_precision() != "highest":
            unit = "tf32"
        if peaks[unit] is None:
            return None, f"{name} has no {unit} tensor cores"
        return peaks[unit] * 1e12, f"NVIDIA's figure for the {known}, dense {unit}"
    if device.type == "cpu":
        return cpu_peak_flops(CPU_MATMUL_DTYPES[precision])
    return None, f"no peak known for {device.type} devices"


def peak_flops_cache() -> Path:
    return Path(os.environ.get(PEAK_FLOPS_CACHE_VARIABLE) or Path.home() / ".cache" / "finetune" / "peak_flops.json")


def cpu_peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """The measured matmul peak of this CPU, from the cache file when it holds one for this machine.
    Processes that want it at once (torchrun's, parallel tests) take turns on a lock beside the file:
    the first measures, on a CPU no other of them is loading, and the others read its figure, so that
    every process of the machine divides by the same peak."""
    import fcntl

    threads = torch.get_num_threads()
    cpu = cpuinfo_field("model name") or platform.machine()
    key = f"{cpu} | torch {torch.__version__} | {threads} threads | {dtype}"
    how = f"square torch.mm in {str(dtype).removeprefix('torch.')} on {threads} thread(s) of the {cpu}"
    path = peak_flops_cache()
    with contextlib.ExitStack() as turn:
        with contextlib.suppress(OSError):  # without a writable cache directory, each process measures
            path.parent.mkdir(parents=True, exist_ok=True)
            fcntl.flock(turn.enter_context(open(path.with_name(path.name + ".lock"), "a")), fcntl.LOCK_EX)
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measured again
            cached = {}
        if key in cached:
            return cached[key], f"measured: {how} (cached in {path})"
        cached[key] = measured_matmul_flops(dtype)
        with contextlib.suppress(OSError):  # the measurement stands without the cache
            atomic_write_text(path, json.dumps(cached, indent=1, sort_keys=True))
    return cached[key], f"measured: {how}"


def measured_matmul_flops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of the fastest square `torch.mm` of about `seconds` of calls (at least 3). The size doubles
    from 256 while a call takes under 50 ms, up to 2048: a CPU that emulates the dtype is measured on
    smaller matrices in the same time. The fastest call, not the median: on a shared machine the
    median moves by a third."""
    def call_seconds(a, b) -> float:
        started = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - started

    size = 256
    generator = torch.Generator().manual_seed(0)  # a run's random stream must not depend on whether it measured
    while True:  # also the warm-up
        a, b = (torch.randn(size, size, dtype=dtype, generator=generator) for _ in range(2))
        if call_seconds(a, b) > 0.05 or size == 2048:
            break
        size *= 2
    timings, deadline = [], time.perf_counter() + seconds
    while len(timings) < 3 or time.perf_counter() < deadline:
        timings.append(call_seconds(a, b))
    return 2 * size**3 / min(timings)
