"""The viewer page (medseg.evaluation.viewer): its size bound, the volumes it holds, that it
references nothing outside itself, its refusals, and, in headless Chromium with the network
off, that it draws each overlay where its mask is, from a file and inside a sandboxed iframe
as MLflow's artifact view shows it."""

from __future__ import annotations

import base64
import fcntl
import gzip
import io
import json
import os
import re
import select
import shutil
import signal
import time
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.errors import ConfigurationError, GeometryMismatchError, InvalidLabelError
from medseg.evaluation import viewer
from medseg.evaluation.viewer import viewer_page, write_viewer_page
from medseg.imaging.io import Volume

VOLUME_SCRIPT = re.compile(r'<script type="application/octet-stream" id="volume-(\w+)">([^<]*)</script>')


def _ct_like(shape: tuple[int, int, int], noise_hu: float = 20.0, seed: int = 0) -> np.ndarray:
    """A CT-like float32 scan in HU: air around a body, two lungs, a spine and a lesion, their
    edges smooth over about 1% of the field of view, plus Gaussian noise of `noise_hu`."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)

    def inside(r2: np.ndarray) -> np.ndarray:  # 1 inside the ellipsoid r2 < 1, 0 outside
        return 0.5 - 0.5 * np.tanh((np.sqrt(r2) - 1) / 0.02)

    ct = -1000 + 1040 * inside((x / 0.85) ** 2 + (y / 0.65) ** 2 + 0 * z)
    for centre in (-0.4, 0.4):
        ct = ct - 890 * inside(((x - centre) / 0.3) ** 2 + (y / 0.4) ** 2 + (z / 0.9) ** 2)
    ct = ct + 700 * inside((x / 0.08) ** 2 + ((y + 0.5) / 0.08) ** 2 + 0 * z)
    ct = ct + 50 * inside(((x - 0.1) / 0.25) ** 2 + ((y - 0.1) / 0.2) ** 2 + ((z + 0.3) / 0.3) ** 2)
    noise = np.random.default_rng(seed).normal(0.0, noise_hu, shape).astype(np.float32)
    return (ct + noise).astype(np.float32)


def _volumes(page: bytes) -> dict[str, nib.Nifti1Image]:
    """The page's volumes, by name (scan, prediction, reference), decoded as NiiVue reads them."""
    return {
        name: nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text)))
        for name, text in VOLUME_SCRIPT.findall(page.decode("utf-8"))
    }


def _config(page: bytes) -> dict:
    text = page.decode("utf-8")
    return json.loads(re.search(r'<script type="application/json" id="viewer-config">(.*?)</script>', text, re.S).group(1))


