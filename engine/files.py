"""Durable files: a file or directory is written under a temporary name and renamed into place, so
that a run killed mid-write, two processes writing at once, or a power cut leave the previous
version or the new one, complete, never half of one.

A power cut loses what the page cache had not yet written, and filesystems write a file's data
after a rename's metadata unless told otherwise: so everything is fsync'ed before the rename that
publishes it, and the directory holding it after (the order SQLite and PostgreSQL keep).
"""
import os
import socket
from pathlib import Path


def process_tag() -> str:
    """This process's own part of a temporary file's name: processes under torchrun, on one node or
    on several sharing a disk (where process ids repeat), may write the same file."""
    return f"{socket.gethostname()}.{os.getpid()}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing, under a temporary name of this process's own."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{process_tag()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    publish(temporary, path)


def publish(temporary: Path, target: Path) -> None:
    """Rename a finished file or directory into place so that it survives a power cut: what it holds
    reaches the disk before the rename, and the rename before this returns."""
    fsync_tree(temporary)
    os.replace(temporary, target)
    fsync_path(Path(target).parent)


def fsync_path(path: Path) -> None:
    """Make a file's data, or a directory's entries, durable (a directory holds its files' names)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: Path) -> None:
    """A file, or a directory with everything below it, each directory after what it holds."""
    for below in sorted(Path(path).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(below)
    fsync_path(path)
