"""File safety for every script: nothing a user had is lost, overwritten or half-written.

A file is written beside its place and renamed over it (atomic_write), a directory likewise
(write_dir); an output directory is checked before anything runs (check_out, check_replace) and held
by one run at a time (hold). This module imports nothing from the project: everything else may use it.
"""
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

# what a train.py run writes into its --out
RUN_FILES = ("adapter.safetensors", "config.json", "log.jsonl", "summary.json", "checkpoint.pt")


def umask_mode(mode=0o666):
    """`mode` less the umask: what open() gives a new file (mkstemp, and safetensors, give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write(path, write):
    """write(tmp_path) then rename: a crash never leaves a half-written file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def write_dir(out, write):
    """write(tmp) into a new sibling directory, then rename it to `out` (replacing what is there)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = tmp.with_suffix(".old")
    try:
        tmp.chmod(umask_mode(0o777))  # mkdtemp makes it private; the result is an ordinary directory
        write(tmp)
        if out.is_dir() and any(out.iterdir()):
            os.rename(out, old)  # rename(2) replaces only an empty directory
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- checks before writing

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


def check_replace(out, force, sources):
    """Refuse an --out that write_dir may not replace: one that is, holds or lies inside a directory
    it reads from (`sources`: {flag: path or None}), a symbolic link (write_dir would rename the link,
    not the directory), a file, or a non-empty directory without --force."""
    out = Path(out)
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link: give the directory it points to, or another --out")
    for flag, source in sources.items():
        if source and Path(source).exists() and overlaps(out, source):
            raise ValueError(f"--out {out} is, holds or lies inside {flag} {source}: replacing it would "
                             f"destroy what it reads from (--force or not)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} exists and is not empty (add --force to replace it)")


# ----------------------------------------------------------------------------- a run's output directory

@contextlib.contextmanager
def hold(out):
    """This process's claim on the directory it writes, for as long as it writes (train.py's --out
    for the whole run, export.py's while it exports): an exclusive flock on the directory itself
    (the kernel drops it when the process dies, so a killed run leaves no stale lock). A directory
    made here for a run that then wrote nothing is removed again."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another run is writing into {out}: wait for it to end, or choose another --out") from None
        yield
    finally:
        os.close(fd)
        if made and not any(out.iterdir()):
            out.rmdir()


def check_out(out, resume):
    """Refuse an --out that is not this run's to write: it must hold no symbolic link (the run would
    write through it), and be empty, or hold this run unfinished (a checkpoint, or the files of a run
    stopped before its first one) and --resume be given. Returns the summary of a finished run that
    --resume finds, else None."""
    entries = list(out.iterdir()) if out.is_dir() else []
    links = sorted(p.name for p in entries if p.is_symlink())
    if links:
        raise ValueError(f"--out {out} holds a symbolic link ({links[0]}): a run writes only files of its own "
                         "there; remove the link or choose another --out")
    names = {p.name for p in entries}
    names -= {n for n in names if n.endswith(".tmp") and n.startswith(RUN_FILES)}  # atomic_write's, left by a kill
    if not names:
        return None
    foreign = sorted(names - set(RUN_FILES))
    if foreign:
        raise ValueError(f"--out {out} holds files that are not a train.py run's ({', '.join(foreign[:3])}): "
                         "choose an empty or new directory")
    if "checkpoint.pt" in names:
        if not resume:
            raise ValueError(f"{out / 'checkpoint.pt'} holds an unfinished run: add --resume to continue it, "
                             "or choose another --out")
        return None  # load_checkpoint checks its flags
    if "summary.json" in names:
        if not resume:
            raise ValueError(f"{out} holds a finished run: choose another --out (or delete it to train again)")
        return read_summary(out / "summary.json")
    if not resume:
        raise ValueError(f"{out} holds a run that stopped before its first checkpoint: add --resume to "
                         "start it over, or choose another --out")
    return None


def read_summary(path):
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): repair or delete it") from None