class _Elements(HTMLParser):
    """Every element of a page, with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.elements.append((tag, dict(attrs)))


def _elements(page: bytes) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(page.decode("utf-8"))
    return parser.elements


def _oblique_affine() -> np.ndarray:
    """A voxel-to-world matrix with anisotropic voxels, a flipped axis, a rotation and an offset."""
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, -0.9, 2.5])
    affine[:3, 3] = [-90.0, 110.0, -40.0]
    return affine


# Unit tests (no browser) -----------------------------------------------------------------------


def test_page_of_a_ct_sized_scan_fits_its_bound_and_keeps_the_scan():
    shape = (256, 256, 160)
    scan = _ct_like(shape)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    mask = np.zeros(shape, np.uint8)
    mask[140:180, 110:150, 60:90] = 1

    page = viewer_page(Volume(scan, affine), Volume(mask, affine), Volume(mask, affine), title="ct_001")

    assert len(page) <= viewer.DEFAULT_MAX_BYTES
    stored = _volumes(page)["scan"]
    assert stored.shape == shape
    assert stored.get_data_dtype() == np.uint8
    np.testing.assert_allclose(stored.affine, affine, atol=1e-5)
    # The stored scan, scaled back, is the scan within its clip range, to half a level.
    low, high = np.percentile(scan, viewer.CLIP_PERCENTILES)
    levels = int(re.search(rb"The scan in (\d+) intensity levels", page).group(1))
    step = (high - low) / (levels - 1)
    restored = np.asarray(stored.dataobj, dtype=np.float32)
    np.testing.assert_array_less(np.abs(restored - np.clip(scan, low, high)), step / 2 + 1e-3 * abs(step) + 1e-3)


def test_masks_are_stored_in_the_scans_geometry_with_their_class_names():
    shape = (24, 20, 8)
    affine = _oblique_affine()
    scan = np.random.default_rng(1).normal(0, 1, shape).astype(np.float32)
    prediction = np.zeros(shape, np.uint8)
    prediction[2:8, 3:9, 1:4] = 1
    prediction[10:14, 3:9, 1:4] = 2
    reference = np.zeros(shape, np.uint8)
    reference[2:9, 3:9, 1:5] = 1

    page = viewer_page(Volume(scan, affine), Volume(prediction, affine), Volume(reference.astype(np.int64), affine),
                       classes={"1": "kidney", "2": "tumour <b>"}, title="case_002")

    stored = _volumes(page)
    assert set(stored) == {"scan", "prediction", "reference"}
    for name, mask in (("prediction", prediction), ("reference", reference)):
        np.testing.assert_allclose(stored[name].affine, affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(stored[name].dataobj), mask)
    overlays = {overlay["name"]: overlay["colormap"] for overlay in _config(page)["overlays"]}
    assert overlays["prediction"]["labels"] == ["", "kidney", "tumour <b>"]
    assert overlays["prediction"]["I"] == [0, 1, 2]
    assert (overlays["prediction"]["R"][1], overlays["reference"]["G"][1]) == (255, 255)  # red and green
    assert b"tumour &lt;b&gt;" in page and b"tumour <b>" not in page


def test_a_label_that_classes_do_not_name_is_shown_by_its_value():
    shape = (8, 8, 4)
    prediction = np.zeros(shape, np.uint8)
    prediction[:2] = 1
    prediction[4:6] = 3
    page = viewer_page(Volume(np.zeros(shape, np.float32), np.eye(4)), Volume(prediction, np.eye(4)), classes={1: "liver"})
    assert _config(page)["overlays"][0]["colormap"]["labels"] == ["", "liver", "label 3"]


def test_a_case_without_reference_has_one_overlay():
    shape = (8, 8, 4)
    page = viewer_page(Volume(np.zeros(shape, np.float32), np.eye(4)), Volume(np.zeros(shape, np.uint8), np.eye(4)))
    assert set(_volumes(page)) == {"scan", "prediction"}
    assert [overlay["name"] for overlay in _config(page)["overlays"]] == ["prediction"]


def test_page_references_nothing_outside_itself():
    shape = (8, 8, 4)
    title = 'case </script><script src="https://example.org/x.js"></script>'
    page = viewer_page(Volume(np.ones(shape, np.float32), np.eye(4)), Volume(np.ones(shape, np.uint8), np.eye(4)), title=title)

    elements = _elements(page)
    # No element loads anything: no script, style sheet, image or frame from an address.
    loading = [(tag, attrs) for tag, attrs in elements if {"src", "href", "srcset", "data", "action"} & set(attrs)]
    assert loading == []
    assert not any(tag in {"link", "iframe", "img", "object", "embed", "base"} for tag, _ in elements)
    # The title is text, not markup; and the page forbids every request of its own.
    assert sum(tag == "script" for tag, _ in elements) == 5  # config, scan, prediction, NiiVue, the page's
    policy = next(attrs["content"] for tag, attrs in elements if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in policy and "http" not in policy


def test_write_is_atomic_and_returns_the_size(tmp_path):
    shape = (8, 8, 4)
    path = tmp_path / "viewer" / "case.html"
    written = write_viewer_page(path, Volume(np.zeros(shape, np.float32), np.eye(4)), Volume(np.zeros(shape, np.uint8), np.eye(4)))
    assert written == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == ["case.html"]


def test_mismatched_shapes_are_refused_naming_the_case():
    scan = Volume(np.zeros((8, 8, 4), np.float32), np.eye(4))
    with pytest.raises(GeometryMismatchError, match=r"case_007: the prediction has shape \(8, 8, 5\)"):
        viewer_page(scan, Volume(np.zeros((8, 8, 5), np.uint8), np.eye(4)), title="case_007")
    with pytest.raises(GeometryMismatchError, match=r"case_007: the reference has shape"):
        viewer_page(scan, Volume(np.zeros((8, 8, 4), np.uint8), np.eye(4)), Volume(np.zeros((4, 8, 8), np.uint8), np.eye(4)),
                    title="case_007")


def test_a_mask_in_another_geometry_is_refused():
    scan = Volume(np.zeros((8, 8, 4), np.float32), np.eye(4))
    with pytest.raises(GeometryMismatchError, match="case_008: the prediction's affine differs"):
        viewer_page(scan, Volume(np.zeros((8, 8, 4), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), title="case_008")


def test_a_mask_that_is_not_labels_is_refused():
    scan = Volume(np.zeros((8, 8, 4), np.float32), np.eye(4))
    with pytest.raises(InvalidLabelError, match="case_009: the prediction holds values"):
        viewer_page(scan, Volume(np.full((8, 8, 4), 0.5, np.float32), np.eye(4)), title="case_009")


def test_missing_niivue_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setattr(viewer, "NIIVUE_SCRIPT", tmp_path / "niivue.js")
    volume = Volume(np.zeros((8, 8, 4), np.float32), np.eye(4))
    with pytest.raises(ConfigurationError, match="make niivue"):
        viewer_page(volume, volume)


# In a browser ----------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
VIEWPORT = (480, 480)
# The network is off: every request goes to a proxy on the discard port and every name fails,
# loopback included; the page is read from a file.
CHROMIUM_FLAGS = (
    "--headless", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox",
    "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND",
    f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "--hide-scrollbars", "--force-device-scale-factor=1",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
    "--disable-crash-reporter", "--disable-breakpad",
)
TIMEOUT_S = 60.0


class DevTools:
    """Headless Chromium driven by the DevTools protocol on a pipe (`--remote-debugging-pipe`):
    it reads commands from its fd 3 and writes replies and events to its fd 4, each a JSON text
    ended by a NUL byte. Commands go to the one page's session; events are kept in `events`."""

    def __init__(self, profile: Path) -> None:
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        # Moved above 9 first, so that placing them at 3 and 4 cannot overwrite one with the other.
        to_browser_high = fcntl.fcntl(to_browser, fcntl.F_DUPFD_CLOEXEC, 10)
        from_browser_high = fcntl.fcntl(from_browser, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser)
        os.close(from_browser)
        self.pid = os.posix_spawn(
            CHROMIUM, [CHROMIUM, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, to_browser_high, 3),
                (os.POSIX_SPAWN_DUP2, from_browser_high, 4),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,  # its own process group, so that closing it ends its helpers too
        )
        os.close(to_browser_high)
        os.close(from_browser_high)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None
        try:
            page = self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                self.send(f"{domain}.enable")
            self.send("Page.setLifecycleEventsEnabled", enabled=True)
        except BaseException:
            self.close()
            raise

    def send(self, method: str, **params) -> dict:
        """Run one command and return its result; a protocol error fails the test."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        self._write(json.dumps(message).encode() + b"\0")
        reply = self._receive(lambda m: m.get("id") == self._next_id)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def navigate(self, url: str) -> None:
        """Open `url` in the page and wait for its document's load event (its scripts have run).
        A blank page comes first, so that a new document is loaded even where only the fragment
        differs from the page's address (which would otherwise only scroll)."""
        for address in ("about:blank", url):
            since = len(self.events)
            loader = self.send("Page.navigate", url=address)["loaderId"]
            self._receive(lambda m: m.get("method") == "Page.lifecycleEvent"
                          and m["params"]["name"] == "load" and m["params"]["loaderId"] == loader, skip_kept=since)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page, a promise awaited; a thrown error
        fails the test with its description."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"].get("exception", {}).get("description", result)
        return result["result"].get("value")

    def screenshot(self) -> np.ndarray:
        """The page as (height, width, 3) uint8 RGB."""
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def _receive(self, wanted, skip_kept: int | None = None) -> dict:
        if skip_kept is not None:
            for message in self.events[skip_kept:]:
                if wanted(message):
                    return message
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            while b"\0" in self._buffer:
                text, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(text)
                if "id" not in message:
                    self.events.append(message)
                if wanted(message):
                    return message
            remaining = deadline - time.monotonic()
            assert remaining > 0, "Chromium did not answer within the time limit"
            if select.select([self._replies], [], [], remaining)[0]:
                chunk = os.read(self._replies, 1 << 20)
                assert chunk, "Chromium closed its DevTools pipe"
                self._buffer += chunk

    def close(self) -> None:
        """Ask Chromium to quit; kill its process group if it has not within 10 s."""
        try:
            self._write(json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError:  # it has already gone
            pass
        deadline = time.monotonic() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        os.close(self._commands)
        os.close(self._replies)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._commands, view):]

    def requests(self, since: int = 0) -> list[str]:
        """The addresses the page asked for, from event `since` on."""
        return [event["params"]["request"]["url"] for event in self.events[since:]
                if event.get("method") == "Network.requestWillBeSent"]

    def problems(self, since: int = 0) -> list[str]:
        """Exceptions, console errors and blocked requests (a Content-Security-Policy violation),
        from event `since` on."""
        found = []
        for event in self.events[since:]:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("exception", {}).get("description", str(params)))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium, or make browser-tools)")
    devtools = DevTools(tmp_path_factory.mktemp("chromium-profile"))
    yield devtools
    devtools.close()


