"""Do the QC flags find the masks not to trust? A trained U-Net, its clean test scans and the same
scans corrupted in five realistic ways, each flag's AUROC for the failures, and calibration.

    .venv/bin/python benchmarks/qc.py [--out DIR] [--cases N] [--per-corruption K] [--budget MIN]

1. A project of its own trains `unet` on phantoms (`kedro run --pipeline unet`, its default recipe,
   `--budget` minutes), with N test cases (20).
2. K test scans (5) per corruption, each kept with its reference:
   - heavy noise: Gaussian noise of 1.5 times the image's standard deviation;
   - inverted contrast: max + min - x;
   - a field of view cut through the structure: the scan and its reference cropped at the
     structure's centre along S (the mask is scored on the cut grid);
   - a wrong spacing in the header: the voxels as they are, the affine's voxel sizes doubled
     in-plane (the reference keeps its true geometry: the mask is scored voxel for voxel);
   - a different modality's look: the intensities through a non-monotonic map
     ((x - median)², as a T2 differs from a T1), rescaled to the original range.
3. `kedro run --pipeline predict` on the clean and corrupted scans; each mask's Dice against its
   reference; the QC columns of `predictions.csv`.

Reported: the AUROC of the combined `qc_score` for telling the cases with Dice < 0.8 from the
rest (target >= 0.9) and each flag's own; the share of clean test cases flagged (target <= 10 %);
the test ECE before and after temperature scaling from the run's `calibration.json` (target:
after <= before). The per-scan table goes to `<out>/qc_cases.csv`. Exits 1 on a missed target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _project import kedro, project_copy  # noqa: E402
from _targets import Target, report_targets  # noqa: E402

CORRUPTIONS = ("heavy noise", "inverted contrast", "field of view cut", "wrong spacing", "other modality")
FAILURE_DICE = 0.8


def corrupt(kind: str, image: nib.Nifti1Image, label: nib.Nifti1Image, rng: np.random.Generator):
    """(scan, reference, scored voxel for voxel) of one corruption of a case."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    reference = np.asarray(label.dataobj)
    affine = image.affine.copy()
    if kind == "heavy noise":
        data = data + rng.normal(0.0, 1.5 * float(data.std()), size=data.shape).astype(np.float32)
    elif kind == "inverted contrast":
        data = float(data.max()) + float(data.min()) - data
    elif kind == "field of view cut":
        axis = int(np.argmax(np.abs(affine[2, :3])))  # the array axis that runs along S
        inside = np.flatnonzero(np.moveaxis(reference, axis, 0).reshape(reference.shape[axis], -1).any(axis=1))
        cut = int(inside.mean()) if inside.size else reference.shape[axis] // 2
        keep = [slice(None)] * 3
        keep[axis] = slice(0, cut)
        data, reference = data[tuple(keep)], reference[tuple(keep)]
    elif kind == "wrong spacing":
        affine[:3, :2] *= 2.0  # the header says twice the in-plane voxel size
    elif kind == "other modality":
        mapped = (data - float(np.median(data))) ** 2
        data = (mapped / max(float(mapped.max()), 1e-6) * (float(data.max()) - float(data.min())) + float(data.min())).astype(np.float32)
    return nib.Nifti1Image(data.astype(np.float32), affine), reference


