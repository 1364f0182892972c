"""The scripts' shared command-line pieces: bad input ends in one line and exit status 2.

    if __name__ == "__main__":
        cli.run(main)
"""
import argparse
import sys

import torch

import adapters
import data
import models

USER_ERRORS = (ValueError, FloatingPointError, models.LoadError, data.DataError, adapters.AdapterError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the docstring as written, and each flag's default after its help where the
    help does not state it. A default left None is worked out from other flags: the help says how."""

    def _get_help_string(self, action):
        help = action.help or ""
        if not action.option_strings or "default" in help or action.default in (None, argparse.SUPPRESS) \
                or action.default is False:
            return help
        return f"{help} (default: %(default)s)".lstrip()


def run(main, interrupted=lambda: "interrupted"):
    """Run a script's main(): a user error prints its one-sentence message on stderr, exit status 2;
    so does a failing file system (read-only, full, a file where a directory should be): the
    scripts write atomically, so what was there stays. Ctrl-C prints `interrupted()`, exit status 130."""
    try:
        main()
    except USER_ERRORS as e:
        fail(e)
    except OSError as e:
        fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e)
    except KeyboardInterrupt:
        print(interrupted(), file=sys.stderr)
        sys.exit(130)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def positive(args, *names):
    """Refuse a flag among `names` (argparse dests) that is set but not > 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def non_negative(args, *names):
    """Refuse a flag among `names` that is set but not >= 0 (NaN included)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")


def check_device(name):
    """Refuse a --device that torch does not know, or that this machine does not have (None: the default)."""
    if name is None:
        return
    try:
        usable = torch.device(name).type != "meta" and torch.empty(0, device=name) is not None
    except (RuntimeError, AssertionError):
        usable = False
    if not usable:
        raise ValueError(f"--device {name} is not a device here (cpu, cuda, cuda:1 ...)")


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"