@pytest.fixture(scope="module")
def quadrant_page(tmp_path_factory) -> Path:
    """A 64x64x8 scan of grey noise, its voxel axes along RAS+, with a prediction block in its
    front right quadrant (high i and j: the patient's right, anterior) and a reference block in
    its front left one. In the radiological convention the page uses, an axial view shows the
    patient's right on the screen's left and anterior at the top: the prediction top left, the
    reference top right."""
    shape = (64, 64, 8)
    scan = np.random.default_rng(2).normal(100.0, 10.0, shape).astype(np.float32)
    prediction = np.zeros(shape, np.uint8)
    prediction[38:58, 38:58] = 1
    reference = np.zeros(shape, np.uint8)
    reference[6:26, 38:58] = 1
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    path = tmp_path_factory.mktemp("viewer") / "quadrants.html"
    write_viewer_page(path, Volume(scan, affine), Volume(prediction, affine), Volume(reference, affine), title="quadrants")
    return path


def _colour_shares(pixels: np.ndarray) -> dict[str, dict[str, float]]:
    """The share of each quadrant's pixels in which red, or green, clearly dominates."""
    rgb = pixels.astype(np.int16)
    red = (rgb[..., 0] > 120) & (rgb[..., 0] - rgb[..., 1:].max(axis=-1) > 60)
    green = (rgb[..., 1] > 120) & (rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2]) > 60)
    half_y, half_x = pixels.shape[0] // 2, pixels.shape[1] // 2
    quadrants = {
        "top left": (slice(0, half_y), slice(0, half_x)), "top right": (slice(0, half_y), slice(half_x, None)),
        "bottom left": (slice(half_y, None), slice(0, half_x)), "bottom right": (slice(half_y, None), slice(half_x, None)),
    }
    return {name: {"red": float(red[q].mean()), "green": float(green[q].mean())} for name, q in quadrants.items()}


