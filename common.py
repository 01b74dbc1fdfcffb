"""What the scripts share around the model: atomic file writes (figures too), fsync of a folder
before its rename, append-only JSONL, per-item seeds, a runner that works through items and
appends one row per finished item, and how every script's --help reads.

A file is written whole or not at all (a temporary file beside it, then a rename), so a crash never
leaves a half-written result for a rerun to trust. A long job (self-instruct's stages, HumanEval's
samples) appends one JSON row per finished item, flushed and fsynced, and a rerun skips the items
already in its file: a crash loses at most the items in flight.
"""
import argparse
import fcntl
import hashlib
import json
import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def write_atomic(path, data):
    """Write `data` (str, bytes, or a function that writes a given path) to `path` atomically: into
    a temporary file of the same folder, then renamed over `path`. Returns `path`. The file gets
    the modes the umask gives, as open() would (mkstemp's would be private, 0600: a run on a
    shared disk, or a folder served by another user, must stay readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # unique
    try:
        if callable(data):
            data(tmp)
            fsync(tmp)  # durable before the rename, as the str/bytes branch
        else:
            with open(tmp, "xb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def umask_mode(mode):
    """`mode` less the process's umask: the mode open() and mkdir() give a new file or folder.
    Read from /proc where it can be (os.umask can only read it by setting it, which another
    thread creating a file at that moment would feel)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
    return mode & ~mask


def fsync(path: Path):
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path):
    """Flush every file under `folder`, then the folders, to the disk: a rename is durable only
    once what it names is (a power cut after the rename must not leave empty files)."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:  # files before their folder
        fsync(path)


def save_figure(fig, path):
    """Write a matplotlib figure atomically, in the format of `path`'s extension."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))


def pyplot():
    """matplotlib's pyplot (without a display), or None with a message: plots are optional."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG plot (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_jsonl(path):
    """Rows of a JSONL file. A last line without its newline is a write cut short by a crash and
    is ignored (JsonlWriter removes it); any other bad line is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines[:-1], 1):  # the last piece is "" or a torn line
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return rows


class JsonlWriter:
    """Appends one row per call, flushed and fsynced, so a finished item survives a crash. Opening
    it cuts off a torn last line and locks the file against a second writer."""

    def __init__(self, path):
        self.path = path
        self.f = open(path, "a+b")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: another process is writing {path}") from None
        size = keep = self.f.seek(0, os.SEEK_END)
        while keep > 0:  # back to the byte after the last newline, 64 KiB at a time
            start = max(0, keep - 65536)
            self.f.seek(start)
            block = self.f.read(keep - start)
            if b"\n" in block:
                keep = start + block.rindex(b"\n") + 1
                break
            keep = start
        if keep < size:
            print(f"{path}: removing a torn last line ({size - keep} bytes)", file=sys.stderr)
            self.f.truncate(keep)
        self.f.seek(0, os.SEEK_END)

    def write(self, row):
        self.f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def item_seed(seed, stage, key):
    """A seed for one item from (run seed, stage, item key): the same wherever the item runs."""
    return int(hashlib.sha256(f"{seed}/{stage}/{key}".encode()).hexdigest()[:15], 16)


def run_items(name, items, work, writer, concurrency):
    """work(item) -> row for every item, rows appended as they finish, a progress line every 10 s.
    Ctrl-C or an error cancels what has not started; finished rows are already on disk."""
    t0 = last = time.monotonic()
    done = 0

    def tick():
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if now - last >= 10 or done == len(items):
            last = now
            print(f"{name}: {done}/{len(items)} [{now - t0:.0f} s]", file=sys.stderr, flush=True)

    if concurrency <= 1:
        for item in items:
            writer.write(work(item))
            tick()
        return
    pool = ThreadPoolExecutor(concurrency)
    futures = [pool.submit(work, item) for item in items]
    written, error = set(), None
    try:
        for f in as_completed(futures):
            if f.cancelled():
                continue
            if f.exception() is not None:  # stop starting items; those running still count
                error = error or f.exception()
                for g in futures:
                    g.cancel()
                continue
            writer.write(f.result())
            written.add(f)
            tick()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for f in futures:  # finished while we stopped (Ctrl-C): keep those too
            if f not in written and f.done() and not f.cancelled() and f.exception() is None:
                writer.write(f.result())
    if error is not None:
        raise error


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of every script: the docstring's layout kept, and "(default: X)" after every flag's
    help, unless the flag is required or its help already says what its default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or action.required or not action.option_strings
                or "default" in text.lower()):
            return text
        return text + " (default: %(default)s)"


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first line above the flags, the rest of it (the example
    commands) below them, where --help ends."""
    first, _, rest = (doc or "").strip().partition("\n")
    return argparse.ArgumentParser(description=first, epilog=rest.strip("\n") or None,
                                   formatter_class=HelpFormatter)
