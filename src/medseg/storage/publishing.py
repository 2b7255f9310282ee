"""Publishing files and folders so that a reader never sees half of what was written.

A writer stages the new content beside what is published, flushes it to disk, and swaps it in
by renames on the same file system. Three forms, one idea:

- :func:`atomic_path`: one file, written to a temporary file beside it, then renamed onto it.
- :func:`staged_folder`: a whole folder, written in a staging folder beside it, then swapped in
  place of the folder (the previous one is renamed aside only for the instant of the swap).
- :func:`staging_folder` + :func:`publish_files`: files moved one by one into a folder that
  may hold other files (a user's own), replacing only those of the same names.

Local file systems only (POSIX renames); a store without renames has its own path
(`medseg.datasets.staged`). Standard library only, so that any layer may import it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from medseg.errors import UnsafePathError

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, briefly
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by `tempfile.mkstemp` (0600) or a folder made by `mkdtemp` (0700) the
    mode that `open` or `mkdir` would have given it: 0666 or 0777 minus the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk, so that a rename cannot outlive its content."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk. A no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under `root` (and `root` itself) to disk, deepest first.
    Symbolic links are not followed."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_directory(folder)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path beside `path` to write to; on success it is fsynced and renamed onto
    `path` (then the folder is fsynced), on failure removed, leaving `path` as it was.

    The file's mode follows the umask (0644 under the usual 022), as for any new file.
    `suffix` keeps the extension that a writer may look at (".nii.gz", ".weights.h5").
    A kill before the rename leaves `path` as it was and a hidden `.<name>.*.tmp<suffix>` file
    beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        apply_umask(tmp)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def retired_path(target: str | os.PathLike) -> Path:
    """Where :func:`staged_folder` puts the previous `target` during the swap: `.<name>.old`
    beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.old")


def recover_interrupted_swap(target: str | os.PathLike) -> bool:
    """Put back a folder that a swap cut short had renamed aside.

    A kill between the two renames of :func:`staged_folder` leaves no `target`, only its
    previous content as `.<name>.old`. This renames that back onto `target`. Where `target`
    exists, or there is no `.<name>.old`, nothing is done (a `.<name>.old` beside an existing
    `target` is a leftover from a kill after the swap, removed by the next swap).

    Returns:
        True when a previous content was restored.
    """
    target = Path(target)
    retired = retired_path(target)
    if os.path.lexists(target) or not retired.exists():
        return False
    os.replace(retired, target)
    fsync_directory(target.parent)
    logger.warning("%s: restored the previous content that an interrupted publish had left as %s.", target, retired.name)
    return True


