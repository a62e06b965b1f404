"""User mistakes are reported as one line and a non-zero exit, never as a traceback; under torchrun,
by the first process that fails, alone."""
import os
import sys
import time

import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint): the message says what and where."""


def short_repr(value, limit: int = 80) -> str:
    """repr() of a value from the user's input, cut to `limit` characters: quoted into an error
    message, its newlines cannot split the one line and a megabyte of it cannot flood it."""
    try:
        text = repr(value[: limit + 1] if isinstance(value, str) else value)
    except RecursionError:  # a list nested as deep as the JSON parser allowed, repr'd from a deeper stack
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(main) -> None:
    """Run a command-line entry point, turning a UserError into `error: ...` and exit status 2.

    Under torchrun only the first process to fail reports: the others failed because it did (its
    bad input is theirs too, or a collective lost its peer), and repeating it would bury the cause.
    """
    try:
        main()
    except UserError as error:
        if first_to_fail():
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if not first_to_fail():
            sys.exit(1)
        raise


FAILURES_KEY = "failed_processes"


def first_to_fail() -> bool:
    """Whether this process is the first of the job to fail, and so the one to report it.

    Under torchrun, once one process fails the others fail too (a collective loses its peer, or
    they hit the same bad input): only the first, counted in the job's key-value store, speaks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        # Before the process group exists there is nothing to count with, but every process has
        # checked the same arguments: rank 0 speaks, and the others give it a few seconds (torchrun
        # stops them as soon as it exits) before they speak for themselves.
        if int(os.environ.get("RANK", "0")) != 0:
            time.sleep(5)
        return True
    try:
        return dist.distributed_c10d._get_default_store().add(FAILURES_KEY, 1) == 1
    except Exception:  # noqa: BLE001 - the store went down with a process that failed first
        return False


def another_process_failed() -> bool:
    """Whether some process of the job has already failed (and said why)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        return dist.distributed_c10d._get_default_store().add(FAILURES_KEY, 0) > 0
    except Exception:  # noqa: BLE001 - as above
        return True
