"""Interactive viewer pages: a scan with its predicted and reference masks, in one HTML file.

A page is NiiVue (WebGL2) with everything it needs inlined: NiiVue's script, the page's own
script and style, and the volumes as gzipped NIfTI in base64. It makes no network request (its
Content-Security-Policy forbids any), so it opens from a file (``file://``), from an e-mail, or
in MLflow's artifact view, a sandboxed iframe (it uses no storage, cookie or fetch).

It shows axial, coronal and sagittal planes and a 3D render, in the radiological convention (the
patient's right on the screen's left, as PACS viewers show CT and MR; letters name the sides),
with the prediction (warm colours: red for a single class) and the reference (cool colours:
green) as overlays that can be switched on and off, each class named on hover. A URL fragment
(``#axial``, ``#coronal``, ``#sagittal``, ``#multiplanar``, ``#render``) picks the first view.

**Size.** The scan is stored as uint8: clipped at its 0.5th and 99.5th intensity percentiles
and mapped linearly onto 256 levels, the NIfTI scale (``scl_slope``, ``scl_inter``) giving the
intensities back in the scan's units. Noise is what costs, since gzip cannot compress it: a
noisy CT of 256×256×160 voxels may not fit 10 MB at 256 levels. So the levels are halved (128,
64, 32) until the page fits `max_bytes` (10 MB by default, NiiVue's script included); the scan
keeps its full resolution and extent, which a reviewer needs to judge a mask's border. A scan
that does not fit even at 32 levels is written at 32 levels and a warning is logged. The page
says which levels it holds. Masks cost little: uint8 label maps, mostly zeros.

NiiVue's script is not in git: ``make niivue`` fetches it (pinned, see the Makefile) into
``assets/niivue.js``; ``assets/niivue.LICENSE`` is its licence. The page itself is
``assets/viewer.html``, whose ``<!--medseg:name-->`` markers are filled in here.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import ChannelError, ConfigurationError, GeometryMismatchError, InvalidLabelError
from medseg.imaging.io import Volume
from medseg.storage.publishing import atomic_path

__all__ = ["DEFAULT_MAX_BYTES", "NIIVUE_SCRIPT", "viewer_page", "write_viewer_page"]

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("assets")
NIIVUE_SCRIPT = ASSETS / "niivue.js"
PAGE_TEMPLATE = ASSETS / "viewer.html"

DEFAULT_MAX_BYTES = 10_000_000
INTENSITY_LEVELS = (256, 128, 64, 32)  # tried in this order until the page fits
CLIP_PERCENTILES = (0.5, 99.5)
OVERLAY_OPACITY = 0.5
# An affine that differs from the scan's by more than this (mm, or unitless for the rotation
# and scale part) places a mask elsewhere: it is refused rather than drawn in the wrong place.
AFFINE_TOLERANCE = 1e-3

# Class k (in the order of its label value) gets the k-th colour of its overlay, cycling when
# there are more classes: warm for the prediction, cool for the reference, and neither is the
# crosshair's blue, so the two overlays and the cursor never share a colour.
PREDICTION_COLOURS = ((255, 0, 0), (255, 140, 0), (255, 0, 255), (255, 230, 0), (255, 110, 180), (170, 80, 20))
REFERENCE_COLOURS = ((0, 255, 0), (0, 230, 230), (0, 150, 90), (170, 255, 60), (0, 120, 120), (200, 255, 200))

_MARKER = re.compile(r"<!--medseg:(\w+)-->")


def write_viewer_page(
    path: str | os.PathLike,
    image: Volume,
    prediction: Volume,
    reference: Volume | None = None,
    classes: Mapping[str, str] | Mapping[int, str] | None = None,
    title: str = "",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Write :func:`viewer_page` to a local file, atomically (a temporary file beside it,
    renamed onto it: a reader never sees half a page).

    Args:
        path: the page's local path (``.html``); its folder is made if missing.
        image, prediction, reference, classes, title, max_bytes: as :func:`viewer_page`.

    Returns:
        The number of bytes written.
    """
    page = viewer_page(image, prediction, reference, classes=classes, title=title, max_bytes=max_bytes)
    with atomic_path(path, ".html") as tmp:
        Path(tmp).write_bytes(page)
    return len(page)


