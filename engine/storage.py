"""Where the processes of a run keep its output directory: one disk that every node shares (a
cluster filesystem), or each node's own disk at the same path (cloud instances, Kubernetes without
a shared volume). The run finds out which as it starts, from marker files (`output_storage`).

On disks of their own, the first process of each disk (its "writer") writes that disk's copy of
every checkpoint, so that any node can resume from its own disk: a save costs each node its own
write, all at once, and nothing crosses the network but the random states (and, under FSDP, the
gathered weights and optimizer state). A disk that lacks the newest checkpoint when the run resumes
(a node replaced with an empty disk, or one killed in the middle of its save) is sent it by a
process that has it (`agreed_checkpoint`). Without torchrun there is one process and one disk.
"""
import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from engine.checkpoint import BEST, LATEST, NoCheckpoint, find_checkpoint, replace_checkpoint, saved_step
from engine.distributed import from_main, is_distributed, rank, world_size
from engine.errors import UserError
from engine.files import process_tag

log = logging.getLogger(__name__)


def local_rank() -> int:
    """This process's rank among the processes of its node (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_gathered(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] without torchrun)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@dataclass(frozen=True)
class Storage:
    """The disks that hold the output directory, each as the ranks that see it (lowest first); the
    first disk is rank 0's."""

    disks: tuple[tuple[int, ...], ...] = ((0,),)

    @property
    def shared(self) -> bool:
        return len(self.disks) == 1

    @property
    def writers(self) -> tuple[int, ...]:
        return tuple(ranks[0] for ranks in self.disks)

    def writes(self) -> bool:
        """Whether this process writes its disk's copy of the checkpoints."""
        return rank() in self.writers

    def describe(self, output_dir: Path) -> str:
        if self.shared:
            return f"output directory {output_dir} shared by all {world_size()} processes: rank 0 writes the checkpoints"
        return (f"output directory {output_dir} on {len(self.disks)} disks, not shared: ranks "
                f"{', '.join(map(str, self.writers))} each write their disk's copy of every checkpoint")


def output_storage(output_dir: Path) -> Storage:
    """Find out which processes share `output_dir`: each leaves a marker file there, named with a
    token rank 0 drew for this start, and the markers a process sees are its disk's."""
    if not is_distributed():
        return Storage()
    token = from_main(secrets.token_hex(8))
    output_dir.mkdir(parents=True, exist_ok=True)
    marker = output_dir / f".node-marker-{token}-{rank()}"
    marker.touch()
    dist.barrier()
    seen = tuple(sorted(int(path.name.rsplit("-", 1)[1]) for path in output_dir.glob(f".node-marker-{token}-*")))
    dist.barrier()  # every process has looked before any marker goes
    marker.unlink()
    return Storage(tuple(sorted(set(all_gathered(seen)))))


def once_per_node(work: Callable):
    """`work()`, which builds a cache (tokens, a dequantized GGUF model) or finds it built: first on
    rank 0, then on the first process of every other node (which finds rank 0's cache if the disk is
    shared), then on the rest, which find their node's. Returns what `work` returned."""
    if not is_distributed():
        return work()
    turn = 0 if rank() == 0 else 1 if local_rank() == 0 else 2
    result = None
    for current in range(3):
        if turn == current:
            result = work()
        dist.barrier()
    return result


def agreed_checkpoint(output_dir: Path, task: str, storage: Storage) -> Path | None:
    """The latest/ checkpoint every process resumes from: the newest of the run's disks, sent, with
    the best/ beside it, to the disks that lack it; None when no disk holds one. A disk's damaged
    checkpoint with no intact version stops the run with its error, as in one process."""
    try:
        found = find_checkpoint(output_dir, LATEST, task)
    except NoCheckpoint:
        found = None
    steps = all_gathered(None if found is None else saved_step(found))
    held = [step for step in steps if step is not None]
    if not held:
        return None
    newest = max(held)
    source = steps.index(newest)
    for writer in storage.writers:
        if steps[writer] != newest:
            if rank() == source:
                log.warning("%s on rank %d's disk holds %s: sending it step %d's", output_dir / LATEST, writer,
                            "nothing" if steps[writer] is None else f"step {steps[writer]}", newest)
            _send_checkpoints(output_dir, found, task, source, writer)
    if is_distributed():
        dist.barrier()  # each disk's copy is in place before its other processes read it
    return found if steps[rank()] == newest else find_checkpoint(output_dir, LATEST, task)


CHUNK_BYTES = 64 * 2**20  # of a file sent at a time: what the receiver holds in memory


def _send_checkpoints(output_dir: Path, latest: Path | None, task: str, source: int, destination: int) -> None:
    """Copy the source's latest/ (from `latest`, perhaps latest.old) and best/ into the destination's
    `output_dir`, over the process group: every file in chunks, each checkpoint then published as a
    save publishes it."""
    if rank() == source:
        checkpoints = {LATEST: latest}
        with contextlib.suppress(UserError):  # a run may have no intact best/ yet
            checkpoints[BEST] = find_checkpoint(output_dir, BEST, task)
        files = {name: sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
                 for name, directory in checkpoints.items()}
        dist.send_object_list([files], dst=destination)
        for name, relatives in files.items():
            for relative in relatives:
                with open(checkpoints[name] / relative, "rb") as f:
                    while chunk := f.read(CHUNK_BYTES):
                        dist.send_object_list([chunk], dst=destination)
                dist.send_object_list([None], dst=destination)
    elif rank() == destination:
        listing, chunk = [None], [None]
        dist.recv_object_list(listing, src=source)
        for name, relatives in listing[0].items():
            temporary = output_dir / f"{name}.{process_tag()}.received"
            shutil.rmtree(temporary, ignore_errors=True)
            for relative in relatives:
                path = temporary / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    while True:
                        dist.recv_object_list(chunk, src=source)
                        if chunk[0] is None:
                            break
                        f.write(chunk[0])
            replace_checkpoint(temporary, output_dir / name)


def from_main_to_writers(obj, storage: Storage):
    """Rank 0's `obj` (a gathered state dict) on every writer; None on the other processes."""
    if storage.shared:
        return obj if rank() == 0 else None
    box = [obj]
    for writer in storage.writers[1:]:
        if rank() == 0:
            dist.send_object_list(box, dst=writer)
        elif rank() == writer:
            dist.recv_object_list(box, src=0)
    return box[0] if storage.writes() else None


RESUME_AUTO = "auto"  # --resume's value that starts fresh where there is no checkpoint yet


def resume_point(resume: str | None, output_dir: Path, task: str, storage: Storage) -> Path | None:
    """The checkpoint --resume names: a checkpoint or run directory given by path, or the run's own
    latest/ (`--resume`, an error when there is none; `--resume auto`, None when there is none)."""
    if resume is None:
        return None
    if resume not in (LATEST, RESUME_AUTO):
        return find_checkpoint(Path(resume), LATEST, task)
    found = agreed_checkpoint(output_dir, task, storage)
    if found is None and resume == LATEST:
        find_checkpoint(output_dir, LATEST, task)  # raises its NoCheckpoint error
    if found is None:
        log.info("--resume auto: no checkpoint in %s yet: starting fresh", output_dir)
    return found