@contextmanager
def staging_folder(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new empty folder inside `parent` (created if missing), removed on exit whatever
    happens (a kill leaves it behind).

    Args:
        parent: the local folder to make it in; it must be on the same file system as where
            its content is published, so that publishing is a rename.
        prefix: the start of its name; a leading dot keeps it out of listings that skip
            hidden names.

    Yields:
        The folder, with the mode the umask gives (0755 under the usual 022), not the 0700 of
        a temporary folder.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        apply_umask(staging, directory=True)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Write a folder's new content in a staging folder, then swap it in place of `target`.

    Yields an empty staging folder `.<name>.staging-*` beside `target` to write into. When
    the block ends normally, everything under it is flushed to disk, the previous `target`
    (if any) is renamed to `.<name>.old`, the staging folder is renamed to `target`, the
    parent folder is flushed, and `.<name>.old` is deleted. `target` may also be a file: it
    is replaced by the folder the same way.

    On entry, a `.<name>.old` without a `target` (a kill between the two renames of an
    earlier swap) is first renamed back onto `target` (:func:`recover_interrupted_swap`), so
    that `target` shows its previous content while the new one is written.

    What a failure leaves:
        - an exception in the block: the staging folder is removed, `target` is untouched;
        - an exception in the second rename: the previous content is renamed back onto
          `target`, the staging folder removed, the exception raised;
        - a kill while writing: `target` is untouched; a hidden `.<name>.staging-*` folder is
          left beside it (never reused; safe to delete);
        - a kill between the two renames: no `target`, its previous content as
          `.<name>.old`, which the next `staged_folder` (or `recover_interrupted_swap`) on
          `target` puts back;
        - a kill after the swap: `target` holds the new content; a leftover `.<name>.old` is
          deleted by the next swap.
    A reader never sees a partial folder; only for the instant between the two renames is
    there no `target` at all.

    Args:
        target: the local folder to create or replace; its parent is created if missing.

    Yields:
        The staging folder (mode from the umask, like a folder made by `mkdir`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(target)
    with staging_folder(target.parent, prefix=f".{target.name}.staging-") as staging:
        yield staging
        fsync_tree(staging)
        _swap_in(staging, target)


def link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """A hard link (no bytes copied) where the file system allows, else a copy. Only for a
    file that nothing rewrites in place: a link shares its bytes."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def swap_folder_in(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make the complete folder `staging` the new `target` (flushed, then two renames), the way
    :func:`staged_folder` ends, for a staging folder that a caller filled on its own terms.
    A `target` that an interrupted swap had left as `.<name>.old` is put back first."""
    staging, target = Path(staging), Path(target)
    recover_interrupted_swap(target)
    fsync_tree(staging)
    _swap_in(staging, target)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename `staging` onto `target`, the previous `target` aside for the instant between."""
    retired = retired_path(target)
    shutil.rmtree(retired, ignore_errors=True)
    had_previous = os.path.lexists(target)
    if had_previous:
        os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        if had_previous:
            os.replace(retired, target)
        raise
    fsync_directory(target.parent)
    shutil.rmtree(retired, ignore_errors=True)


def check_replaceable(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Refuse a name in `folder` that is taken by a folder, a symlink or anything but a regular
    file: publishing replaces files only.

    Raises:
        UnsafePathError: naming the first such target.
    """
    for name in names:
        target = Path(folder) / name
        if os.path.lexists(target) and not stat.S_ISREG(os.lstat(target).st_mode):
            kind = "a symlink" if target.is_symlink() else "a folder" if target.is_dir() else "not a regular file"
            raise UnsafePathError(
                f"{target} exists and is {kind}; medseg writes a file of that name and never replaces anything "
                "else. Nothing was written: move it away, or choose another output folder."
            )


def publish_files(staging: str | os.PathLike, folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Move files from `staging` into `folder`, all of them or none, each replacing a file of
    the same name.

    First every target is checked: one that exists and is not a regular file (a folder, a
    symlink, a device) is refused before anything moves. Then each file is flushed to disk
    and renamed (a reader sees a file either whole and old or whole and new), in the order of
    `names`: put last the file that says the others are complete (a table). A file that is
    replaced is first hard-linked into `staging`, so that a failure part-way puts every
    replaced file back and removes the new ones: `folder` is then as it was. Files of
    `folder` not in `names` (a user's own) are left alone.

    Args:
        staging: a folder on the same file system as `folder`, e.g. one from
            :func:`staging_folder` made inside `folder`.
        folder: the local folder to publish into; it must exist.
        names: the file names, relative to both folders.

    Raises:
        UnsafePathError: a target is a folder, a symlink or another non-regular file.

    A kill part-way leaves the files already moved published and the others in `staging`;
    every file of `folder` is whole, never half-written.
    """
    staging, folder = Path(staging), Path(folder)
    names = list(names)
    check_replaceable(folder, names)
    done: list[tuple[str, Path | None]] = []
    try:
        for index, name in enumerate(names):
            target = folder / name
            previous = None
            if os.path.lexists(target):
                previous = staging / f".previous-{index}"
                os.link(target, previous)
            fsync_file(staging / name)
            os.replace(staging / name, target)
            done.append((name, previous))
    except BaseException:
        for name, previous in reversed(done):
            if previous is None:
                (folder / name).unlink(missing_ok=True)
            else:
                os.replace(previous, folder / name)
        raise
    fsync_directory(folder)


# OWASP's CSV injection rule: a cell that starts with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(frame):
    """`frame` (pandas) with each text cell that a spreadsheet would run as a formula (a case
    id from a file named `=HYPERLINK(...)`) prefixed with a `'`, as OWASP advises; numbers and
    other cells are unchanged."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = [f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v for v in out[column]]
    return out
