"""The scripts' shared command-line pieces: bad input ends in one line and exit status 2.

    if __name__ == "__main__":
        cli.run(main)
"""
import os
import sys
from pathlib import Path

import torch

import data
import methods
import models

USER_ERRORS = (ValueError, FloatingPointError, models.LoadError, data.DataError, methods.AdapterError)


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


def overlaps(a, b):
    """Whether path a is b, lies inside it or holds it (symbolic links resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def writable(path, flag):
    """Refuse `flag`'s file `path` now when it could not be written later: a directory, or a place
    whose nearest existing directory does not let us write (atomic_write creates the missing ones)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file name")
    here = path.parent
    while not here.exists():
        here = here.parent
    if not here.is_dir() or not os.access(here, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} cannot be written ({here} is not a writable directory)")


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"
