"""Ctrl-C or SIGTERM during training: finish the current step, save, and exit."""
import os
import signal

from tqdm.auto import tqdm

from engine.distributed import is_main
from engine.errors import another_process_failed


class StopRequest:
    """`requested` once Ctrl-C or SIGTERM came; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if another_process_failed():
            os._exit(1)  # torchrun stops the job because a process failed: that one has said why
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if is_main():
            tqdm.write("stopping after this step; the run can be continued with --resume")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
