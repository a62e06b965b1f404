"""Checkpoints: a standard Hugging Face model directory plus a separate training-state file.

The model directory (safetensors weights, config, tokenizer) loads with `from_pretrained`; for a
LoRA run it holds the adapter in PEFT format (adapter_config.json, adapter_model.safetensors).
`training_state.pt` holds everything else a resumed run needs. It holds only tensors and plain
Python values, so it loads with `weights_only=True` (no arbitrary pickle).

A save writes a temporary directory and renames it into place: if the process dies mid-save, the
previous checkpoint is intact (at worst under the name `<dir>.old`, which `find_checkpoint` uses).
`manifest.json`, written last, lists every file with its size and sha256: loading checks it, so a
truncated, altered or missing file is named in one line instead of failing somewhere in a loader.

A power cut loses what the page cache had not yet written, and filesystems write a file's data
after a rename's metadata unless told otherwise: so every file is fsync'ed before the rename that
publishes it, the directories after it (engine/files.py), and the previous version is deleted only
once the new one is on the disk.
"""
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from engine.distributed import is_main
from engine.errors import UserError
from engine.files import fsync_path, publish

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
RUN_CONFIG = "run_config.json"  # the task settings that inference must reuse (window size, ...)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # of the checkpoint layout; raised when a change would make older code misread it
LOCK_FILE = ".lock"
LATEST, BEST = "latest", "best"  # a run directory's checkpoints: its last save (to resume from), its best evaluation's