def dice(reference: np.ndarray, mask: np.ndarray) -> float:
    a, b = reference != 0, mask != 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/medseg-qc"), help="work folder (default /tmp/medseg-qc)")
    parser.add_argument("--cases", type=int, default=20, help="clean test cases (default 20)")
    parser.add_argument("--per-corruption", type=int, default=5, help="scans per corruption (default 5)")
    parser.add_argument("--budget", type=float, default=None, help="training minutes (default: the U-Net's own)")
    args = parser.parse_args()
    if args.per_corruption > args.cases:
        raise SystemExit(f"--per-corruption {args.per_corruption} is more than --cases {args.cases}.")

    from medseg.evaluation.metrics import classification_metrics

    out = args.out.resolve()
    project = out / "project"
    if not (project / "data/06_models/unet/segmenter/segmenter.json").exists():
        if project.exists():
            import shutil

            shutil.rmtree(project)
        project_copy(project)
        n_cases = int(np.ceil(args.cases / 0.4))  # 40 % of the cases are test cases
        params = {"data.synthetic.n_cases": n_cases, "data.split.train": 0.45, "data.split.val": 0.15,
                  "data.split.test": 0.4, **({"planning.budget_minutes.unet": args.budget} if args.budget else {})}
        print(f"training unet on {n_cases} phantoms ...", flush=True)
        kedro(project, ["--pipelines", "unet"], params, out / "kedro.log")
    splits = pd.read_csv(project / "data/03_primary/splits.csv", dtype={"case_id": str})
    test_cases = sorted(splits.loc[splits["split"] == "test", "case_id"])[: args.cases]
    raw = project / "data/01_raw/synthetic"
    scans, references = out / "scans", {}
    if scans.exists():
        import shutil

        shutil.rmtree(scans)
    scans.mkdir(parents=True)
    rng = np.random.default_rng(0)
    kinds = {}
    for case in test_cases:
        image, label = nib.load(raw / "imagesTr" / f"{case}_0000.nii.gz"), nib.load(raw / "labelsTr" / f"{case}.nii.gz")
        nib.save(image, scans / f"{case}.nii.gz")
        references[case], kinds[case] = np.asarray(label.dataobj), "clean"
    for index, kind in enumerate(CORRUPTIONS):
        for offset in range(args.per_corruption):
            case = test_cases[(index * args.per_corruption + offset) % len(test_cases)]
            image, label = nib.load(raw / "imagesTr" / f"{case}_0000.nii.gz"), nib.load(raw / "labelsTr" / f"{case}.nii.gz")
            scan, reference = corrupt(kind, image, label, rng)
            name = f"{case}-{kind.replace(' ', '_')}"
            nib.save(scan, scans / f"{name}.nii.gz")
            references[name], kinds[name] = reference, kind
    masks = out / "masks"
    print(f"predicting {len(references)} scans ({len(test_cases)} clean) ...", flush=True)
    kedro(project, ["--pipelines", "predict"], {"predict.model": "unet", "predict.input_dir": scans,
                                                "predict.output_dir": masks}, out / "kedro.log")
    table = pd.read_csv(masks / "predictions.csv", dtype={"case_id": str}).set_index("case_id")
    rows = []
    for name, reference in references.items():
        mask = np.asarray(nib.load(masks / f"{name}.nii.gz").dataobj)
        rows.append({"case": name, "corruption": kinds[name], "dice": dice(reference, mask),
                     **{k: table.loc[name, k] for k in table.columns if k.startswith("qc_")}})
    cases = pd.DataFrame(rows)
    cases["qc_flags"] = cases["qc_flags"].fillna("")
    cases.to_csv(out / "qc_cases.csv", index=False)

    failed = (cases["dice"] < FAILURE_DICE).to_numpy()
    print(f"\n{'corruption':<20} {'scans':>5} {'Dice':>7} {'failed':>7} {'flagged':>8} {'QC score':>9}")
    for kind in ("clean", *CORRUPTIONS):
        part = cases[cases["corruption"] == kind]
        print(f"{kind:<20} {len(part):>5} {part['dice'].mean():>7.3f} {int((part['dice'] < FAILURE_DICE).sum()):>7} "
              f"{int((part['qc_flags'] != '').sum()):>8} {part['qc_score'].median():>9.2f}")
    print(f"\ncases with Dice < {FAILURE_DICE}: {int(failed.sum())} of {len(cases)}")
    aurocs = {}
    for column in ("qc_score", "qc_out_of_distribution", "qc_low_confidence", "qc_implausible_size"):
        aurocs[column] = classification_metrics(failed.astype(int), cases[column].to_numpy(dtype=float))["roc_auc"]
        print(f"AUROC of {column:<24} for Dice < {FAILURE_DICE}: {aurocs[column]:.3f}")
    clean = cases[cases["corruption"] == "clean"]
    clean_flagged = float((clean["qc_flags"] != "").mean())
    print(f"clean test cases flagged: {clean_flagged:.1%} ({int((clean['qc_flags'] != '').sum())} of {len(clean)})")
    calibration = json.loads((project / "data/08_reporting/unet/calibration.json").read_text())
    if "val_ece_before" in calibration:
        print(f"fitted temperature {calibration['fitted_temperature']:.3f}; validation ECE (balanced sample) "
              f"{calibration['val_ece_before']:.4f} before, {calibration['val_ece_after']:.4f} after")
    print(f"temperature {calibration['temperature']:.3f}; test ECE {calibration['test_ece_before']:.4f} before, "
          f"{calibration['test_ece_after']:.4f} after ({calibration['n_test_cases']} test cases)")
    print(f"per scan: {out / 'qc_cases.csv'}")
    return report_targets([
        Target("AUROC of the combined QC score for Dice < 0.8", aurocs["qc_score"], ">=", 0.9),
        Target("share of clean test cases flagged", clean_flagged, "<=", 0.10),
        Target("test ECE after - before temperature scaling", calibration["test_ece_after"] - calibration["test_ece_before"], "<=", 0.0),
    ])


if __name__ == "__main__":
    sys.exit(main())
