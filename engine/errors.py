"""User mistakes are reported as one line and a non-zero exit, never as a traceback."""
import sys


class UserError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint): the message says what and where."""


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
