"""The Medical Segmentation Decathlon (MSD) folder layout, as nnU-Net and MONAI read it.

A dataset folder holds `dataset.json`, `imagesTr/` and `labelsTr/`. Images are either one file
per case (3-D, or 4-D with channels last) or one file per channel with a `_0000` suffix
(nnU-Net v2). A user's folder is only ever read, and only inside itself: a path in dataset.json,
or a symlink, that leads outside the folder is refused. Synthetic phantoms are written into a
fresh folder that replaces the old one in a single rename.

The folder may be local or on any fsspec store (`s3://bucket/Task04_Hippocampus`): a URL
root is handled as a :class:`UrlPath`, so the reader below is one implementation for both. An
object store has no symlinks, so there only the lexical "stays inside the folder" check applies.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import (
    ChannelError,
    CorruptFileError,
    DatasetNotFoundError,
    EmptyDatasetError,
    MissingLabelError,
    UnsafePathError,
)
from medseg.imaging.io import Volume, write_volume
from medseg.storage.paths import is_url, url_filesystem
from medseg.storage.publishing import staged_folder

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseFiles:
    """Where one training case lives.

    Attributes:
        case_id: the name without channel suffix or extension, e.g. "hippocampus_367".
        image_path: the image file (absolute, or a URL for a folder on an fsspec store).
        label_path: the label file (absolute, or a URL).
        channel: the channel to take from a 4-D image file, or None for a 3-D file.
    """

    case_id: str
    image_path: str
    label_path: str
    channel: int | None


@dataclass(frozen=True, order=True)
class UrlPath:
    """A file or folder on an fsspec store, with the part of pathlib's API the MSD reader uses
    (`/`, `name`, `parent`, `with_name`, `is_relative_to`, `exists`, `is_file`, `is_dir`,
    `iterdir`, `read_text`), so that the reader is the same code for a local Path and a URL.

    The path is normalized lexically on construction (`a/./b/../c` is `a/c`), as
    `os.path.normpath` normalizes a local one. `str()` gives the URL. It has no `__fspath__`:
    a URL must never be opened as a local file by mistake.

    Attributes:
        url: e.g. `s3://bucket/Task04/imagesTr/x.nii.gz` (a chained URL such as
            `simplecache::s3://...` works too). Credentials come from the store's defaults.
    """

    url: str

    def __post_init__(self) -> None:
        prefix, path = self._split(self.url)
        object.__setattr__(self, "url", prefix + posixpath.normpath(path))

    @staticmethod
    def _split(url: str) -> tuple[str, str]:
        """("s3://", "bucket/key"): the protocol part and the path after the last `://`."""
        cut = url.rindex("://") + 3
        return url[:cut], url[cut:]

    @property
    def _path(self) -> str:
        return self._split(self.url)[1]

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, name: str) -> UrlPath:
        return UrlPath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return posixpath.basename(self._path)

    @property
    def parent(self) -> UrlPath:
        return UrlPath(self._split(self.url)[0] + posixpath.dirname(self._path))

    def with_name(self, name: str) -> UrlPath:
        return self.parent / name

    def is_relative_to(self, other: UrlPath) -> bool:
        prefix, path = self._split(self.url)
        other_prefix, other_path = self._split(other.url)
        return prefix == other_prefix and (path == other_path or path.startswith(other_path.rstrip("/") + "/"))

    def _fs(self):
        return url_filesystem(self.url)

    def exists(self) -> bool:
        fs, path = self._fs()
        return fs.exists(path)

    def is_file(self) -> bool:
        fs, path = self._fs()
        return fs.isfile(path)

    def is_dir(self) -> bool:
        fs, path = self._fs()
        return fs.isdir(path)

    def iterdir(self) -> Iterator[UrlPath]:
        fs, path = self._fs()
        for entry in fs.ls(path, detail=False):
            yield self / posixpath.basename(entry.rstrip("/"))

    def read_text(self) -> str:
        fs, path = self._fs()
        return fs.cat_file(path).decode("utf-8")


def dataset_location(root: str | os.PathLike | UrlPath) -> Path | UrlPath:
    """An MSD folder as the reader takes it: a :class:`UrlPath` for a URL on an fsspec store,
    else the absolute local Path (anchored at the current folder, so pass an absolute path)."""
    if isinstance(root, UrlPath):
        return root
    return UrlPath(os.fspath(root)) if is_url(root) else Path(os.path.abspath(root))


def _strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_real_path(root: Path | UrlPath, path: Path | UrlPath, source: str) -> None:
    """Refuse `path` when its real location (symlinks followed) is outside `root`'s.

    Args:
        root: the dataset folder.
        path: a path under `root` (lexically).
        source: what listed the path, for the message (dataset.json or a folder).
    """
    if isinstance(root, UrlPath):
        return  # an object store has no symlinks: the lexical check of `_inside` is the whole check
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(real_root):
        raise UnsafePathError(
            f"{path} (from {source}) is a symlink, or lies under one, that leads outside the dataset folder "
            f"{real_root}: its real path is {real}. medseg reads only files inside data.msd_dir: copy the "
            "files into the folder instead of linking them, or point data.msd_dir at the folder that holds them."
        )


def _inside(root: Path | UrlPath, relative: str, manifest: Path | UrlPath) -> Path | UrlPath:
    """Resolve a dataset.json path and refuse one that leaves `root`, lexically or through a symlink.

    Returns:
        The path under `root` as written (symlinks not followed, so messages show the user's path).
    """
    # A UrlPath normalizes itself; for a URL root "/x" is also absolute (the bucket's root).
    candidate = root / relative if isinstance(root, UrlPath) else Path(os.path.normpath(root / relative))
    if Path(relative).is_absolute() or not candidate.is_relative_to(root):
        raise UnsafePathError(
            f"{manifest}: the entry '{relative}' points outside the dataset folder {root}. "
            "Paths in dataset.json must be relative and stay inside the folder (like './imagesTr/x.nii.gz')."
        )
    _check_real_path(root, candidate, str(manifest))
    return candidate


def read_dataset_json(root: Path | UrlPath | str) -> dict:
    """Parse `root/dataset.json`, with a clear error if it is missing or not JSON.

    `root` is a local folder or a URL on an fsspec store (see :func:`dataset_location`).
    """
    if not isinstance(root, (Path, UrlPath)):
        root = dataset_location(root)
    manifest = root / "dataset.json"
    if root.is_file():
        hint = f" Did you mean its folder, {root.parent}?" if root.name == "dataset.json" else ""
        raise DatasetNotFoundError(
            f"{root}: is a file, not a folder. Set data.msd_dir to the MSD folder that holds "
            f"dataset.json, imagesTr/ and labelsTr/.{hint}"
        )
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"{root}: dataset folder not found. Set data.msd_dir to an MSD folder that holds "
            "dataset.json, imagesTr/ and labelsTr/ (an absolute path is safest)."
        )
    if not manifest.is_file():
        raise DatasetNotFoundError(
            f"{manifest}: not found. An MSD folder needs dataset.json beside imagesTr/ and labelsTr/."
        )
    try:
        return json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{manifest}: not valid JSON ({exc}). Fix or regenerate the file.") from exc


def modality_names(meta: dict) -> list[str]:
    """Channel names in index order, from MSD's `modality` or nnU-Net v2's `channel_names`."""
    names = meta.get("modality") or meta.get("channel_names") or {"0": "image"}
    return [str(names[key]) for key in sorted(names, key=int)]


def foreground_classes(meta: dict, manifest: Path | UrlPath) -> dict[int, str]:
    """The foreground classes that `dataset.json` lists: {label value: name}, sorted by value.

    Reads both forms of `labels`: MSD's `{"0": "background", "1": "anterior"}` and nnU-Net
    v2's `{"background": 0, "anterior": 1}`. Label 0 is the background and is left out. A
    dataset.json without `labels` gives `{1: "foreground"}`: one class, every value above 0.
    (nnU-Net v2's region-based labels, lists of values, are not supported.)

    Raises:
        CorruptFileError: `labels` is not a mapping, or a value is not an integer in 0..255,
            or two names share a value.
    """
    labels = meta.get("labels")
    if labels is None:
        return {1: "foreground"}
    if not isinstance(labels, dict) or not labels:
        raise CorruptFileError(f"{manifest}: 'labels' must be a mapping such as {{\"0\": \"background\", \"1\": \"tumour\"}}.")
    msd_form = all(str(key).strip().isdigit() for key in labels)
    pairs = [(key, name) for key, name in labels.items()] if msd_form else [(value, key) for key, value in labels.items()]
    classes: dict[int, str] = {}
    for value, name in pairs:
        if isinstance(value, bool) or not str(value).strip().isdigit() or not 0 <= int(value) <= 255:
            raise CorruptFileError(
                f"{manifest}: the label value {value!r} (class {name!r}) is not an integer in 0..255. "
                "Use the MSD form {\"1\": \"name\"} or the nnU-Net v2 form {\"name\": 1}."
            )
        if int(value) in classes or (int(value) == 0 and 0 in classes):
            raise CorruptFileError(f"{manifest}: the label value {int(value)} is listed twice in 'labels'.")
        classes[int(value)] = str(name)
    classes.pop(0, None)
    return dict(sorted(classes.items()))


def resolve_channel(meta: dict, channel: int | str | None, manifest: Path | UrlPath) -> int | None:
    """Turn `data.channel` (index, name or None) into a channel index.

    Returns None for a single-channel dataset with no choice made. A multi-channel dataset
    with no choice is an error: silently training on channel 0 would hide a mistake.
    """
    names = modality_names(meta)
    if channel is None:
        if len(names) > 1:
            raise ChannelError(
                f"{manifest}: the dataset has {len(names)} channels {names} and data.channel is not set. "
                "Choose one, e.g. --params data.channel=0 or data.channel=<name>."
            )
        return None
    if isinstance(channel, str) and not channel.isdigit():
        lowered = [name.lower() for name in names]
        if channel.lower() not in lowered:
            raise ChannelError(f"{manifest}: data.channel='{channel}' is not one of the channels {names}.")
        return lowered.index(channel.lower())
    index = int(channel)
    if not 0 <= index < len(names):
        raise ChannelError(f"{manifest}: data.channel={index} is out of range for the channels {names}.")
    return index


def _image_file(
    root: Path | UrlPath, entry: str, channel: int | None, manifest: Path | UrlPath
) -> tuple[Path | UrlPath, int | None]:
    """The image file of a `training` entry, and the channel to take from inside it.

    MSD lists `./imagesTr/x.nii.gz`; nnU-Net v2 stores `imagesTr/x_0000.nii.gz` per channel.
    """
    listed = _inside(root, entry, manifest)
    if listed.exists():
        return listed, channel
    stem = _strip_nifti_suffix(listed.name)
    suffix = listed.name[len(stem):] or ".nii.gz"
    per_channel = listed.with_name(f"{stem}_{(channel or 0):04d}{suffix}")
    if per_channel.exists():
        _check_real_path(root, per_channel, str(manifest))
        return per_channel, None
    raise DatasetNotFoundError(
        f"{manifest}: the image '{entry}' was not found (nor {per_channel.name}). "
        "Restore the file or remove its entry from dataset.json."
    )


def _training_entry(item: object, index: int, manifest: Path | UrlPath) -> tuple[str, str]:
    """The (image, label) paths of the `index`-th `training` entry, refusing a malformed one."""
    missing = [key for key in ("image", "label") if not isinstance(item, dict) or not isinstance(item.get(key), str)]
    if missing:
        raise CorruptFileError(
            f"{manifest}: entry {index} of 'training' (counting from 0) has no {' or '.join(repr(k) for k in missing)} "
            f"path: {json.dumps(item)[:200]}. Each entry needs both, like "
            '{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}: fix the entry or remove it.'
        )
    return item["image"], item["label"]


def _cases_from_training_list(
    root: Path | UrlPath, meta: dict, channel: int | None, manifest: Path | UrlPath
) -> list[CaseFiles]:
    if not isinstance(meta["training"], list):
        raise CorruptFileError(
            f"{manifest}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} entries, "
            f"not {type(meta['training']).__name__}. Fix dataset.json."
        )
    cases = []
    for index, item in enumerate(meta["training"]):
        image_entry, label_entry = _training_entry(item, index, manifest)
        image_path, inner_channel = _image_file(root, image_entry, channel, manifest)
        label_path = _inside(root, label_entry, manifest)
        case_id = _strip_nifti_suffix(Path(label_entry).name)
        if not label_path.exists():
            raise MissingLabelError(
                f"{label_path}: the label of case '{case_id}' (listed in {manifest}) is missing. "
                "Add the label file or remove the case from dataset.json."
            )
        cases.append(CaseFiles(case_id, str(image_path), str(label_path), inner_channel))
    return cases


def _cases_from_folders(root: Path | UrlPath, channel: int | None) -> list[CaseFiles]:
    """nnU-Net v2 datasets have no `training` list: pair `imagesTr/x_000C` with `labelsTr/x`."""
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise DatasetNotFoundError(f"{images_dir}: folder not found. An MSD folder needs imagesTr/ and labelsTr/.")
    _check_real_path(root, images_dir, str(root))
    wanted = f"_{(channel or 0):04d}"
    cases = []
    for image_path in sorted(images_dir.iterdir()):
        stem = _strip_nifti_suffix(image_path.name)
        if image_path.name.startswith(".") or stem == image_path.name or not stem.endswith(wanted):
            continue  # skips macOS "._x.nii.gz" forks and other channels
        case_id = stem[: -len(wanted)]
        label_path = next(
            (root / "labelsTr" / f"{case_id}{s}" for s in NIFTI_SUFFIXES if (root / "labelsTr" / f"{case_id}{s}").exists()),
            None,
        )
        if label_path is None:
            raise MissingLabelError(
                f"{root / 'labelsTr' / (case_id + '.nii.gz')}: the label of case '{case_id}' is missing "
                f"(image {image_path}). Add the label or move the image out of imagesTr/."
            )
        _check_real_path(root, image_path, str(images_dir))
        _check_real_path(root, label_path, str(root / "labelsTr"))
        cases.append(CaseFiles(case_id, str(image_path), str(label_path), None))
    return cases


def list_msd_cases(root: str | os.PathLike, channel: int | str | None = None) -> list[CaseFiles]:
    """List the training cases of an MSD-layout folder, checking that every file exists.

    Args:
        root: the dataset folder (holds dataset.json, imagesTr/, labelsTr/): a local path or a
            URL on an fsspec store (`s3://bucket/Task04_Hippocampus`), read with the store's
            default credentials (for S3 the `AWS_*` variables, `~/.aws`, `FSSPEC_S3_*`).
        channel: `data.channel`: an index, a modality name, or None for single-channel data.

    Returns:
        One :class:`CaseFiles` per case, sorted by case id; its paths are URLs for a URL root.

    Raises:
        DatasetNotFoundError, CorruptFileError, UnsafePathError, MissingLabelError,
        ChannelError, EmptyDatasetError.
    """
    root = dataset_location(root)
    meta = read_dataset_json(root)
    manifest = root / "dataset.json"
    index = resolve_channel(meta, channel, manifest)
    if meta.get("training"):
        cases = _cases_from_training_list(root, meta, index, manifest)
    else:
        cases = _cases_from_folders(root, index)
    if not cases:
        raise EmptyDatasetError(
            f"{root}: no training case found (dataset.json lists none and imagesTr/ holds no "
            "*_0000.nii.gz). Add cases, or check data.msd_dir."
        )
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CorruptFileError(f"{manifest}: cases listed twice: {duplicates}. Remove the duplicates.")
    return sorted(cases, key=lambda case: case.case_id)


def write_msd_dataset(
    root: str | os.PathLike,
    cases: Iterable[tuple[str, Callable[[], tuple[Volume, Volume]]]],
    metadata: dict,
) -> None:
    """Write cases in MSD layout into a fresh folder, then swap it in place of `root`.

    Local folders only: this writes the synthetic phantoms into the project, and its guarantee
    (the old folder stays until the new one is complete, then one rename) needs a real file
    system. Reading (:func:`list_msd_cases`) works on any fsspec store.

    Args:
        root: the local folder to create or replace.
        cases: (case_id, make) pairs; `make()` returns (image, label) volumes. One case is in
            memory at a time.
        metadata: extra dataset.json fields (name, description, generator parameters...).

    If anything fails, `root` is left as it was and the partial folder is removed (what a kill
    leaves: :func:`medseg.storage.publishing.staged_folder`). Every file is flushed to disk before the
    swap, and the new folder gets the mode the umask gives (0755 under the usual 022), not the
    0700 of a temporary folder.
    """
    with staged_folder(root) as staging:
        training = []
        for case_id, make in cases:
            image, label = make()
            write_volume(image, staging / "imagesTr" / f"{case_id}_0000.nii.gz")
            write_volume(label, staging / "labelsTr" / f"{case_id}.nii.gz")
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
        manifest = {
            "modality": {"0": "MR"},
            "labels": {"0": "background", "1": "lesion"},
            "numTraining": len(training),
            "file_ending": ".nii.gz",
            **metadata,
            "training": training,
        }
        (staging / "dataset.json").write_text(json.dumps(manifest, indent=2))
