"""Several processes under torchrun: the process group, each process's device, DDP or FSDP2
wrapping, the few collectives training and evaluation need, and one error report for the whole job.

Without torchrun (plain `python train.py`) there is no process group: every function here then
acts as for a single process (rank 0 of 1) and costs nothing.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from engine.device import collective_device, pick_device, process_device, process_group_backend
from engine.errors import UserError


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 alone writes logs, progress bars, TensorBoard, predictions, results and checkpoints."""
    return rank() == 0


def init_processes(requested_device: str) -> torch.device:
    """The device of this process; under torchrun, also join the process group (NCCL on CUDA,
    gloo on CPU), each process on its LOCAL_RANK device."""
    device = pick_device(requested_device)
    if not launched_by_torchrun():
        return device
    if device.type == "mps":
        raise UserError("torchrun with Apple MPS is not supported: use --device cpu")
    if device.type == "cuda" and device.index is not None:
        raise UserError(f"--device {requested_device}: under torchrun each process uses cuda:LOCAL_RANK; "
                        "give --device cuda (or auto)")
    device = process_device(device, int(os.environ["LOCAL_RANK"]))
    backend = process_group_backend(device)
    # The store outlives process groups: torchrun --max-restarts starts the workers again on the store
    # of their first start, and --seeds joins a new group for each seed in the same processes. Where an
    # earlier group's addresses are still found, gloo connects to closed ports: each start, and each
    # group within it, keeps its keys under a prefix of its own.
    store, process_rank, processes = next(dist.rendezvous("env://"))
    start = f"start-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    group = store.add(f"{start}/groups-joined-by-rank-{process_rank}", 1)  # every rank joins the same groups
    store = dist.PrefixStore(f"{start}/group-{group}", store)
    dist.init_process_group(backend, store=store, rank=process_rank, world_size=processes,
                            device_id=device if backend == "nccl" else None)
    return device


def close_processes() -> None:
    if is_distributed():
        dist.barrier()  # no process tears the group down while another still uses it
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, device: torch.device, fsdp: bool, blocks: list[torch.nn.Module],
               root: torch.nn.Module) -> torch.nn.Module:
    """DDP (every process holds the whole model; gradients are all-reduced) or, with `fsdp`, FSDP2:
    each transformer block, then `root` (the model that owns embeddings and head), is sharded
    across the processes: weights, gradients and optimizer state. Returns what the loop calls."""
    if not is_distributed():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for block in blocks:
            fully_shard(block)
        fully_shard(root)
        # Generation calls parts of the model directly (T5's encoder), not through the root's
        # forward that gathers the root's own weights (the shared embeddings): make it a forward.
        if hasattr(root, "generate"):
            register_fsdp_forward_method(root, "generate")
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, for evaluation and saving: without DDP's wrapper (FSDP2 wraps in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(sharded_modules(model))


def sharded_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    if not is_distributed():
        return []  # FSDP needs a process group; importing it takes a second that predict.py should not pay
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a tensor FSDP sharded (a DTensor), or the tensor itself."""
    if not is_distributed():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Synchronise gradients in this backward pass only when `enabled` (the last micro-batch of an
    optimizer step): accumulation micro-steps stay local, one all-reduce per step."""
    if isinstance(model, DistributedDataParallel):
        with contextlib.nullcontext() if enabled else model.no_sync():
            yield
        return
    for module in sharded_modules(model):  # FSDP2 flags each sharded module
        module.set_requires_gradient_sync(enabled, recurse=False)
    yield


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm, and return it as a tensor on the device (reading it would
    make the host wait); under FSDP the norm is computed over all shards."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if is_sharded(model):  # a DTensor: its value needs every shard
        norm = norm.full_tensor()
    return norm


def held_state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """MB of weights, their gradients (one per trainable weight, during a step) and optimizer state
    that this process holds: the part of its memory that FSDP divides among the processes."""
    def local_bytes(tensor: torch.Tensor) -> int:
        return local_part(tensor).nbytes

    weights = sum(local_bytes(p) for p in model.parameters())
    gradients = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    moments = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return (weights + gradients + moments) / 2**20


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all processes, left on the device: nothing waits for it
    until its value is read. `tensor` must be on the collective's device: the GPU for NCCL, the CPU for gloo."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def targets_over_ranks(count: int) -> int | torch.Tensor:
    """A count summed over all processes: the number itself without torchrun; under it a 0-dim
    tensor on the collective's device (the GPU for NCCL), made and reduced without the host waiting
    for the device."""
    if not is_distributed():
        return count
    tensor = torch.empty((), dtype=torch.float32, device=collective_device(dist.get_backend())).fill_(count)
    return sum_over_ranks(tensor)


def gather_to_main(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others ([obj] without torchrun)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def from_main(obj):
    """Rank 0's `obj`, on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_indices(count: int, model: torch.nn.Module) -> list[int]:
    """This process's share of `count` evaluation batches: every world_size-th one, from its rank,
    so each batch is the same as in a one-process evaluation. A sharded (FSDP) model gathers its
    weights in every forward pass, so all processes must run as many: shorter shares are padded
    with repeats, whose results are identical and overwrite nothing new."""
    share = list(range(rank(), count, world_size()))
    if is_sharded(model):
        longest = -(-count // world_size())
        share += [share[0] if share else 0] * (longest - len(share))
    return share


def full_model_state(model: torch.nn.Module) -> dict | None:
    """A sharded model's whole state dict, gathered to rank 0 (every process must call this);
    None for an unsharded model, whose own state dict is already whole."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied weight (LM head = embeddings) comes back under each of its names, as separate copies;
    # keep its first name only, as the model's own state dict and save_pretrained do.
    first_names = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first_names
    return {name: value for name, value in state.items() if name not in tied}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state to save (every process must call this). Sharded: gathered to rank 0 as
    a full state dict keyed by parameter names, so any process count can load it."""
    if not is_sharded(model):
        return optimizer.state_dict()
    if not optimizer.state:
        # Before the first step there is nothing to save; and torch.distributed.checkpoint would
        # create the state with a zero-gradient step, which counts as one in AdamW's bias correction.
        return {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    if not state:  # saved before the first step
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
