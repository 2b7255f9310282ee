"""The planned 2D slice against a fixed small one, on a large structure.

A stand-in for real brain masks, which this project has no offline copy of: the phantoms'
images relabelled with their head (smoothed image above its 60th percentile, holes filled,
largest region: about 40 % of the voxels), 24 cases in MSD layout. Side by side in one run,
`kedro run --pipelines unet` with the default parameters (slice size `auto`: the planner gives
the whole 96x96 slice for a structure this large) and with `unet.model.input_size=48` (the
size that suits the phantoms' small lesions), each with the same time budget.

Target: the planned slice reaches a test Dice >= 0.93 and is no worse than the fixed one, beyond
`SEED_NOISE` (0.02: each Dice is one training run of one seed; over four seeds the U-Net's test
Dice had a standard deviation of 0.04). Exits 1 on a miss.

Run: .venv/bin/python benchmarks/large_structure.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SEED_NOISE = 0.02

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from _targets import Target, report_targets  # noqa: E402
from ct_memory import run_pipeline  # noqa: E402
from scipy import ndimage  # noqa: E402

from medseg.synthetic.shapes import synthesize_case  # noqa: E402


def write_head_dataset(root: Path, n_cases: int = 24, seed: int = 42) -> float:
    """Phantom images with head masks as labels, in MSD layout; returns the mean foreground share."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training, shares = [], []
    for index in range(n_cases):
        image, _, affine = synthesize_case(index, seed)
        smooth = ndimage.gaussian_filter(image, 1.0)
        mask = ndimage.binary_fill_holes(ndimage.binary_opening(smooth > np.percentile(smooth, 60)))
        components, count = ndimage.label(mask)
        if count:
            mask = components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1
        shares.append(float(mask.mean()))
        name = f"head_{index:03d}"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{name}_0000.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}_0000.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    manifest = {"name": "medseg-heads", "labels": {"0": "background", "1": "head"}, "modality": {"0": "MR"},
                "numTraining": n_cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return float(np.mean(shares))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="medseg-large-"))
    dataset = workdir / "Task_Heads"
    share = write_head_dataset(dataset)
    print(f"{os.cpu_count()} CPUs; head masks cover {share:.0%} of the voxels; data in {dataset}")
    common = {"data.source": "msd", "data.msd_dir": str(dataset)}
    results = {}
    for label, extra in (("planned slice (auto)", {}), ("fixed 48x48", {"unet.model.input_size": 48})):
        run_dir = workdir / ("planned" if not extra else "fixed")
        run_dir.mkdir()
        results[label] = run_pipeline("unet", {**common, **extra}, run_dir)
        plan_path = run_dir / "project_unet" / "data" / "05_model_input" / "unet" / "plan.json"
        used = json.loads(plan_path.read_text())["used"] if plan_path.exists() else {}
        r = results[label]
        print(f"{label:>22}: test Dice {r.get('dice', float('nan')):.3f}, {r['seconds'] / 60:.1f} min, "
              f"slice {used.get('model.input_size')}, {used.get('training.epochs')} x {used.get('training.steps_per_epoch')} steps")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    planned, fixed = results["planned slice (auto)"], results["fixed 48x48"]
    return report_targets([
        Target("planned-slice test Dice", planned.get("dice", float("nan")), ">=", 0.93),
        # No worse than the fixed slice beyond one seed's noise: each figure is one training run,
        # and on 2026-12-06 (AMD EPYC, bfloat16 training) both reached 0.96-0.97, 0.011 apart.
        Target("planned minus fixed-slice Dice", planned.get("dice", float("nan")) - fixed.get("dice", float("nan")), ">=", -SEED_NOISE),
    ])


if __name__ == "__main__":
    sys.exit(main())
