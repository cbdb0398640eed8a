"""Whole folders in a publish: a local place for the writers that only write local disk (TensorFlow's
SavedModels and summaries), its upload into a remote staging folder, and a staged folder swapped in."""

from __future__ import annotations

import os
import tempfile

from plumbing import fsutil


def local_workdir(staging: str, prefix: str) -> tuple[str, bool]:
    """(folder, is_temporary): the staging folder itself when it is local, else a temporary local folder
    whose files :func:`upload` copies into staging afterwards (the caller removes it)."""
    if "://" not in staging:
        return staging, False
    return tempfile.mkdtemp(prefix=prefix), True


def upload(local: str, staging: str, names: list[str]) -> None:
    """Copies the files and folders ``names`` of ``local`` to the same places under ``staging``."""
    for name in names:
        root = os.path.join(local, name)
        paths = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs] if os.path.isdir(root) else [root]
        for path in paths:
            with open(path, "rb") as f:
                fsutil.write_bytes_atomic(fsutil.join(staging, os.path.relpath(path, local).replace(os.sep, "/")),
                                          f.read())


def swap_folder(output: str, staging: str, name: str) -> None:
    """Moves ``staging/name`` to ``output/name``, the previous folder first set aside inside staging.

    Locally each move is one directory rename (a reader sees the old folder or the new one,
    never a mix); on object stores, which have no folders, it is file by file.
    """
    final, staged = fsutil.join(output, name), fsutil.join(staging, name)
    aside = fsutil.join(staging, "_previous", name)
    if "://" not in output:
        if fsutil.exists(final):
            fsutil.move([final], [aside])
        fsutil.move([staged], [final])
        return
    old = fsutil.match(fsutil.join(final, "**"))
    fsutil.move(old, [aside + p[len(final):] for p in old])
    new = fsutil.match(fsutil.join(staged, "**"))
    fsutil.move(new, [final + p[len(staged):] for p in new])
