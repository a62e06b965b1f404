"""Progress bars for every phase that can take more than a couple of seconds (reading and validating
files, building windows, tokenising text, evaluation, answer selection): on standard error, from the
main process only, and only when standard error is a terminal, as tqdm does with `disable=None`,
so that logs and pipes stay clean."""
from tqdm.auto import tqdm

from engine.distributed import is_main


def progress(iterable, description: str, unit: str, total: int | None = None):
    return tqdm(iterable, desc=description, unit=unit, total=total, leave=False, dynamic_ncols=True,
                disable=None if is_main() else True)
