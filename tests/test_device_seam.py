"""The device seam (engine/device.py), and its torchrun callers, make a CUDA machine's choices.

`torch.cuda` is mocked (function by function, with monkeypatch, so nothing leaks into other tests)
to stand in for a GPU, and each test checks what the seam then decides: the device, each torchrun
process's GPU and its NCCL backend, bf16/fp16 and the grad scaler, TF32, the CUDA generators in
the saved random state, peak memory, pinned batches, the out-of-memory line and the peak
FLOP/s (a GPU's from its datasheet, the CPU's measured once per machine). The last tests
prove that no other file of the project asks `torch.cuda` anything, so that these mocks cover
every device-dependent choice.

What mocks cannot prove (that CUDA's own calls accept these arguments and behave as assumed) is
run for real by bench/gpu_check.sh, on a machine with a GPU.
"""
import io
import json
import random
import re
import resource
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.device as seam
from engine.distributed import init_processes
from conftest import one_line
from engine.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CPU, CUDA, CUDA0, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 0), torch.device("mps")
GiB = 2**30


def recorder(result=None):
    """A stand-in function that returns `result` and keeps the arguments of each call in `.calls`."""
    def fake(*args, **kwargs):
        fake.calls.append(args if not kwargs else (*args, kwargs))
        return result

    fake.calls = []
    return fake


@pytest.fixture
def gpu(monkeypatch):
    """A machine with two CUDA GPUs, as far as `torch.cuda` says. Returns a namespace of the recorders."""
    fakes = {
        "is_available": recorder(True),
        "device_count": recorder(2),
        "set_device": recorder(),
        "current_device": recorder(1),
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    return type("Gpu", (), fakes)


# --- 1. The device ---

def test_auto_picks_cuda_when_available(gpu):
    assert seam.pick_device("auto") == CUDA


def test_cuda_requested_without_cuda_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # so on a GPU machine too
    with pytest.raises(UserError) as error:
        seam.pick_device("cuda")
    one_line(error, "--device cuda", "CUDA is not available")


def test_a_gpu_the_machine_lacks_is_a_user_error(gpu):
    with pytest.raises(UserError) as error:
        seam.pick_device("cuda:5")
    one_line(error, "--device cuda:5", "2 GPU(s)")


def test_more_torchrun_processes_than_gpus_is_a_user_error(gpu):
    assert seam.process_device(CUDA, 1) == torch.device("cuda", 1)
    with pytest.raises(UserError) as error:
        seam.process_device(CUDA, 2)
    one_line(error, "process 2", "--nproc_per_node 2")


# --- 2. Precision and the grad scaler ---

@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert seam.pick_precision("auto", CUDA)[0] == expected


@pytest.mark.parametrize("precision, scaling", [("fp16", True), ("bf16", False), ("fp32", False)])
def test_grad_scaler_scales_fp16_only(gpu, precision, scaling):
    # GradScaler("cuda") disables itself, with a warning, where torch.cuda says CUDA is unavailable:
    # `gpu` says it is available, so this is the scaler a CUDA machine gets.
    scaler = seam.grad_scaler(CUDA, precision)
    assert scaler.is_enabled() is scaling
    assert scaler._device == "cuda"


@pytest.mark.parametrize("device", [CPU, MPS], ids=str)
def test_fp16_off_cuda_is_a_user_error(device):
    with pytest.raises(UserError) as error:
        seam.pick_precision("fp16", device)
    one_line(error, "fp16", "CUDA")


@pytest.mark.parametrize("kind, expected", [(seam.AMD_BF16, "bf16"), (seam.AMX, "fp32"), (seam.INTEL_BF16, "fp32"),
                                            (seam.NO_BF16, "fp32")])
def test_auto_precision_on_cpu_is_bf16_only_where_measured_faster(monkeypatch, kind, expected):
    monkeypatch.setattr(seam, "cpu_kind", lambda: kind)
    precision, why = seam.pick_precision("auto", CPU)
    assert precision == expected
    assert why.startswith(kind)  # the log line names the kind of CPU, then what was measured there


@pytest.mark.parametrize("amx, bf16_instructions, vendor, expected", [
    (True, True, "GenuineIntel", seam.AMX), (False, True, "AuthenticAMD", seam.AMD_BF16),
    (False, True, "GenuineIntel", seam.INTEL_BF16), (False, False, "AuthenticAMD", seam.NO_BF16)])
def test_cpu_kind_from_the_instructions_and_the_vendor(monkeypatch, amx, bf16_instructions, vendor, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_instructions)
    monkeypatch.setattr(seam, "cpuinfo_field", lambda name: vendor if name == "vendor_id" else None)
    assert seam.cpu_kind() == expected


def test_requested_precision_is_kept(monkeypatch):
    monkeypatch.setattr(seam, "cpu_kind", lambda: seam.NO_BF16)
    assert seam.pick_precision("bf16", CPU) == ("bf16", "as requested")
    assert seam.pick_precision("fp16", CUDA)[0] == "fp16"
    assert seam.pick_precision("fp32", CUDA)[0] == "fp32"


def weight_casts(model, passes: int, per_pass: bool) -> tuple[int, torch.Tensor]:
    """Casts of the model's 64 x 64 weights over `passes` forward passes, and the last output."""
    from torch.profiler import profile

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with profile(record_shapes=True) as profiler:
        if per_pass:
            with seam.autocast_for_pass(model, CPU, "bf16"):
                outputs = [model(x) for _ in range(passes)]
        else:
            with torch.no_grad():
                outputs = []
                for _ in range(passes):
                    with seam.autocast(CPU, "bf16"):
                        outputs.append(model(x))
    casts = sum(1 for e in profiler.events() if e.name == "aten::_to_copy" and e.input_shapes[:1] == [[64, 64]])
    return casts, outputs[-1]


def test_a_pass_casts_each_weight_once_frozen_ones_too():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model[0].requires_grad_(False)  # a frozen layer, as LoRA's base model
    per_batch_casts, per_batch_output = weight_casts(model, 5, per_pass=False)
    pass_casts, pass_output = weight_casts(model, 5, per_pass=True)
    assert per_batch_casts == 15 and pass_casts == 3
    assert torch.equal(per_batch_output, pass_output) and pass_output.dtype == torch.bfloat16
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, True]
    assert weight_casts(model, 2, per_pass=True)[0] == 3  # the next pass casts again: the weights may have changed


