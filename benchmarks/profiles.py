"""The inference profiles' front on real-size scans: every setting each trained model has, timed
and scored on 256x256x160 scans, against the profiles its training chose on its validation
phantoms.

1. Trains `unet` and `conv3d` on the default phantoms in a project of its own (`--out`; kept,
   so a second run reuses the models), with the ONNX export and the profiles on, as real runs
   have them. `--budget` sets both models' training minutes.
2. Makes `--scans` scans of 256x256x160 voxels at the models' own spacing: mosaics of 2x2x4
   phantoms of 128x128x40 (the generator of training, other indices; it makes no phantom larger
   than 128 pixels, and a mosaic keeps its lesions at their sizes), preprocesses each as the
   segmenter does, and puts its label on the same grid.
3. Measures every candidate setting (`medseg.inference.profiles.measure_settings`: mirroring,
   overlap, largest component, engine) on them: seconds per scan of the network part and the
   postprocessing, and mean Dice. Prints the table with its Pareto front, the profiles these
   scans would choose, and those the training chose.

Targets, per model, on the real-size scans: the training's `fast` profile is no slower than its
`accurate` one, and its Dice is within `FAST_DICE` (0.02) of the best setting's, so the choice
made on small validation phantoms holds on scans of a real size.

Run: .venv/bin/python benchmarks/profiles.py [--out /tmp/medseg-profiles] [--budget 2.5] [--scans 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _project import kedro, project_copy  # noqa: E402
from _targets import Target, report_targets  # noqa: E402

MODELS = ("unet", "conv3d")


TILE = (128, 128, 40)


def mosaic(index: int, shape: tuple[int, int, int], spacing: tuple[float, ...], synthesize) -> tuple:
    """A scan of `shape` voxels at `spacing` (mm) and its label: phantoms of `TILE` side by side,
    each in RAS order first (the generator stores some in other orientations, as scanners do)."""
    from medseg.imaging.geometry import to_canonical
    from medseg.imaging.io import Volume

    image, label = np.zeros(shape, np.float32), np.zeros(shape, np.uint8)
    tile = 0
    for x in range(0, shape[0], TILE[0]):
        for y in range(0, shape[1], TILE[1]):
            for z in range(0, shape[2], TILE[2]):
                part, labels, affine = synthesize(10_000 + 100 * index + tile, 42, in_plane_size=TILE[0],
                                                  n_slices_range=(TILE[2], TILE[2]), in_plane_spacing_range=(spacing[0],) * 2,
                                                  slice_spacing_range=(spacing[2],) * 2)
                part, labels = (to_canonical(Volume(a, affine)).data for a in (part, labels))
                box = tuple(slice(start, min(start + size, total)) for start, size, total in zip((x, y, z), TILE, shape))
                crop = tuple(slice(0, b.stop - b.start) for b in box)
                image[box], label[box] = part[crop], labels[crop]
                tile += 1
    affine = np.diag([*spacing, 1.0])
    return Volume(image, affine), Volume(label, affine)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/medseg-profiles"))
    parser.add_argument("--budget", type=float, default=None, help="training minutes per model (default: each kind's own)")
    parser.add_argument("--scans", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import pandas as pd

    from medseg.imaging.geometry import label_to_training_grid, to_canonical
    from medseg.imaging.io import Volume
    from medseg.inference import Segmenter
    from medseg.inference.profiles import FAST_DICE, choose_profiles, measure_settings, pareto_front
    from medseg.models.precision import cpu_has_bfloat16, read_cpuinfo
    from medseg.synthetic.shapes import synthesize_case

    out = args.out.resolve()
    project = out / "project"
    if not all((project / f"data/06_models/{m}/segmenter/segmenter.json").exists() for m in MODELS):
        if project.exists():
            import shutil

            shutil.rmtree(project)
        project_copy(project)
        for model in MODELS:
            print(f"training {model} on the default phantoms ...", flush=True)
            params = {f"planning.budget_minutes.{model}": args.budget} if args.budget else {}
            kedro(project, ["--pipelines", model], params, out / "kedro.log")

    cpu = next((line.split(":", 1)[1].strip() for line in read_cpuinfo().splitlines() if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, bfloat16 units: {'yes' if cpu_has_bfloat16(read_cpuinfo()) else 'no'}")
    spacing = tuple(json.loads((project / "data/06_models/unet/segmenter/segmenter.json").read_text())["target_spacing"])
    scans = [mosaic(index, tuple(args.shape), spacing, synthesize_case) for index in range(args.scans)]
    print(f"{len(scans)} scans of {'x'.join(str(n) for n in scans[0][0].data.shape)} voxels at "
          f"{'x'.join(f'{s:.2f}' for s in spacing)} mm")

    targets, report = [], {}
    for model in MODELS:
        segmenter = Segmenter.load(project / f"data/06_models/{model}/segmenter")
        cases = {}
        for index, (scan, label) in enumerate(scans):
            image, geometry = segmenter.preprocess(scan)
            grid_label = label_to_training_grid(to_canonical(label), geometry).data
            cases[f"scan_{index}"] = (lambda image=image: image, lambda grid_label=grid_label: (grid_label > 0).astype(np.uint8))
        rows = measure_settings(segmenter, cases)
        for row, pareto in zip(rows, pareto_front(rows)):
            row["pareto"] = pareto
        here = choose_profiles(rows)
        trained = segmenter.plan.profiles
        table = pd.DataFrame(rows).sort_values("seconds")
        table["here"] = [" ".join(n for n, r in here.items() if r["label"] == label) for label in table["label"]]
        table["trained"] = [" ".join(n for n, r in trained.items() if r["label"] == label) for label in table["label"]]
        print(f"\n{model}: {len(rows)} settings on {len(cases)} real-size scans (front marked *)")
        for row in table.itertuples():
            print(f"  {'*' if row.pareto else ' '} {row.seconds:8.2f} s  Dice {row.dice:.4f}  {row.label:55s} "
                  f"{('this run: ' + row.here) if row.here else ''} {('training: ' + row.trained) if row.trained else ''}")
        by_label = {row["label"]: row for row in rows}
        best = max(row["dice"] for row in rows)
        if trained:
            fast, accurate = by_label[trained["fast"]["label"]], by_label[trained["accurate"]["label"]]
            targets += [Target(f"{model}: training's fast seconds / accurate seconds", fast["seconds"] / accurate["seconds"], "<=", 1.0),
                        Target(f"{model}: best Dice - training's fast Dice", best - fast["dice"], "<=", FAST_DICE)]
        else:
            print(f"{model}: its training chose no profile")
            targets.append(Target(f"{model}: profiles chosen by training", 0, ">=", 1))
        report[model] = {"rows": rows, "this_run": {n: r["label"] for n, r in here.items()},
                         "training": {n: r["label"] for n, r in trained.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "profiles.json").write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), **report}, indent=2))
    return report_targets(targets)


if __name__ == "__main__":
    sys.exit(main())