def save_checkpoint(directory: Path, model, tokenizer, run_config: dict, training_state: dict | None = None,
                    state_dict: dict | None = None) -> None:
    """`state_dict`: the weights to write when the model's own are sharded across processes."""
    directory = Path(directory)
    temporary = directory.with_name(f"{directory.name}.tmp")
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        with saving_on_any_rank(model):
            model.save_pretrained(temporary, state_dict=state_dict)
        tokenizer.save_pretrained(temporary)
        (temporary / RUN_CONFIG).write_text(json.dumps(run_config, indent=2))
        if training_state is not None:
            torch.save(training_state, temporary / TRAINING_STATE)
        write_manifest(temporary, run_config, training_state["state"]["step"] if training_state else None)
        replace_checkpoint(temporary, directory)
    # A full disk surfaces as OSError from Python's own writes, but as RuntimeError from torch.save
    # and SafetensorError from safetensors.
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(temporary, ignore_errors=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        free = shutil.disk_usage(directory.parent).free / 2**20 if directory.parent.exists() else 0
        raise UserError(f"{directory}: cannot save the checkpoint ({reason}; {free:.0f} MB free there); the "
                        f"previous {directory.name}/ is kept") from None


@contextlib.contextmanager
def saving_on_any_rank(model):
    """Let `model.save_pretrained` write on this process: under a process group transformers writes
    on rank 0 alone, but on node-local disks each node's first process writes its disk's copy
    (engine/storage.py), and the caller decides who saves."""
    if not hasattr(model, "should_save_on_this_rank"):  # a PEFT adapter, which PEFT saves on any rank
        yield
        return
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        del model.should_save_on_this_rank


def replace_checkpoint(temporary: Path, directory: Path) -> None:
    """Publish a complete checkpoint written at `temporary` as `directory`, keeping the previous
    version as `<dir>.old` until the new one is on the disk."""
    previous = directory.with_name(f"{directory.name}.old")
    if directory.exists():
        if previous.exists():  # an earlier save was cut after its renames: keep the intact one of the two
            shutil.rmtree(previous if _intact(directory) else directory)
        if directory.exists():
            os.replace(directory, previous)
    publish(temporary, directory)
    shutil.rmtree(previous, ignore_errors=True)  # only now: the new version is on the disk


class NoCheckpoint(UserError):
    """Nothing that looks like a checkpoint where one was looked for."""


class DamagedCheckpoint(UserError):
    """A checkpoint file that is missing, short or altered: an older intact version can stand in."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, run_config: dict, step: int | None = None) -> None:
    """`step`: the optimizer steps the checkpoint's training state has taken (None: it has none)."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT_VERSION, "task": run_config.get("task"), "model_kind": run_config.get("model_kind"),
                "step": step, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _read_manifest(directory: Path, task: str | None) -> dict | None:
    """The manifest, after the checks that need no hashing: format, task, each file's presence and size."""
    path = directory / MANIFEST
    if not path.is_file():
        if (directory / RUN_CONFIG).is_file():  # written by train.py, which writes the manifest last
            raise DamagedCheckpoint(f"{directory}: incomplete checkpoint (no {MANIFEST}): its save was interrupted, or "
                                    "it was written by a version of train.py without manifests")
        return None  # a model directory from elsewhere: nothing to check it against
    try:
        manifest = json.loads(path.read_text())
        files, version = manifest["files"], manifest["format"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpoint(f"{path}: unreadable manifest ({type(error).__name__}: {error})") from None
    if version != FORMAT_VERSION:
        raise UserError(f"{directory}: checkpoint format {version}, but this version of the code reads format "
                        f"{FORMAT_VERSION}")
    if task is not None and manifest.get("task") != task:
        raise UserError(f"{directory}: a checkpoint of a --task {manifest.get('task')} run, not --task {task}")
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{file}: missing from the checkpoint (listed in its {MANIFEST})")
        if file.stat().st_size != expected["bytes"]:
            raise DamagedCheckpoint(f"{file}: {file.stat().st_size} bytes, but the checkpoint's {MANIFEST} says "
                                    f"{expected['bytes']}: the file is truncated or was replaced")
    return manifest


@contextlib.contextmanager
def verified_checkpoint(directory: Path, task: str | None = None):
    """Check a checkpoint against its manifest while the body loads it.

    The cheap checks (format, task, sizes) run first; the sha256 of every file runs in a thread
    alongside the loading (hashing releases the GIL), so the check costs what hashing takes beyond
    the load (SmolLM2-135M: +0.45 s, bench/results/checkpoint_verify.md). A failure inside the body
    is replaced by the damaged file's name when a hash differs.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory, task)
    if manifest is None:
        yield
        return
    with ThreadPoolExecutor(1) as pool:
        digests = pool.submit(_digests, directory, manifest)
        try:
            yield
        except Exception:
            _compare_digests(directory, manifest, digests.result())
            raise
        _compare_digests(directory, manifest, digests.result())


def _digests(directory: Path, manifest: dict) -> dict:
    return {name: file_sha256(directory / name) for name in manifest["files"]}


def _check_in_full(directory: Path, task: str | None) -> None:
    """All of `verified_checkpoint`'s checks, before anything is loaded."""
    manifest = _read_manifest(directory, task)
    if manifest is not None:
        _compare_digests(directory, manifest, _digests(directory, manifest))


def _intact(directory: Path) -> bool:
    try:
        _check_in_full(directory, None)
    except UserError:
        return False
    return True


def _compare_digests(directory: Path, manifest: dict, digests: dict) -> None:
    for name, expected in manifest["files"].items():
        if digests[name] != expected["sha256"]:
            raise DamagedCheckpoint(f"{directory / name}: its content differs from the checkpoint's {MANIFEST} "
                                    "(sha256): the file was altered or damaged")


@contextlib.contextmanager
def output_directory_lock(directory: Path):
    """Hold OUTPUT_DIR/.lock for the whole run, so that a second run there stops at once instead of
    overwriting the first one's checkpoints. The kernel releases the lock when its process dies,
    however it dies, so a killed run never leaves it stuck. POSIX file locks (fcntl)."""
    import fcntl

    path = Path(directory) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a+")
        fsync_path(path.parent.parent)  # a new output directory's name, before checkpoints are published in it
    except OSError as error:
        raise UserError(f"{directory}: cannot write to the output directory ({error.strerror or error})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            raise UserError(f"{directory}: another training run (process {owner}) is using this output directory; "
                            "wait for it to finish or give another --output-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def find_checkpoint(directory: Path, in_run_directory: str, task: str | None = None) -> Path:
    """The checkpoint at `directory`, or, given a run's output directory (train.py --output-dir), its
    checkpoint named `in_run_directory`: its newest intact version (see `_newest_intact`)."""
    directory = Path(directory)
    for candidate in (directory, directory / in_run_directory):
        versions = [version for version in (candidate, candidate.with_name(f"{candidate.name}.old"))
                    if any((version / name).is_file() for name in ("config.json", "adapter_config.json", MANIFEST))]
        if versions:
            return _newest_intact(versions, task)
    raise NoCheckpoint(f"{directory}: no checkpoint there (expected a model directory with config.json, a LoRA "
                    f"adapter with adapter_config.json, or a run directory with {in_run_directory}/)")


def _newest_intact(versions: list[Path], task: str | None) -> Path:
    """The first of `versions` (newest first) that is intact, with one warning naming what was damaged
    in a newer one; one error line when none is.

    Two versions are left only by a save cut between its renames and its deletion of the older one
    (a kill or a power cut): then each is hashed in full before it is chosen, since a power cut can
    leave a file its full size but not its content.
    """
    damaged = []
    for version in versions:
        try:
            if len(versions) > 1:
                _check_in_full(version, task)
            else:
                _read_manifest(version, task)
        except DamagedCheckpoint as error:
            damaged.append(error)
            continue
        if damaged and is_main():
            log.warning("%s; using the previous version, %s", damaged[0], version)
        return version
    if len(damaged) == 1:
        raise damaged[0]
    raise DamagedCheckpoint("; ".join(map(str, damaged)) + ": no intact version is left")


def saved_step(directory: Path) -> int:
    """The step of a checkpoint's training state, from its manifest (-1: a checkpoint without one)."""
    try:
        step = json.loads((Path(directory) / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return -1
    return -1 if step is None else step


def load_run_config(directory: Path) -> dict:
    path = Path(directory) / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable run configuration ({error})") from None


@dataclass(frozen=True)
class SavedRun:
    """What a checkpoint holds for a run to resume from it."""

    directory: Path
    run_config: dict  # the task's (run_config.json)
    training_state: dict  # the loop's (training_state.pt): optimizer, schedule, data position, random state


def load_saved_run(directory: Path) -> SavedRun:
    return SavedRun(Path(directory), load_run_config(directory), load_training_state(directory))


def load_training_state(directory: Path) -> dict:
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        raise UserError(f"{directory}: has no {TRAINING_STATE}, so it cannot be resumed (it is a model-only checkpoint)")
    try:
        # On the CPU whatever device saved it: a GPU run resumes on another GPU count or on a CPU, and
        # the optimizer moves its moments to its parameters' device as it loads them.
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - a damaged file is the user's to fix, report it in one line
        raise UserError(f"{path}: cannot be loaded ({type(error).__name__}: {error})") from None