# --- 3. Under torchrun: each process's device and backend ---

@pytest.fixture
def torchrun(monkeypatch):
    """This process as rank 1 of 2 on its machine, started for the third time by torchrun
    --max-restarts; the process group's creation recorded, not done, on an in-memory store."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2"}.items():
        monkeypatch.setenv(name, value)
    init_process_group = recorder()
    init_process_group.store = torch.distributed.HashStore()
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda url: iter([(init_process_group.store, 1, 2)]))
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    return init_process_group


def process_group_call(torchrun) -> tuple[str, dict]:
    """The backend and the settings the process group was created with, its store checked: the
    keys of this start's first group go under a prefix of their own (the store outlives torchrun's
    restarts, and --seeds joins a group per seed)."""
    [(backend, settings)] = torchrun.calls
    settings.pop("store").set("address", "of this start")
    assert torchrun.store.get("start-2/group-1/address") == b"of this start"
    assert settings.pop("rank") == 1 and settings.pop("world_size") == 2
    return backend, settings


def test_torchrun_on_cuda_uses_local_rank_gpu_and_nccl(gpu, torchrun):
    device = init_processes("auto")
    assert device == torch.device("cuda", 1)
    assert gpu.set_device.calls == [(torch.device("cuda", 1),)]
    assert process_group_call(torchrun) == ("nccl", {"device_id": torch.device("cuda", 1)})


def test_torchrun_on_cpu_uses_gloo(gpu, torchrun):
    device = init_processes("cpu")
    assert device == CPU
    assert gpu.set_device.calls == []
    assert process_group_call(torchrun) == ("gloo", {"device_id": None})


def test_torchrun_with_a_numbered_gpu_is_a_user_error(gpu, torchrun):
    with pytest.raises(UserError) as error:
        init_processes("cuda:0")
    one_line(error, "--device cuda:0", "LOCAL_RANK")
    assert torchrun.calls == [] and gpu.set_device.calls == []


def test_without_torchrun_no_process_group(gpu, monkeypatch):
    init_process_group = recorder()
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_processes("auto") == CUDA
    assert init_process_group.calls == [] and gpu.set_device.calls == []


def test_collectives_run_on_the_current_gpu_with_nccl(gpu):
    assert seam.collective_device("nccl") == torch.device("cuda", 1)  # gpu.current_device says 1
    assert seam.collective_device("gloo") == CPU


# --- 4. TF32 ---

@pytest.fixture
def tf32():
    """The global TF32 switches, set to full fp32 for the test so that a change shows, and put back
    afterwards. Read through the classic interface, which torch.compile reads too: it must not raise."""
    originals = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield lambda: (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision(originals[0])
    torch.backends.cudnn.allow_tf32 = originals[1]


def test_configure_cuda_turns_tf32_on(tf32):
    seam.configure_device(CUDA)
    assert tf32() == ("high", True)  # matmuls, cuDNN convolutions
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the finer interface agrees


@pytest.mark.parametrize("device", [CPU, MPS], ids=str)
def test_configure_elsewhere_leaves_tf32_alone(tf32, device):
    seam.configure_device(device)
    assert tf32() == ("highest", False)


# --- 5. Random state ---

CUDA_STATES = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]


def as_saved(state: dict) -> dict:
    """The state as a checkpoint gives it back: through torch.save and a weights-only load."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randint(1 << 30), torch.rand(3).tolist()


