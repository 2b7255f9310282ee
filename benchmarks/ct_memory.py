"""Peak memory of the `unet` and `conv3d` pipelines on four CT-sized scans.

The scenario of issue 12: four scans of 512×512×160 voxels, int16, 0.8×0.8×2.5 mm, as a user's
MSD-layout folder. The script writes them to a temporary folder (air at -1000 HU, a body of
fat and soft tissue, a spine, and one organ-like ellipsoid of about 60 HU with texture and
noise, labelled 1), then runs `kedro run --pipelines unet` and `kedro run --pipelines conv3d`
on them, each in a fresh temporary copy of the project (conf/ and pyproject.toml, empty data
folders, its own MLflow database) and its own child process, with short training.

Peak memory of each run is measured twice and the larger figure is the verdict:
- `os.wait4` on the child: the largest resident set size of the child and of any process it
  waited for (Linux `ru_maxrss`);
- the summed RSS of the child and all its descendants, polled every 0.2 s with psutil.

Target: at most 4 GB (4.0 GiB) for each pipeline at the default `planning.memory_gb` (4), and
at most `--memory-gb` + 0.5 GiB with a smaller one (2.5 GiB at 2: the budget steers). The script exits 1 when either misses it or
fails.

What is shortened, and why it does not change what is measured:
- training: `epochs=1`, a few steps (the sampler still loads whole CT cases);
- `--unet-filters N` (not set by default: the pipeline's 32 filters) shortens the U-Net's
  whole-slice inference, about 2 min per CT case on 2 CPU cores at 32 filters. Memory is not
  lost by it: slices per batch come from `planning.memory_gb` and the model's width, so a
  narrower model gets proportionally more slices per batch and its activations fill the same
  budget (the planned batch is printed).
- `conv3d.inference.overlap` (default here 0, the pipeline's default 0.5): 0.5 means about
  7 window evaluations per voxel, 8 min per CT case. The overlap changes the number of
  windows, not the memory: two volume-sized accumulators and one batch of windows.
Everything else (data steps, preprocessing at the scans' own spacing, the 512×512×160 grid,
evaluation, reports) runs at full size with the pipelines' defaults.

Run: .venv/bin/python benchmarks/ct_memory.py [--cases 4] [--slices 160] [--steps 2]
     [--unet-filters N] [--conv3d-overlap 0] [--pipelines unet conv3d] [--keep]
It needs no data; about 11 minutes on 2 CPU cores (`--unet-filters 8`: about 7).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _targets import Target, report_targets
from scale_out import cpu_name

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_LAYERS = ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input",
               "06_models", "07_model_output", "08_reporting")
SPACING_MM = (0.8, 0.8, 2.5)
IN_PLANE = 512
TARGET_GIB = 4.0


def make_project_copy(root: Path) -> Path:
    """conf/ and pyproject.toml of the repository in `root`, with empty data folders (as in
    tests/conftest.py); `medseg` itself is imported from the installed package."""
    shutil.copytree(REPO_ROOT / "conf", root / "conf")
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "conf" / "local").mkdir(exist_ok=True)
    (root / "src").mkdir()
    (root / "notebooks").mkdir()
    for layer in DATA_LAYERS:
        (root / "data" / layer).mkdir(parents=True)
    return root


def ct_case(index: int, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like scan and its organ label, (512, 512, n_slices) int16 HU and uint8.

    Built slab by slab in float32, so the writer never holds more than the two output arrays
    and one slab of temporaries.
    """
    from scipy import ndimage

    rng = np.random.default_rng(1000 + index)
    shape = (IN_PLANE, IN_PLANE, n_slices)
    image = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    # Coordinates in mm from the volume's centre.
    x = (np.arange(IN_PLANE, dtype=np.float32) - IN_PLANE / 2) * SPACING_MM[0]
    y = (np.arange(IN_PLANE, dtype=np.float32) - IN_PLANE / 2) * SPACING_MM[1]
    z_all = (np.arange(n_slices, dtype=np.float32) - n_slices / 2) * SPACING_MM[2]
    body = (170.0 + rng.uniform(-10, 10), 120.0 + rng.uniform(-10, 10))
    organ_centre = np.array([-60.0, 20.0, 0.0]) + rng.uniform(-15, 15, 3) * [1.0, 1.0, 0.01 * n_slices]
    organ_radii = np.array([75.0, 60.0, 0.3 * n_slices * SPACING_MM[2]]) * rng.uniform(0.85, 1.15, 3)
    # Texture: smooth low-resolution noise, upsampled to the grid.
    coarse = rng.standard_normal((IN_PLANE // 8, IN_PLANE // 8, max(2, n_slices // 8))).astype(np.float32)
    texture = ndimage.zoom(ndimage.gaussian_filter(coarse, 1.0), [a / b for a, b in zip(shape, coarse.shape)], order=1)
    xx, yy = np.meshgrid(x, y, indexing="ij")
    body_r = (xx / body[0]) ** 2 + (yy / body[1]) ** 2
    spine = ((xx / 18.0) ** 2 + ((yy + 70.0) / 18.0) ** 2) <= 1.0
    slab = 16
    for z0 in range(0, n_slices, slab):
        z = z_all[z0 : z0 + slab]
        hu = np.full((IN_PLANE, IN_PLANE, len(z)), -1000.0, dtype=np.float32)
        inside = body_r <= 1.0
        hu[inside] = 40.0
        hu[inside & (body_r > 0.85)] = -100.0  # subcutaneous fat
        hu[spine] = 700.0
        organ = (
            ((xx[..., None] - organ_centre[0]) / organ_radii[0]) ** 2
            + ((yy[..., None] - organ_centre[1]) / organ_radii[1]) ** 2
            + ((z[None, None, :] - organ_centre[2]) / organ_radii[2]) ** 2
        ) <= 1.0
        hu[organ] = 60.0
        hu += 15.0 * texture[:, :, z0 : z0 + slab] * inside[..., None]
        hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
        image[:, :, z0 : z0 + slab] = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
        label[:, :, z0 : z0 + slab] = organ
    return image, label


def write_ct_dataset(root: Path, n_cases: int, n_slices: int) -> float:
    """Write `n_cases` CT-like scans in MSD layout; return one image's size in memory, MiB."""
    import nibabel as nib

    # As a scanner's DICOM turned NIfTI: LPS voxel axes, so canonicalization flips x and y.
    affine = np.diag([-SPACING_MM[0], -SPACING_MM[1], SPACING_MM[2], 1.0])
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for index in range(n_cases):
        case_id = f"ct_{index:03d}"
        image, label = ct_case(index, n_slices)
        for data, path in ((image, root / "imagesTr" / f"{case_id}_0000.nii.gz"), (label, root / "labelsTr" / f"{case_id}.nii.gz")):
            img = nib.Nifti1Image(data, affine)
            img.set_data_dtype(data.dtype)
            img.set_sform(affine, code=1)
            img.set_qform(affine, code=1)
            nib.save(img, str(path))
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    manifest = {
        "name": "CTMemoryBenchmark",
        "description": "CT-sized synthetic scans written by benchmarks/ct_memory.py",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ"},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return IN_PLANE * IN_PLANE * n_slices * 2 / 2**20


class TreePeak:
    """Polls the summed RSS of a process and its descendants until stopped; keeps the peak and
    when it happened (wall-clock seconds since the epoch)."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        import psutil

        self._root = psutil.Process(pid)
        self._interval = interval_s
        self.peak_bytes = 0
        self.peak_time = 0.0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                processes = [self._root, *self._root.children(recursive=True)]
                total = 0
                for process in processes:
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        pass
                self.samples.append((time.time(), total))
                if total > self.peak_bytes:
                    self.peak_bytes, self.peak_time = total, time.time()
            except psutil.Error:
                return
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


_STAMP = re.compile(r"^\[(\d\d/\d\d/\d\d \d\d:\d\d:\d\d)\]")
_NODE = re.compile(r"Running node: ([A-Za-z0-9_]+)")


def node_at(log_text: str, when: float) -> str:
    """The node that was running at `when` (epoch seconds), from the times Kedro's console
    log prints (1 s resolution, local time): the last "Running node" line stamped at or before
    it."""
    current, stamp, found = "", None, "(before the first node)"
    for line in log_text.splitlines():
        match = _STAMP.match(line)
        if match:
            stamp = time.mktime(time.strptime(match.group(1), "%m/%d/%y %H:%M:%S"))
        node = _NODE.search(line)
        if node and stamp is not None:
            current = node.group(1)
            if stamp <= when:
                found = current
    return found


def node_peaks(log_text: str, samples: list[tuple[float, int]]) -> dict[str, tuple[float, float]]:
    """Each node's (RSS when it started, peak RSS while it ran), in MiB, from the polled samples
    and the node at each sample's time; in the order the nodes ran."""
    peaks: dict[str, tuple[float, float]] = {}
    for when, total in samples:
        node = node_at(log_text, when)
        mib = total / 2**20
        start, peak = peaks.get(node, (mib, 0.0))
        peaks[node] = (start, max(peak, mib))
    return peaks


def run_pipeline(pipeline: str, params: dict[str, object], workdir: Path,
                 prepare: Callable[[Path], None] | None = None) -> dict[str, float]:
    """`kedro run --pipelines <pipeline>` in a fresh project copy; its peak RSS and wall time.
    `prepare(project)` may edit the copy first (a list-valued parameter, which `--params`
    cannot carry: it splits on commas)."""
    project = make_project_copy(workdir / f"project_{pipeline}")
    if prepare is not None:
        prepare(project)
    text = ",".join(f"{key}={value}" for key, value in params.items())
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", pipeline, "--params", text]
    # A wide console, so that Kedro's rich log keeps each node name on its line.
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    log_path = workdir / f"kedro_{pipeline}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
        tree = TreePeak(child.pid)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        tree.stop()
        returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    # The RSS timeline, for a closer look with --keep: epoch seconds, MiB.
    (workdir / f"rss_{pipeline}.csv").write_text("".join(f"{t:.1f},{b / 2**20:.1f}\n" for t, b in tree.samples))
    if returncode != 0:
        tail = log_path.read_text().splitlines()[-40:]
        print(f"kedro run --pipelines {pipeline} failed (exit {returncode}); log {log_path}:\n" + "\n".join(tail))
        return {"ok": False, "seconds": seconds, "maxrss_mib": usage.ru_maxrss / 1024.0, "tree_mib": tree.peak_bytes / 2**20}
    summary_path = project / "data" / "08_reporting" / pipeline / "metrics_summary.json"
    dice = float("nan")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        dice = _find_dice_mean(summary)
    masks = sorted((project / "data" / "07_model_output" / pipeline).rglob("*.nii*"))
    log_text = log_path.read_text()
    planned = re.findall(r"\w+: \d+ \w+ of \S+ per batch \([^)]*\)", log_text)
    return {
        "ok": True,
        "seconds": seconds,
        "maxrss_mib": usage.ru_maxrss / 1024.0,  # Linux: KiB
        "tree_mib": tree.peak_bytes / 2**20,
        "dice": dice,
        "n_masks": len(masks),
        "planned": planned[-1] if planned else "",
        "peak_node": node_at(log_text, tree.peak_time),
        "node_peaks": node_peaks(log_text, tree.samples),
    }


def _find_dice_mean(summary: dict) -> float:
    """The test Dice mean, wherever the summary's layout keeps it."""
    for key, value in summary.items():
        if key == "dice" and isinstance(value, dict) and "mean" in value:
            return float(value["mean"])
        if isinstance(value, dict):
            found = _find_dice_mean(value)
            if found == found:
                return found
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4, help="CT-sized scans to write (default 4)")
    parser.add_argument("--slices", type=int, default=160, help="axial slices per scan (default 160)")
    parser.add_argument("--steps", type=int, default=2, help="training steps (one epoch; default 2)")
    parser.add_argument("--unet-filters", type=int, default=None, help="unet.model.base_filters (default: the pipeline's, 32)")
    parser.add_argument("--conv3d-overlap", type=float, default=0.0, help="conv3d.inference.overlap (default 0; pipeline default 0.5)")
    parser.add_argument("--memory-gb", type=float, default=None, help="planning.memory_gb (default: the project's)")
    parser.add_argument("--pipelines", nargs="+", default=["unet", "conv3d"], choices=["unet", "conv3d"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (scans, projects, logs)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="medseg_ct_memory_"))
    results = {}
    try:
        start = time.perf_counter()
        msd_dir = workdir / "Task00_CT"
        image_mib = write_ct_dataset(msd_dir, args.cases, args.slices)
        print(
            f"wrote {args.cases} scans of {IN_PLANE}x{IN_PLANE}x{args.slices} int16, {SPACING_MM} mm "
            f"({image_mib:.0f} MiB each as int16, {2 * image_mib:.0f} MiB as float32) in {time.perf_counter() - start:.0f} s"
        )
        common = {
            "data.source": "msd",
            "data.msd_dir": str(msd_dir),
        }
        if args.memory_gb is not None:
            common["planning.memory_gb"] = args.memory_gb
        per_pipeline = {
            "unet": {
                **({"unet.model.base_filters": args.unet_filters} if args.unet_filters else {}),
                "unet.training.epochs": 1,
                "unet.training.steps_per_epoch": args.steps,
                "unet.training.validation_steps": 1,
            },
            "conv3d": {
                "conv3d.inference.overlap": args.conv3d_overlap,
                "conv3d.training.epochs": 1,
                "conv3d.training.steps_per_epoch": args.steps,
                "conv3d.training.validation_steps": 1,
            },
        }
        for pipeline in args.pipelines:
            results[pipeline] = run_pipeline(pipeline, {**common, **per_pipeline[pipeline]}, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    # The budget steers: 4 GiB at the default planning.memory_gb (4), half a GiB over a smaller one.
    target_gib = TARGET_GIB if args.memory_gb is None else min(TARGET_GIB, args.memory_gb + 0.5)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; planning.memory_gb {args.memory_gb or 'default'}; peak RSS per kedro run (child process: wait4 ru_maxrss; child tree: psutil, 0.2 s)")
    targets = []
    for pipeline, result in results.items():
        peak_gib = max(result["maxrss_mib"], result["tree_mib"]) / 1024.0
        status = "" if result["ok"] else "   RUN FAILED"
        print(
            f"{pipeline:7s} peak RSS {result['maxrss_mib']:8.1f} MiB (process), {result['tree_mib']:8.1f} MiB (tree); "
            f"wall {result['seconds'] / 60:5.1f} min{status}"
        )
        if result["ok"]:
            print(f"        {result['n_masks']} masks written, test Dice mean {result['dice']:.3f} (short training: not a quality figure)")
            print(f"        tree peak during node {result['peak_node']}")
            heaviest = sorted(result["node_peaks"].items(), key=lambda item: -item[1][1])[:5]
            print("        heaviest nodes (MiB at start -> peak): "
                  + "; ".join(f"{node} {start:.0f} -> {peak:.0f}" for node, (start, peak) in heaviest))
            if result["planned"]:
                print(f"        {result['planned']}")
        targets.append(Target(f"{pipeline} peak RSS GiB", peak_gib if result["ok"] else float("nan"), "<=", target_gib))
    return report_targets(targets)


if __name__ == "__main__":
    sys.exit(main())
