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
import random

import numpy as np
import torch

from engine.errors import UserError


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
    """TF32 for fp32 matrix products and convolutions on CUDA (Ampere and later): about 8x the fp32
    rate with a 10-bit mantissa, the precision of bf16 autocast's inputs, with fp32 accumulation.
    It matters where fp32 matmuls remain: --precision fp32, and the fp32 islands of autocast."""
    if device.type == "cuda":
        # The classic switches: torch 2.13's finer `fp32_precision` settings would make its classic
        # getters, which torch.compile still calls, raise for mixing the two interfaces.
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def cpu_has_fast_bf16() -> bool:
    """AMX tiles: bf16 matmuls then run several times faster than fp32.

    AVX512-BF16 alone is not enough: on a 2-core AVX512-BF16 Xeon without AMX, bf16 autocast
    measured 1.3x slower than fp32 for MiniLM training and 1.4x slower for inference.
    """
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def pick_precision(requested: str, device: torch.device) -> str:
    """Resolve `auto`: bf16 where the hardware runs it fast, fp16 on GPUs without bf16, else fp32."""
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise UserError("--precision fp16 needs a CUDA device (use bf16 or fp32 here)")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass; the weights and optimizer stay in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        raise UserError(f"out of memory on {device}{free} {what}: {remedies}") from None