@pytest.mark.parametrize("device_count, restored", [(2, True), (1, False), (3, False)])
def test_cuda_generators_saved_and_restored_on_as_many_gpus(gpu, monkeypatch, device_count, restored):
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", recorder(CUDA_STATES))
    monkeypatch.setattr(torch.cuda, "device_count", recorder(device_count))
    set_rng_state_all = recorder()
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)

    state = as_saved(seam.rng_state(CUDA))
    assert [s.tolist() for s in state["cuda"]] == [s.tolist() for s in CUDA_STATES]
    seam.restore_rng_state(state, CUDA)
    if restored:
        assert len(set_rng_state_all.calls) == 1
        (given,) = set_rng_state_all.calls[0]
        assert [s.tolist() for s in given] == [s.tolist() for s in CUDA_STATES]
    else:
        assert set_rng_state_all.calls == []


def test_cpu_state_asks_cuda_nothing(monkeypatch):
    get_rng_state_all, set_rng_state_all = recorder(CUDA_STATES), recorder()
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", get_rng_state_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    state = seam.rng_state(CPU)
    assert "cuda" not in state
    seam.restore_rng_state(state, CPU)
    assert get_rng_state_all.calls == [] and set_rng_state_all.calls == []


def test_python_numpy_torch_states_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    draws()  # somewhere into each stream, not at a seed
    state = as_saved(seam.rng_state(CPU))
    after_saving = draws()
    assert draws() != after_saving  # the streams moved on...
    seam.restore_rng_state(state, CPU)
    assert draws() == after_saving  # ...and restoring brings them back


def test_numpy_cached_gaussian_round_trips():
    np.random.seed(1)
    np.random.randn()  # legacy normals come in pairs: the second one is now cached
    state = seam.rng_state(CPU)
    after_saving = np.random.randn()
    seam.restore_rng_state(state, CPU)
    assert np.random.randn() == after_saving


# --- 6. Peak memory ---

