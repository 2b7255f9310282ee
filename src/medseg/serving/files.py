"""The served model's files: read under the read roots, written under the write roots, through
descriptors opened without following any symlink.

A path from a request is never resolved and then reopened (a folder swapped for a symlink in
between would lead outside the roots). Instead the root is opened, and each component below it
is opened relative to the previous one with `O_NOFOLLOW`; a symlink anywhere below the root,
or `..`, is refused. The scan is read through the descriptor that was checked, and a mask is
written through a descriptor of its folder: a temporary file made with `O_EXCL`, then linked
onto its name (`linkat`, which fails when the name exists: no replace) or, when the request
asks to overwrite, renamed onto an existing regular file. Folders a failed request created are
removed again.

Standard library and medseg.errors only.
"""

from __future__ import annotations

import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import MedsegError

READ_ROOTS_ENV = "MEDSEG_SERVE_READ_ROOTS"
WRITE_ROOTS_ENV = "MEDSEG_SERVE_WRITE_ROOTS"
ANY_PATH_ENV = "MEDSEG_SERVE_ANY_PATH"
OLD_ROOTS_ENV = "MEDSEG_SERVE_ROOTS"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PATH_MAX, NAME_MAX = 4096, 255
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathNotAllowedError(MedsegError):
    """A served model was asked to read or write a path outside its roots, or an unsafe one."""


@dataclass(frozen=True)
class Roots:
    """Where requests may read and write: resolved folders; `any_path` is the user's own opt-in."""

    read: tuple[Path, ...] = ()
    write: tuple[Path, ...] = ()
    any_path: bool = False


def serve_roots() -> Roots:
    """The roots of this process, from `MEDSEG_SERVE_READ_ROOTS` and `MEDSEG_SERVE_WRITE_ROOTS`
    (folders separated by `:`). Without them no path is allowed (only `image_b64`), unless
    `MEDSEG_SERVE_ANY_PATH=1` opts in for the user's own process.

    Raises:
        PathNotAllowedError: the old `MEDSEG_SERVE_ROOTS` is set (it let one folder be read and
            written; name the two sets apart), or a root is not an existing folder.
    """
    if os.environ.get(OLD_ROOTS_ENV, "").strip(": "):
        raise PathNotAllowedError(
            f"{OLD_ROOTS_ENV} is no longer read: it made every folder both readable and writable. Set "
            f"{READ_ROOTS_ENV} (the scans' folders) and {WRITE_ROOTS_ENV} (where masks go), and unset {OLD_ROOTS_ENV}."
        )

    def parse(variable: str) -> tuple[Path, ...]:
        roots = []
        for part in os.environ.get(variable, "").split(":"):
            if part.strip():
                root = Path(part).expanduser().resolve()
                if not root.is_dir():
                    raise PathNotAllowedError(f"{variable}: {part!r} is not an existing folder. Create it or fix the variable.")
                roots.append(root)
        return tuple(roots)

    return Roots(parse(READ_ROOTS_ENV), parse(WRITE_ROOTS_ENV), os.environ.get(ANY_PATH_ENV, "").lower() in ("1", "true"))


def _components(path: str, column: str, roots: tuple[Path, ...], variable: str) -> tuple[Path, list[str]]:
    """(the root that `path` lies under, its components below it), refusing what is unsafe."""
    if "\x00" in path:
        raise PathNotAllowedError(f"{column}: the path holds a NUL byte. Send a plain absolute path.")
    if len(path) > PATH_MAX:
        raise PathNotAllowedError(f"{column}: the path is {len(path)} characters long, above {PATH_MAX}. Use a shorter one.")
    if not os.path.isabs(path):
        raise PathNotAllowedError(f"{column}={path!r}: give an absolute path, under the server's {variable}.")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PathNotAllowedError(f"{column}={path!r}: `..` is not allowed in a request path.")
    if any(len(part.encode()) > NAME_MAX for part in parts):
        raise PathNotAllowedError(f"{column}={path!r}: a name in it is longer than {NAME_MAX} bytes.")
    for root in roots:
        if parts[: len(root.parts) - 1] == list(root.parts[1:]) and len(parts) > len(root.parts) - 1:
            return root, parts[len(root.parts) - 1:]
    if not roots:
        raise PathNotAllowedError(
            f"{column}={path!r} refused: this model server reads and writes no path unless {variable} names the "
            "folders it may use. Send the scan's bytes in `image_b64` instead, or start the server with "
            f"{READ_ROOTS_ENV}=/data/in {WRITE_ROOTS_ENV}=/data/out."
        )
    raise PathNotAllowedError(
        f"{column}={path!r} refused: it is not strictly inside a folder of the server's {variable}. Use a path under "
        "those folders (not a root itself), or send `image_b64`."
    )


