"""User mistakes are reported as one line and a non-zero exit, never as a traceback."""
import sys


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
    from engine.distributed import first_to_fail

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