def _overlays_in_their_quadrants(shares: dict[str, dict[str, float]]) -> bool:
    """Whether the prediction's red covers a good part of the top left quadrant and only that
    one, and the reference's green the top right one only (each block covers about 40% of its
    quadrant)."""
    return (shares["top left"]["red"] > 0.15 and shares["top right"]["green"] > 0.15
            and all(shares[q]["red"] < 0.01 for q in ("top right", "bottom left", "bottom right"))
            and all(shares[q]["green"] < 0.01 for q in ("top left", "bottom left", "bottom right")))


def _canvas_box(browser: DevTools) -> tuple[slice, slice]:
    box = browser.evaluate("JSON.stringify(document.getElementById('viewer').getBoundingClientRect())")
    box = json.loads(box)
    return slice(round(box["top"]), round(box["bottom"])), slice(round(box["left"]), round(box["right"]))


def _frames(browser: DevTools) -> None:
    browser.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


@pytest.mark.integration
def test_page_draws_each_overlay_where_its_mask_is_with_the_network_off(browser, quadrant_page):
    since = len(browser.events)
    browser.navigate(quadrant_page.as_uri() + "#axial")
    browser.evaluate("window.viewerReady")
    _frames(browser)
    rows, columns = _canvas_box(browser)

    shares = _colour_shares(browser.screenshot()[rows, columns])
    assert _overlays_in_their_quadrants(shares), shares

    # Switched off, the prediction is gone and the reference stays.
    browser.evaluate("document.querySelector('[data-overlay=\"1\"]').click()")
    _frames(browser)
    shares = _colour_shares(browser.screenshot()[rows, columns])
    assert shares["top left"]["red"] < 0.01, shares
    assert shares["top right"]["green"] > 0.15, shares

    # A click on the prediction's block names what lies under it in each volume. The square
    # slice fills the canvas's shorter side, centred; the block's centre is a quarter of it up
    # and left of the centre.
    side = min(rows.stop - rows.start, columns.stop - columns.start)
    x, y = (columns.start + columns.stop) / 2 - side / 4, (rows.start + rows.stop) / 2 - side / 4
    for event in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", type=event, x=x, y=y, button="left", clickCount=1)
    assert browser.evaluate("document.getElementById('location').textContent").endswith(
        "prediction foreground, reference none")

    assert [url for url in browser.requests(since) if not url.startswith(("file:", "data:", "blob:"))] == []
    assert browser.problems(since) == []


