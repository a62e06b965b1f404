"""Progress bars for the preparation phases that can take more than a couple of seconds (reading and
validating files, building windows, tokenising text, answer selection): on standard error, from the
main process only, and only when standard error is a terminal, as tqdm does with `disable=None`,
so that logs and pipes stay clean. The training and evaluation bars print into logs too: they are
the run's own output, and bench/kill_soak.py reads them from a pipe to know what a run is doing."""
from tqdm.auto import tqdm

from engine.distributed import is_main


def progress(iterable, description: str, unit: str, total: int | None = None):
    return tqdm(iterable, desc=description, unit=unit, total=total, leave=False, dynamic_ncols=True,
                disable=None if is_main() else True)