def _walk(root: Path, folders: list[str], column: str, create: bool, created: list[tuple[int, str]]) -> int:
    """A descriptor of `root/folders...`, each opened below the last with O_NOFOLLOW; missing
    folders are made when `create` (recorded in `created` as (parent fd, name), parent kept open)."""
    fd = os.open(root, _DIR)
    try:
        for name in folders:
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise PathNotAllowedError(f"{column}: the folder {name!r} does not exist under the root.") from None
                os.mkdir(name, 0o777, dir_fd=fd)
                created.append((os.dup(fd), name))
                child = os.open(name, _DIR, dir_fd=fd)
            except (NotADirectoryError, OSError) as exc:
                raise PathNotAllowedError(
                    f"{column}: {name!r} is a symlink or not a folder; a request path may not pass through a symlink "
                    "below the server's roots."
                ) from exc
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_scan(path: str, roots: Roots, max_bytes: int) -> tuple[int, os.stat_result]:
    """An open descriptor of the scan at `path` (a regular file under a read root, reached
    without following a symlink) and its stat. The caller reads through it and closes it."""
    if roots.any_path and not roots.read:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    else:
        root, parts = _components(path, "image_path", roots.read, READ_ROOTS_ENV)
        folder = _walk(root, parts[:-1], "image_path", False, [])
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        except FileNotFoundError:
            raise PathNotAllowedError(f"image_path={path!r}: no such file.") from None
        except OSError as exc:
            raise PathNotAllowedError(f"image_path={path!r}: a symlink, or it cannot be opened ({exc.strerror}).") from exc
        finally:
            os.close(folder)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise PathNotAllowedError(f"image_path={path!r} is not a regular file. Give a .nii or .nii.gz file.")
    if info.st_size > max_bytes:
        os.close(fd)
        raise PathNotAllowedError(f"image_path={path!r} is {info.st_size} bytes, above MEDSEG_MAX_SCAN_MB. Refused.")
    return fd, info


def read_all(fd: int, size: int) -> bytes:
    """The bytes of an open file, at most `size` + 1 of them (a file that grew is cut there)."""
    chunks, left = [], size + 1
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


@dataclass
class PendingMask:
    """A mask written under a temporary name in its folder, waiting to be published."""

    path: str
    folder_fd: int
    name: str
    temporary: str
    overwrite: bool
    created: list[tuple[int, str]] = field(default_factory=list)
    published: bool = False
    previous: str | None = None


