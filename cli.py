"""The scripts' shared command-line pieces: bad input ends in one line and exit status 2.

    if __name__ == "__main__":
        cli.run(main)
"""
import sys

import data
import methods
import models

USER_ERRORS = (ValueError, FloatingPointError, models.LoadError, data.DataError, methods.AdapterError)


def run(main):
    """Run a script's main(): a user error prints its one-sentence message on stderr, exit status 2."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def positive(args, *names):
    """Refuse a flag among `names` (argparse dests) that is set but not > 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"