@pytest.mark.integration
def test_page_runs_in_a_sandboxed_iframe_as_mlflow_shows_it(browser, quadrant_page, tmp_path):
    # MLflow's artifact view loads an HTML artifact as a blob: URL in <iframe sandbox="allow-scripts">:
    # an opaque origin, without storage, cookies or same-origin requests.
    browser.navigate(quadrant_page.as_uri() + "#axial")  # the page alone, for its canvas's place
    rows, columns = _canvas_box(browser)
    host = tmp_path / "host.html"
    width, height = VIEWPORT
    host.write_text(f'<!doctype html><body style="margin:0"><iframe sandbox="allow-scripts" '
                    f'style="border:0;width:{width}px;height:{height}px;display:block"></iframe></body>')
    browser.navigate(host.as_uri())
    page = json.dumps(quadrant_page.read_text(encoding="utf-8"))
    browser.evaluate(f"document.querySelector('iframe').src = "
                     f"URL.createObjectURL(new Blob([{page}], {{type: 'text/html'}})) + '#axial'")

    # The framed page cannot be reached from the host (another origin): wait until it has drawn.
    deadline = time.monotonic() + TIMEOUT_S
    while not _overlays_in_their_quadrants(shares := _colour_shares(browser.screenshot()[rows, columns])):
        assert time.monotonic() < deadline, shares
        time.sleep(0.2)