def test_peak_memory_on_cuda_in_mb(monkeypatch):
    max_memory_allocated = recorder(1.5 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    assert seam.peak_memory_mb(CUDA0) == 1536.0
    assert max_memory_allocated.calls == [(CUDA0,)]


def test_no_peak_memory_off_cuda(monkeypatch):
    max_memory_allocated = recorder(GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    assert seam.peak_memory_mb(CPU) is None
    assert max_memory_allocated.calls == []


# --- 7. Pinned memory ---

@pytest.fixture
def pin_calls(monkeypatch):
    """Tensor.pin_memory recorded: {id of the tensor pinned: the copy it returned} (the CPU wheel cannot pin)."""
    pinned = {}

    def pin_memory(tensor, *args, **kwargs):
        pinned[id(tensor)] = tensor.clone()
        return pinned[id(tensor)]

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    return pinned


def a_batch() -> dict:
    return {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)}


def test_only_cuda_pins_memory():
    assert seam.pins_memory(CUDA) and seam.pins_memory(CUDA0)
    assert not seam.pins_memory(CPU) and not seam.pins_memory(MPS)


def test_pinned_on_cuda_pins_every_tensor(pin_calls, monkeypatch):
    """On the run's GPU, also from another thread (whose current GPU would be GPU 0)."""
    import contextlib

    current = []

    @contextlib.contextmanager
    def device(device):
        current.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    batch = a_batch()
    result = seam.pinned(batch, torch.device("cuda", 1))
    assert current == [torch.device("cuda", 1)]
    assert result.keys() == batch.keys()
    assert len(pin_calls) == len(batch)
    for key, tensor in batch.items():
        assert result[key] is pin_calls[id(tensor)], f"{key} is not the pinned copy"


@pytest.mark.parametrize("device", [CPU, MPS], ids=str)
def test_pinned_elsewhere_is_the_batch_itself(pin_calls, device):
    batch = a_batch()
    assert seam.pinned(batch, device) is batch
    assert pin_calls == {}


# --- 8. Out of memory ---

def out_of_memory(device: torch.device) -> pytest.ExceptionInfo:
    with pytest.raises(UserError) as error:
        with seam.out_of_memory_as_error(device, "training batches of 32x384", "lower --batch-size"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee the docs")
    return error


def test_out_of_memory_on_cuda_is_one_line_with_free_memory(monkeypatch):
    mem_get_info = recorder((1 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    one_line(out_of_memory(CUDA0), "cuda:0", "1.0 of 80.0 GiB free", "training batches of 32x384",
                   "lower --batch-size")
    assert mem_get_info.calls == [(CUDA0,)]


def test_out_of_memory_on_cpu_is_one_line(monkeypatch):
    mem_get_info = recorder((1 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    message = one_line(out_of_memory(CPU), "cpu", "training batches of 32x384", "lower --batch-size")
    assert "GiB" not in message and mem_get_info.calls == []


@pytest.mark.parametrize("device", [CPU, CUDA0], ids=str)
def test_other_errors_pass_through(monkeypatch, device):
    mem_get_info = recorder((1 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    other = RuntimeError("CUDA error: device-side assert triggered")  # OutOfMemoryError's base class
    with pytest.raises(RuntimeError) as error:
        with seam.out_of_memory_as_error(device, "training", "lower --batch-size"):
            raise other
    assert error.value is other and mem_get_info.calls == []


# --- 9. Peak FLOP/s, the denominator of MFU ---

H100_SXM = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("name, precision, tflops", [
    (H100_SXM, "bf16", 989.4), (H100_SXM, "fp16", 989.4), (H100_SXM, "fp32", 494.7),  # fp32 matmuls run in TF32
    ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 NVL", "bf16", 835.5), ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A100-SXM4-80GB", "fp32", 156),  # not the A10's
    ("NVIDIA A10G", "bf16", 70), ("NVIDIA A10", "bf16", 125), ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L4", "fp16", 121), ("NVIDIA GeForce RTX 4090", "bf16", 165.2), ("Tesla T4", "fp16", 65),
    ("Tesla V100-SXM2-16GB", "fp32", 15.7),  # no TF32 on Volta: plain fp32
])
def test_gpu_peak_from_the_datasheet_table(monkeypatch, tf32, name, precision, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", recorder(name))
    seam.configure_device(CUDA)  # TF32 on, as a run has it
    flops, source = seam.peak_flops(CUDA0, precision)
    assert flops == pytest.approx(tflops * 1e12)
    assert "dense" in source


def test_fp32_peak_without_tf32_is_the_fp32_one(monkeypatch, tf32):
    monkeypatch.setattr(torch.cuda, "get_device_name", recorder(H100_SXM))
    assert seam.peak_flops(CUDA0, "fp32")[0] == pytest.approx(66.9e12)  # `tf32` set matmuls to "highest"


@pytest.mark.parametrize("name, precision, reason", [
    ("NVIDIA GeForce GTX 1080", "bf16", "no datasheet peak known for NVIDIA GeForce GTX 1080"),
    ("Tesla V100-SXM2-16GB", "bf16", "Tesla V100-SXM2-16GB has no bf16 tensor cores"),
])
def test_unknown_gpu_peak_is_none_with_a_reason(monkeypatch, name, precision, reason):
    monkeypatch.setattr(torch.cuda, "get_device_name", recorder(name))
    assert seam.peak_flops(CUDA0, precision) == (None, reason)


def test_no_peak_for_mps():
    flops, reason = seam.peak_flops(MPS, "fp32")
    assert flops is None and "mps" in reason


def test_cpu_peak_is_measured_once_per_machine_and_precision(monkeypatch, tmp_path):
    cache = tmp_path / "cache" / "peak_flops.json"
    monkeypatch.setenv(seam.PEAK_FLOPS_CACHE_VARIABLE, str(cache))
    measure = recorder(1.5e11)
    monkeypatch.setattr(seam, "measured_matmul_flops", measure)
    first, measured = seam.peak_flops(CPU, "fp32")
    second, cached = seam.peak_flops(CPU, "fp32")
    assert first == second == 1.5e11 and measure.calls == [(torch.float32,)]
    assert "measured" in measured and str(cache) in cached
    seam.peak_flops(CPU, "bf16")
    assert measure.calls == [(torch.float32,), (torch.bfloat16,)]
    assert len(json.loads(cache.read_text())) == 2  # by dtype, and CPU model, torch version, threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1000)
    seam.peak_flops(CPU, "fp32")
    assert len(measure.calls) == 3  # another thread count: measured again


def test_cpu_matmul_is_measured():
    assert seam.measured_matmul_flops(torch.float32, seconds=0.05) > 1e8


# --- 10. No torch.cuda outside the seam ---

CUDA_USES = [re.compile(r"torch\.cuda"), re.compile(r"\.cuda\("), re.compile(r"from\s+torch\s+import\s+.*\bcuda\b")]
SEAM = ROOT / "engine" / "device.py"


def project_files() -> list[Path]:
    """The project's code: the scripts at the top, and every package (a folder with __init__.py)
    but tests/ and bench/; less the seam itself."""
    packages = [d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and d.name not in ("tests", "bench")]
    files = [*ROOT.glob("*.py"), *(f for package in packages for f in package.rglob("*.py"))]
    return sorted(f for f in files if f != SEAM)


def cuda_uses(files: list[Path]) -> list[str]:
    """`file:line: text` for each line of `files` that uses torch.cuda."""
    hits = []
    for file in files:
        shown = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if any(pattern.search(line) for pattern in CUDA_USES):
                hits.append(f"{shown}:{number}: {line.strip()}")
    return hits


def test_no_torch_cuda_outside_the_seam():
    files = project_files()
    names = {str(f.relative_to(ROOT)) for f in files}
    assert {"train.py", "predict.py", "engine/distributed.py", "data/batching.py", "qa/task.py"} <= names, names
    assert not any(name.startswith(("tests/", "bench/")) or name == "engine/device.py" for name in names), names
    hits = cuda_uses(files)
    assert not hits, "torch.cuda outside engine/device.py (ask the seam instead):\n" + "\n".join(hits)


def test_the_scan_finds_cuda_uses(tmp_path):
    seam_hits = cuda_uses([SEAM])
    assert len(seam_hits) >= 10, seam_hits
    assert any(hit.startswith("engine/device.py:") and "torch.cuda.set_device(device)" in hit for hit in seam_hits)
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\n\nmodel = model.cuda()\nfrom torch import cuda\n", encoding="utf-8")
    assert cuda_uses([planted]) == [f"{planted}:3: model = model.cuda()", f"{planted}:4: from torch import cuda"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_cpu_memory_is_reused_without_faulting_its_pages_in_again():
    """What a training step does to its largest tensors (MiniLM's 47 MB embedding gradient): free
    and allocate the same size again. By default glibc unmaps such a block and every new one is
    faulted in and zeroed page by page; once the process keeps freed memory it is reused."""
    def page_faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def allocate_and_fill() -> None:
        torch.empty(12 << 20).fill_(1.0)  # 48 MB: above glibc's largest automatic mmap threshold

    assert seam.keep_freed_memory()
    for _ in range(20):  # glibc settles the heap's layout over the first few
        allocate_and_fill()
    before = page_faults()
    for _ in range(5):
        allocate_and_fill()
    assert page_faults() - before < (12 << 20) * 4 // resource.getpagesize() // 10
