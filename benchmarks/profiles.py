"""The inference profiles' front on real-size scans: every setting each trained model has, timed
and scored on 256x256x160 scans, against the profiles its training chose on its validation
phantoms.

1. Trains `unet` and `conv3d` on the default phantoms in a project of its own (`--out`; kept,
   so a second run reuses the models), with the ONNX export and the profiles on, as real runs
   have them. `--budget` sets both models' training minutes.
2. Synthesizes `--scans` phantoms of 256x256 pixels and 160 slices (the generator and spacings
   of training, another index), preprocesses each as the segmenter does, and puts its label on
   the same grid.
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
    nx, ny, nz = args.shape
    scans = []
    for index in range(args.scans):
        image, label, affine = synthesize_case(1000 + index, 42, in_plane_size=nx, n_slices_range=(nz, nz))
        image = image[:, :ny] if ny < nx else image
        label = label[:, :ny] if ny < nx else label
        scans.append((Volume(image.astype(np.float32), affine), Volume(label.astype(np.uint8), affine)))
    print(f"{len(scans)} scans of {'x'.join(str(n) for n in scans[0][0].data.shape)} voxels")

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