def viewer_page(
    image: Volume,
    prediction: Volume,
    reference: Volume | None = None,
    classes: Mapping[str, str] | Mapping[int, str] | None = None,
    title: str = "",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """One self-contained HTML page that shows `image` with `prediction` and `reference` as
    switchable overlays (see the module docstring).

    Args:
        image: the scan, (X, Y, Z) intensities in any unit; NaN shows as its lowest level, and
            -Inf and +Inf as its lowest and highest.
        prediction: (X, Y, Z) label map in the scan's geometry (same shape and affine, as
            inference writes it): 0 is background, 1..255 a class.
        reference: the ground truth, likewise, or None for a case without one.
        classes: {label value: class name} (the keys as ints or as the strings of
            `segmenter.json`); a value present in a mask but not named here shows as
            "label <value>". None names a binary mask's 1 "foreground".
        title: the page's title, and the case named in errors (e.g. the case id).
        max_bytes: the size the page should fit: the scan's intensity levels are halved from
            256 down to 32 until it does.

    Returns:
        The page, UTF-8.

    Raises:
        ConfigurationError: NiiVue's script is missing (``make niivue`` builds it).
        ChannelError: the scan is not 3D.
        GeometryMismatchError: a mask's shape or affine differs from the scan's.
        InvalidLabelError: a mask holds non-integer values, or values outside 0..255.
    """
    niivue = _niivue_script()
    case = title or "the viewer page"
    if np.ndim(image.data) != 3:
        raise ChannelError(f"{case}: the scan has shape {np.shape(image.data)}; a viewer page shows one 3D volume (X, Y, Z).")
    masks = {"prediction": prediction, "reference": reference}
    labels = {name: _label_map(mask, image, name, case) for name, mask in masks.items() if mask is not None}
    names = _class_names(labels.values(), classes)
    overlays = [
        _overlay(name, labels[name], image.affine, names, palette)
        for name, palette in (("prediction", PREDICTION_COLOURS), ("reference", REFERENCE_COLOURS))
        if name in labels
    ]
    low, high = _clip_range(image.data)
    fraction = _fraction_of_range(image.data, low, high)
    for levels in INTENSITY_LEVELS:
        step = (high - low) / (levels - 1) if high > low else 1.0
        scan = _nifti_base64(np.rint(fraction * (levels - 1)).astype(np.uint8), step, low, image.affine)
        scale = (f"The scan in {levels} intensity levels from {low:.4g} to {low + step * (levels - 1):.4g} "
                 f"(its {CLIP_PERCENTILES[0]:g}th to {CLIP_PERCENTILES[1]:g}th percentiles).")
        page = _render_page(title, niivue, scan, overlays, scale)
        if len(page) <= max_bytes:
            return page
    logger.warning("%s: the viewer page is %.1f MB at %d intensity levels, above its %.1f MB bound.",
                   case, len(page) / 1e6, INTENSITY_LEVELS[-1], max_bytes / 1e6)
    return page


def _niivue_script() -> str:
    """NiiVue's browser bundle, ready to inline in a `<script>` element."""
    try:
        script = NIIVUE_SCRIPT.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(
            f"NiiVue's script {NIIVUE_SCRIPT} is missing: the viewer pages inline it. Run `make niivue` "
            "(it fetches the pinned version from the npm registry once; `make test` does it too)."
        ) from None
    # Inside a <script> element only "</script" would end it early.
    return re.sub(r"</(script)", r"<\\/\1", script, flags=re.IGNORECASE)


def _label_map(mask: Volume, image: Volume, name: str, case: str) -> np.ndarray:
    """`mask`'s data as uint8, after checking that it lies in `image`'s geometry."""
    data = np.asarray(mask.data)
    if data.shape != np.shape(image.data):
        raise GeometryMismatchError(
            f"{case}: the {name} has shape {data.shape} but the scan {np.shape(image.data)}; a mask must be in "
            "its scan's own geometry (inference maps its prediction back to it)."
        )
    if not np.allclose(mask.affine, image.affine, rtol=0.0, atol=AFFINE_TOLERANCE):
        raise GeometryMismatchError(
            f"{case}: the {name}'s affine differs from the scan's, so it would be drawn elsewhere:\n"
            f"{np.asarray(mask.affine).round(4)}\nagainst\n{np.asarray(image.affine).round(4)}"
        )
    if data.dtype == np.uint8:
        return data
    if data.size and (not np.array_equal(data, np.rint(data)) or data.min() < 0 or data.max() > 255):
        raise InvalidLabelError(f"{case}: the {name} holds values that are not labels 0..255 (from {data.min()} to {data.max()}).")
    return data.astype(np.uint8)


def _class_names(labels: Iterable[np.ndarray], classes: Mapping[str, str] | Mapping[int, str] | None) -> dict[int, str]:
    """{label value: name} of every foreground value that `classes` names or a mask holds."""
    named = {int(value): str(name) for value, name in (classes or {}).items() if int(value) != 0}
    present = set().union(*(np.unique(data).tolist() for data in labels)) - {0}
    if classes is None and present <= {1}:
        named = {1: "foreground"}
    return {value: named.get(value, f"label {value}") for value in sorted(present | set(named))}


def _overlay(
    name: str, data: np.ndarray, affine: np.ndarray, names: Mapping[int, str], palette: Sequence[tuple[int, int, int]]
) -> dict:
    """One overlay of the page's configuration: its volume and NiiVue's label colour map."""
    colours = [palette[k % len(palette)] for k in range(len(names))]
    return {
        "name": name,
        "volume": _nifti_base64(data, 1.0, 0.0, affine),
        # NiiVue's label colour map (ColorMap): index I gets colour R, G, B and alpha A.
        "colormap": {
            "I": [0, *names],
            "R": [0, *(c[0] for c in colours)],
            "G": [0, *(c[1] for c in colours)],
            "B": [0, *(c[2] for c in colours)],
            "A": [0, *(255 for _ in colours)],
            "labels": ["", *names.values()],
        },
        "legend": [{"name": class_name, "colour": "rgb({}, {}, {})".format(*colour)}
                   for class_name, colour in zip(names.values(), colours)],
    }


def _clip_range(data: np.ndarray) -> tuple[float, float]:
    """The CLIP_PERCENTILES of `data`'s finite values; (0, 0) when it has none."""
    finite = np.asarray(data)[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(finite, CLIP_PERCENTILES)
    return float(low), float(high)


def _fraction_of_range(data: np.ndarray, low: float, high: float) -> np.ndarray:
    """Where each voxel lies between `low` (0) and `high` (1), clipped, float32; NaN counts as
    `low`, and a constant scan is all 0."""
    data = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=low, posinf=high, neginf=low)
    if high <= low:
        return np.zeros(data.shape, np.float32)
    return np.clip((data - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _nifti_base64(data: np.ndarray, slope: float, intercept: float, affine: np.ndarray) -> str:
    """A uint8 volume as gzipped NIfTI (maximum compression) in base64, in `affine`'s geometry;
    its display range (`cal_min`, `cal_max`) is its whole range of levels."""
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(np.uint8)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_slope_inter(slope, intercept)
    img.header["cal_min"] = intercept
    img.header["cal_max"] = intercept + slope * float(data.max(initial=0))
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)).decode("ascii")


def _render_page(title: str, niivue: str, scan: str, overlays: list[dict], scale: str) -> bytes:
    """The page template with its parts filled in; `scale` says how the scan was quantized."""
    config = {
        "view": "multiplanar",
        "opacity": OVERLAY_OPACITY,
        "overlays": [{key: overlay[key] for key in ("name", "colormap")} for overlay in overlays],
    }
    parts = {
        "title": html.escape(title or "medseg viewer"),
        "scale": html.escape(scale),
        "overlays": "\n".join(_overlay_control(index, overlay) for index, overlay in enumerate(overlays, start=1)),
        # "<" escaped keeps any "</script>" in a title or class name from ending the element.
        "config": json.dumps(config).replace("<", "\\u003c"),
        "volumes": "\n".join(
            f'<script type="application/octet-stream" id="volume-{name}">{volume}</script>'
            for name, volume in [("scan", scan), *((overlay["name"], overlay["volume"]) for overlay in overlays)]
        ),
        "niivue": niivue,
    }
    template = PAGE_TEMPLATE.read_text(encoding="utf-8")
    return _MARKER.sub(lambda match: parts[match.group(1)], template).encode("utf-8")


def _overlay_control(index: int, overlay: dict) -> str:
    """The checkbox that shows or hides overlay `index` (NiiVue's volume index), with its legend."""
    legend = "".join(
        f'<span class="class"><span class="swatch" style="background: {entry["colour"]}"></span>{html.escape(entry["name"])}</span>'
        for entry in overlay["legend"]
    )
    return (f'<label class="overlay"><input type="checkbox" data-overlay="{index}" checked> '
            f'{html.escape(overlay["name"])}{legend}</label>')
