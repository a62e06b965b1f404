"""User mistakes are reported as one line and a non-zero exit, never as a traceback."""
import sys


class UserError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint): the message says what and where."""


def run_cli(main) -> None:
    """Run a command-line entry point, turning a UserError into `error: ...` and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