def check_target(path: str, roots: Roots, overwrite: bool, sources: set[tuple[int, int]]) -> None:
    """Refuse, before anything is computed, an `output_path` that could not be written: not a
    `.nii`/`.nii.gz` name, outside the write roots, a root itself, an existing file (unless
    `overwrite`), a folder or symlink, or one of the request's own scans."""
    if not path.endswith(NIFTI_SUFFIXES):
        raise PathNotAllowedError(f"output_path={path!r}: name the mask .nii.gz (or .nii); it is written in that format.")
    if roots.any_path and not roots.write:
        target = Path(path)
        info = os.lstat(target) if os.path.lexists(target) else None
    else:
        root, parts = _components(path, "output_path", roots.write, WRITE_ROOTS_ENV)
        info = None
        try:
            folder = _walk(root, parts[:-1], "output_path", False, [])
        except PathNotAllowedError as exc:
            if "does not exist" not in str(exc):
                raise
            return  # the folders are made at write time
        try:
            info = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            info = None
        finally:
            os.close(folder)
    if info is None:
        return
    if not stat.S_ISREG(info.st_mode):
        raise PathNotAllowedError(f"output_path={path!r} exists and is a folder, a symlink or not a regular file; it is never replaced.")
    if (info.st_dev, info.st_ino) in sources:
        raise PathNotAllowedError(f"output_path={path!r} is one of the request's input scans; it would be overwritten.")
    if not overwrite:
        raise PathNotAllowedError(
            f"output_path={path!r} exists; the server never replaces a file unless the row says `overwrite: true`. "
            "Choose a new name, or set overwrite for a mask you mean to replace."
        )


def stage_mask(path: str, payload: bytes, roots: Roots, overwrite: bool) -> PendingMask:
    """Write `payload` under a temporary name in `path`'s folder (made if missing), reached
    without following a symlink; publish it later with :func:`publish`."""
    created: list[tuple[int, str]] = []
    if roots.any_path and not roots.write:
        target = Path(path).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        folder, name = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), target.name
    else:
        root, parts = _components(path, "output_path", roots.write, WRITE_ROOTS_ENV)
        folder, name = _walk(root, parts[:-1], "output_path", True, created), parts[-1]
    temporary = f".{name[:200]}.{uuid.uuid4().hex[:12]}.tmp"
    pending = PendingMask(path, folder, name, temporary, overwrite, created)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        discard(pending)
        raise
    return pending


def publish(pending: PendingMask) -> None:
    """Put a staged mask on its name: a hard link that fails when the name exists (no replace),
    or a rename onto an existing regular file when the row asked to overwrite."""
    folder = pending.folder_fd
    if pending.overwrite:
        try:
            info = os.stat(pending.name, dir_fd=folder, follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                raise PathNotAllowedError(f"output_path={pending.path!r} became a folder or a symlink; not replaced.")
            pending.previous = f"{pending.temporary}.previous"
            os.link(pending.name, pending.previous, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            pass
        os.rename(pending.temporary, pending.name, src_dir_fd=folder, dst_dir_fd=folder)
    else:
        try:
            os.link(pending.temporary, pending.name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        except FileExistsError:
            raise PathNotAllowedError(f"output_path={pending.path!r} appeared while the request ran; it was not replaced.") from None
        os.unlink(pending.temporary, dir_fd=folder)
    pending.published = True
    os.fsync(folder)


def unpublish(pending: PendingMask) -> None:
    """Undo :func:`publish` when a later row fails: remove the new mask, or put back the file
    it replaced."""
    if not pending.published:
        return
    if pending.previous is not None:
        os.rename(pending.previous, pending.name, src_dir_fd=pending.folder_fd, dst_dir_fd=pending.folder_fd)
        pending.previous = None
    else:
        os.unlink(pending.name, dir_fd=pending.folder_fd)
    pending.published = False


def discard(pending: PendingMask) -> None:
    """Remove the temporary file and the folders made for it (emptied ones only), close fds."""
    try:
        for name in (pending.temporary, pending.previous):
            if name is not None:
                try:
                    os.unlink(name, dir_fd=pending.folder_fd)
                except FileNotFoundError:
                    pass
    finally:
        os.close(pending.folder_fd)
        pending.folder_fd = -1
    for parent, name in reversed(pending.created):
        try:
            if not pending.published:
                os.rmdir(name, dir_fd=parent)
        except OSError:
            pass  # not empty: another row's mask is there
        finally:
            os.close(parent)
    pending.created.clear()


def close(pending: PendingMask) -> None:
    """Release a published mask's descriptors."""
    if pending.folder_fd >= 0:
        os.close(pending.folder_fd)
        pending.folder_fd = -1
    for parent, _ in pending.created:
        os.close(parent)
    pending.created.clear()
