"""Output paths that cannot be written, refused before any work (the verbs' options, the results log)."""

from __future__ import annotations

import os
from pathlib import Path

from sparsecnn.errors import SparseCNNError


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is a file (nothing can be made under it)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(flag: str, path: str | os.PathLike[str], example: str) -> Path:
    """Refuse an output file that cannot be written: a folder, or one in a missing folder.

    Parameters
    ----------
    flag : str
        The option that named the file (``"--json"``), for the message.
    path : path-like
        The file to be written later (its folder must exist; it is not created).
    example : str
        A file name to suggest when ``path`` is a folder (``"sweep.json"``).

    Returns
    -------
    Path

    Raises
    ------
    SparseCNNError
        Naming the problem and the remedy.
    """
    p = Path(path)
    if p.is_dir():
        raise SparseCNNError(f"{flag} {p} is a folder; give a file path in it, e.g. {p / example}")
    blocker = _file_in_the_way(p)
    if blocker is not None:
        raise SparseCNNError(f"{flag} {p}: {blocker} is a file, not a folder; choose another path")
    if not p.parent.is_dir():
        raise SparseCNNError(
            f"{flag} {p}: folder {p.parent} does not exist; create it or choose another path"
        )
    if not os.access(p.parent, os.W_OK):
        raise SparseCNNError(f"{flag} {p}: folder {p.parent} is not writable; choose another path")
    return p


def check_output_dir(flag: str, path: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that cannot be made: a file, or a path under a file or unwritable.

    The folder itself is not created (a later error in the arguments should not leave it behind).

    Parameters
    ----------
    flag : str
        The option that named the folder (``"--out"``), for the message.
    path : path-like

    Returns
    -------
    Path

    Raises
    ------
    SparseCNNError
        Naming the problem and the remedy.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SparseCNNError(f"{flag} {p} is a file, not a folder; choose another path")
    blocker = _file_in_the_way(p)
    if blocker is not None:
        raise SparseCNNError(f"{flag} {p}: {blocker} is a file, not a folder; choose another path")
    existing = next(a for a in (p, *p.parents) if a.exists())  # the root at the latest
    if not os.access(existing, os.W_OK):
        raise SparseCNNError(f"{flag} {p}: folder {existing} is not writable; choose another path")
    return p
