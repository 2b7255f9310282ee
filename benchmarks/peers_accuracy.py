"""medseg beside nnU-Net v2 on accuracy: the same training cases, the same test cases, the same
machine and minutes, both scored by medseg's own metrics from the written masks.

Tasks. With `--msd-dir`, one dataset in MSD / nnU-Net v2 layout (one channel: `imagesTr/<case>.nii.gz`
or `<case>_0000.nii.gz`). Without it, two of the benchmark's own, each with 20 test cases:
`phantoms` (the default synthetic phantoms, binary) and `lateralized` (`tests/lateralized.py`:
heads whose right and left hemispheres look alike, stored in six orientations).

The split, shared by both systems: where the folder has `imagesTs` with labels in `labelsTs`, those
are the test cases and every `imagesTr` case trains; otherwise a seeded share (`--test-share`) of
`imagesTr` is held out. medseg trains on all the training cases, with its own validation share
(`data.split` 0.8 / 0.2 / 0, so the run has no test split of its own); nnU-Net trains fold `all`.

medseg: `kedro run` with its defaults (both models at their default budgets), then the model with
the higher mean validation Dice (its own validation cases, predicted with `predict`: never the
test cases) segments the test images with `kedro run --pipelines predict`. At `--budget` minutes,
that model alone is trained again with `planning.budget_minutes.<model>` set to it.

nnU-Net: its own fingerprint, planner and preprocessing, `3d_fullres`, on the CPU, its folders in
the work folder and its augmentation workers sized to the machine (`nnUNet_n_proc_DA`). Its plan
is sized as a CPU user would: the planner's memory target (`-gpu_memory_target`) goes down from its
default 8 GB until the budget buys about 1,000 iterations, or the planner's plan stops changing;
each plan's time per iteration is measured and printed. The trainer (`BudgetTrainer`, below)
measures its first iterations, spreads nnU-Net's poly schedule over the epochs of 50 iterations
that fit the budget, and stops at the budget; the rest is nnU-Net's recipe (SGD with Nesterov
momentum 0.99, deep supervision, Dice + CE, its augmentation). nnU-Net's final validation is
skipped: it is not part of what is compared. Its predictor then segments the test images with
its default test-time mirroring; on `lateralized` a row with mirroring off in training and
prediction is added (`nnUNetTrainerNoMirroring`), as a user with left/right classes would run it.

Scoring: per test case and class, medseg's `evaluate_case_per_class` (Dice, NSD at 1 mm, HD95 in mm; at parity
with MONAI's, `benchmarks/peers.py`) on each mask against its label, in the label's own geometry
(a mask in another geometry is an error, not a score).

Rows (task, system, configuration, budget, seed): nnU-Net at `--budget` minutes (15), 2 seeds;
medseg at its default budgets, 2 seeds; medseg's chosen model at `--budget`, 1 seed. Each row is
appended to `rows.csv` in `--out` when it is done, with its per-case scores in `per_case.csv`, so
that a run resumes where it stopped; `--only` and `--tasks` run a subset; `--quick` checks the
plumbing (one small task, short budgets, one seed).

`--ablation` trains medseg at its default budget with nnU-Net's recipe (every ingredient of
`INGREDIENTS` on), then with each ingredient off in turn, beside the default; the ingredient's
worth is the recipe's Dice minus the Dice without it.

Targets, per task: medseg at `--budget` >= nnU-Net at `--budget` in mean Dice over seeds, and never
more than 0.01 below it in any class; medseg at its default budget >= nnU-Net at `--budget` - 0.01.
nnU-Net is taken at its best: on `lateralized`, the better of its rows with and without mirroring.
The table gives each difference with a 95 % paired bootstrap interval over test cases. Exits 1 on
a miss.

Run (in the peers environment, see benchmarks/peers.py):
  .venv-peers/bin/python benchmarks/peers_accuracy.py [--budget 15] [--out peers_accuracy]
      [--tasks phantoms,lateralized] [--only nnunet|medseg] [--msd-dir DIR] [--quick] [--ablation]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _project import kedro, project_copy  # noqa: E402
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROW_FIELDS = ["task", "system", "configuration", "budget_min", "seed", "chosen", "mean_dice", "dice_by_class",
              "mean_nsd", "hd95_mm", "train_s", "wall_s", "detail"]
CASE_FIELDS = ["task", "system", "configuration", "budget_min", "seed", "case", "class", "label", "dice", "nsd", "hd95_mm",
               "hd95_mm_penalized", "reference_empty", "prediction_empty"]
NSD_TOLERANCE_MM = 1.0  # medseg's default (`evaluation.nsd_tolerance_mm`)
ITERATIONS_PER_EPOCH = 50  # nnU-Net's 250 would leave a 15-minute CPU budget four epochs of its poly schedule
VAL_ITERATIONS_PER_EPOCH = 5
TARGET_ITERATIONS = 1000
MEMORY_TARGETS_GB = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)  # 8: nnU-Net's default
BOOTSTRAP_RESAMPLES = 10_000
# nnU-Net's recipe, ingredient by ingredient, as medseg's parameters (each for both models).
INGREDIENTS: dict[str, dict[str, object]] = {
    "spatial augmentation": {f"{m}.training.spatial_augmentation": "nnunet" for m in ("unet", "conv3d")},
    "intensity augmentation": {f"{m}.training.intensity_augmentation": "nnunet" for m in ("unet", "conv3d")},
    "SGD Nesterov + poly": {
        **{f"{m}.training.optimizer": "sgd_nesterov" for m in ("unet", "conv3d")},
        **{f"{m}.training.lr_schedule": "poly" for m in ("unet", "conv3d")},
        **{f"{m}.training.learning_rate": 0.01 for m in ("unet", "conv3d")},
    },
    "deep supervision": {f"{m}.training.deep_supervision": True for m in ("unet", "conv3d")},
    "3D width 32": {"conv3d.model.base_filters": 32},
}


# --------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One benchmark task, split: `train` in MSD layout (training cases only), the test images
    (`<case>_0000.nii.gz`) and their labels (`<case>.nii.gz`)."""

    name: str
    train: Path
    test_images: Path
    test_labels: Path
    classes: dict[int, str]


def _labels_of(manifest: dict) -> dict[int, str]:
    """{value: name} of the foreground classes, from MSD (`{"1": "x"}`) or nnU-Net v2 (`{"x": 1}`) labels."""
    labels = manifest.get("labels") or {}
    pairs = [(int(k), str(v)) if str(k).isdigit() else (int(v), str(k)) for k, v in labels.items()]
    classes = {value: name for value, name in sorted(pairs) if value != 0}
    if not classes:
        raise SystemExit("dataset.json lists no foreground label: add `labels` ({\"1\": \"name\"}).")
    return classes


def _image_of(folder: Path, case: str) -> Path:
    for name in (f"{case}_0000.nii.gz", f"{case}.nii.gz"):
        if (folder / name).is_file():
            if (folder / f"{case}_0001.nii.gz").exists():
                raise SystemExit(f"{folder}: {case} has several channels; this benchmark compares one-channel tasks.")
            return folder / name
    raise SystemExit(f"{folder}: no image for case {case} ({case}_0000.nii.gz or {case}.nii.gz).")


def _link(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (a copy across file systems): medseg refuses a
    symbolic link that leads out of the folder it reads."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def split_task(name: str, source: Path, out: Path, test_share: float, seed: int = 0) -> Task:
    """The benchmark's split of an MSD folder, as hard links under `out/<name>`: `imagesTs` +
    `labelsTs` when the folder has them, else a seeded `test_share` of `imagesTr`."""
    manifest_path = source / "dataset.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{source}: no dataset.json. Point --msd-dir at an MSD / nnU-Net v2 dataset folder.")
    manifest = json.loads(manifest_path.read_text())
    classes = _labels_of(manifest)
    training = sorted(p.name[: -len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    if (source / "labelsTs").is_dir() and (source / "imagesTs").is_dir():
        testing = sorted(p.name[: -len(".nii.gz")] for p in (source / "labelsTs").glob("*.nii.gz"))
        test_from = "Ts"
    else:
        order = np.random.default_rng(seed).permutation(len(training))
        n_test = max(1, round(test_share * len(training)))
        testing = sorted(training[i] for i in order[:n_test])
        training = sorted(training[i] for i in order[n_test:])
        test_from = "Tr"
    if len(training) < 2 or not testing:
        raise SystemExit(f"{source}: {len(training)} training and {len(testing)} test cases; need at least 2 and 1.")
    root = out / name
    if root.exists():
        shutil.rmtree(root)
    for folder in ("train/imagesTr", "train/labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    for case in training:
        _link(_image_of(source / "imagesTr", case).resolve(), root / "train/imagesTr" / f"{case}_0000.nii.gz")
        _link((source / "labelsTr" / f"{case}.nii.gz").resolve(), root / "train/labelsTr" / f"{case}.nii.gz")
    for case in testing:
        _link(_image_of(source / f"images{test_from}", case).resolve(), root / "imagesTs" / f"{case}_0000.nii.gz")
        _link((source / f"labels{test_from}" / f"{case}.nii.gz").resolve(), root / "labelsTs" / f"{case}.nii.gz")
    (root / "train/dataset.json").write_text(json.dumps({
        "name": name, "modality": {"0": "MR"}, "labels": {"0": "background", **{str(v): n for v, n in classes.items()}},
        "numTraining": len(training), "file_ending": ".nii.gz",
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in training],
    }, indent=1))
    return Task(name, root / "train", root / "imagesTs", root / "labelsTs", classes)


def own_tasks(work: Path, names: list[str], quick: bool, n_test: int) -> list[Task]:
    """The benchmark's own tasks, written once into `work/sources`: 20 training cases and
    `n_test` test cases each (8 and 4 quick)."""
    import yaml

    from lateralized import write_lateralized_task
    from medseg.synthetic.phantoms import ensure_synthetic_dataset, synthesis_settings

    n_train, n_test = (8, 4) if quick else (20, n_test)
    tasks = []
    for name in names:
        source = work / "sources" / name
        if name == "phantoms":
            data = yaml.safe_load((ROOT / "conf/base/parameters_data.yml").read_text())["data"]
            data["synthetic"]["n_cases"] = n_train + n_test
            ensure_synthetic_dataset(source, synthesis_settings(data))
        elif name == "lateralized":
            if not (source / "dataset.json").is_file():
                shape = (40, 48, 40) if quick else (72, 84, 64)
                write_lateralized_task(source, n_cases=n_train + n_test, shape=shape, spacing=2.0)
        else:
            raise SystemExit(f"--tasks: unknown task {name!r}; the benchmark's own are phantoms and lateralized.")
        tasks.append(split_task(name, source, work / "tasks", test_share=n_test / (n_train + n_test)))
    return tasks


# ------------------------------------------------------------------------------------- scoring
def score(task: Task, masks: Path) -> list[dict]:
    """medseg's per-class metrics of each test case's mask in `masks` against its label."""
    import nibabel as nib

    from medseg.evaluation.metrics import evaluate_case_per_class

    rows = []
    for label_path in sorted(task.test_labels.glob("*.nii.gz")):
        case = label_path.name[: -len(".nii.gz")]
        mask_path = masks / f"{case}.nii.gz"
        if not mask_path.is_file():
            raise SystemExit(f"{masks}: no mask for test case {case}; the system's run did not finish.")
        label, mask = nib.load(label_path), nib.load(mask_path)
        if label.shape != mask.shape or not np.allclose(label.affine, mask.affine, atol=1e-3):
            raise SystemExit(f"{mask_path}: shape {mask.shape} / affine differ from its label {label_path} "
                             f"{label.shape}: the mask is not in the scan's own geometry.")
        spacing = tuple(float(z) for z in label.header.get_zooms()[:3])
        reference = np.asarray(label.dataobj).astype(np.int16)
        prediction = np.asarray(mask.dataobj).astype(np.int16)
        for row in evaluate_case_per_class(reference, prediction, spacing, task.classes, NSD_TOLERANCE_MM):
            rows.append({"case": case, **{k: row[k] for k in CASE_FIELDS[6:] if k in row}, "class": row["class"]})
    return rows


def summarize(cases: list[dict], classes: dict[int, str]) -> dict[str, object]:
    by_class = {name: float(np.nanmean([r["dice"] for r in cases if r["class"] == name])) for name in classes.values()}
    nsd = [float(np.nanmean([r["nsd"] for r in cases if r["class"] == name])) for name in classes.values()]
    return {"mean_dice": float(np.mean(list(by_class.values()))), "dice_by_class": json.dumps(by_class),
            "mean_nsd": float(np.mean(nsd)), "hd95_mm": float(np.nanmean([r["hd95_mm_penalized"] for r in cases]))}


# ------------------------------------------------------------------------------------- records
class Records:
    """rows.csv and per_case.csv in `out`, appended one finished row at a time."""

    def __init__(self, out: Path) -> None:
        self.rows_path, self.cases_path = out / "rows.csv", out / "per_case.csv"
        self.rows = list(csv.DictReader(self.rows_path.open())) if self.rows_path.exists() else []

    def find(self, task: str, system: str, configuration: str, budget: float, seed: int) -> dict | None:
        for row in self.rows:
            if (row["task"], row["system"], row["configuration"], float(row["budget_min"]), int(row["seed"])) == \
                    (task, system, configuration, float(budget), seed):
                return row
        return None

    def add(self, row: dict, cases: list[dict]) -> dict:
        key = {k: row[k] for k in CASE_FIELDS[:5]}
        for path, fields, items in ((self.cases_path, CASE_FIELDS, [{**key, **c} for c in cases]),
                                    (self.rows_path, ROW_FIELDS, [row])):
            new = not path.exists()
            if not new and next(csv.reader(path.open()), None) != fields:  # a file of an earlier version: its
                kept = list(csv.DictReader(path.open()))                  # rows under today's header
                with path.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(kept)
            with path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerows(items)
        self.rows.append({k: str(v) for k, v in row.items()})
        return row

    def cases(self, task: str, system: str, configuration: str, budget: float, metric: str = "dice") -> dict[int, dict[tuple, float]]:
        """{seed: {(case, class): metric}} of the rows that match (NaN where a row predates the metric)."""
        found: dict[int, dict[tuple, float]] = {}
        if self.cases_path.exists():
            for r in csv.DictReader(self.cases_path.open()):
                if (r["task"], r["system"], r["configuration"], float(r["budget_min"])) == (task, system, configuration, float(budget)):
                    found.setdefault(int(r["seed"]), {})[(r["case"], r["class"])] = float(r.get(metric) or "nan")
        return found


# -------------------------------------------------------------------------------------- medseg
def _medseg_params(task: Task, seed: int, extra: dict[str, object]) -> dict[str, object]:
    return {"data.source": "msd", "data.msd_dir": task.train, "data.split.train": 0.8, "data.split.val": 0.2,
            "data.split.test": 0, "unet.seed": 7 + seed, "conv3d.seed": 11 + seed, **extra}


def _predict(project: Path, model: str, images: Path, out: Path, log: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    kedro(project, ["--pipelines", "predict"], {"predict.model": model, "predict.input_dir": images,
                                                 "predict.output_dir": out}, log)


def run_medseg(task: Task, work: Path, seed: int, budget: float | None, model: str | None,
               extra: dict[str, object]) -> tuple[dict, list[dict]]:
    """medseg on `task`: both models at their default budgets (`budget` None) and the one with the
    higher validation Dice, or `model` alone at `budget` minutes. The test cases' scores."""
    label = f"{'default' if budget is None else f'{budget:g}min'}-seed{seed}-{zlib.crc32(json.dumps(extra, sort_keys=True, default=str).encode())}"
    folder = work / "medseg" / task.name / label
    if folder.exists():
        shutil.rmtree(folder)
    project = project_copy(folder / "project")
    log = folder / "kedro.log"
    params = _medseg_params(task, seed, extra)
    start = time.perf_counter()
    if budget is None:
        train_s = kedro(project, [], params, log)
        validation = folder / "validation"
        validation.mkdir()
        splits = list(csv.DictReader((project / "data/03_primary/splits.csv").open()))
        val_cases = [r["case_id"] for r in splits if r["split"] == "val"]
        for case in val_cases:
            _link((task.train / "imagesTr" / f"{case}_0000.nii.gz").resolve(), validation / f"{case}_0000.nii.gz")
        val_task = Task(task.name, task.train, validation, task.train / "labelsTr", task.classes)
        val_dice = {}
        for kind in ("unet", "conv3d"):
            _predict(project, kind, validation, folder / f"val_{kind}", log)
            val_cases_scores = [r for r in score(_only(val_task, val_cases), folder / f"val_{kind}")]
            val_dice[kind] = float(np.nanmean([r["dice"] for r in val_cases_scores]))
        model = max(val_dice, key=val_dice.get)
        detail = f"validation Dice {json.dumps({k: round(v, 4) for k, v in val_dice.items()})} on {len(val_cases)} cases"
    else:
        train_s = kedro(project, ["--pipelines", model], {**params, f"planning.budget_minutes.{model}": budget}, log)
        detail = ""
    _predict(project, model, task.test_images, folder / "test", log)
    cases = score(task, folder / "test")
    row = {"chosen": model, "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - start, 1), "detail": detail,
           **summarize(cases, task.classes)}
    return row, cases


def _only(task: Task, cases: list[str]) -> Task:
    """`task` with its test labels limited to `cases` (a folder of links)."""
    folder = task.test_images.parent / "labels_only"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for case in cases:
        _link((task.test_labels / f"{case}.nii.gz").resolve(), folder / f"{case}.nii.gz")
    return Task(task.name, task.train, task.test_images, folder, task.classes)


# ------------------------------------------------------------------------------------- nnU-Net
def _nnunet_env(base: Path) -> dict[str, str]:
    env = {**os.environ, "nnUNet_raw": str(base / "raw"), "nnUNet_preprocessed": str(base / "preprocessed"),
           "nnUNet_results": str(base / "results"), "nnUNet_n_proc_DA": str(os.cpu_count() or 1),
           "nnUNet_compile": "false", "PYTHONUNBUFFERED": "1"}
    return env


def _nnunet_cli(name: str, args: list[str], env: dict[str, str], log: Path) -> None:
    command = [str(Path(sys.executable).with_name(name)), *args]
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        code = subprocess.call(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}):\n" + "\n".join(log.read_text().splitlines()[-30:]))


def _worker(mode: str, spec: dict, env: dict[str, str], log: Path) -> dict:
    """This script in a child process (`--worker`), so that torch's threads and nnU-Net's
    augmentation processes end with it; its JSON answer."""
    answer = log.with_suffix(f".{mode}.json")
    spec = {**spec, "answer": str(answer)}
    with log.open("a") as sink:  # a session of its own: nnU-Net's augmentation workers end with it
        child = subprocess.Popen([sys.executable, __file__, "--worker", mode, json.dumps(spec)], env=env,
                                 stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        code = child.wait()
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if code != 0 or not answer.exists():
        raise SystemExit(f"nnU-Net {mode} failed (exit {code}):\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return json.loads(answer.read_text())


def prepare_nnunet(task: Task, work: Path, budget_s: float, dataset_id: int) -> tuple[dict[str, str], dict]:
    """nnU-Net's raw folder, fingerprint and preprocessing, and the plan sized for this CPU;
    cached in `work/nnunet/<task>` for a resumed run."""
    base = work / "nnunet" / task.name
    env = _nnunet_env(base)
    choice_path = base / f"plan_choice_{budget_s:g}s.json"
    if choice_path.exists():
        return env, json.loads(choice_path.read_text())
    if base.exists():
        shutil.rmtree(base)
    dataset = f"Dataset{dataset_id:03d}_{task.name.capitalize()}"
    raw = base / "raw" / dataset
    shutil.copytree(task.train, raw, symlinks=True, ignore=shutil.ignore_patterns("dataset.json"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, **{n: v for v, n in task.classes.items()}},
        "numTraining": len(list((raw / "labelsTr").glob("*.nii.gz"))), "file_ending": ".nii.gz"}))
    log = base / "nnunet.log"
    nproc = str(os.cpu_count() or 1)
    start = time.perf_counter()
    _nnunet_cli("nnUNetv2_extract_fingerprint", ["-d", str(dataset_id), "-np", nproc, "--verify_dataset_integrity"], env, log)
    _nnunet_cli("nnUNetv2_plan_experiment", ["-d", str(dataset_id)], env, log)
    _nnunet_cli("nnUNetv2_preprocess", ["-d", str(dataset_id), "-c", "3d_fullres", "-np", nproc], env, log)
    preprocessing_s = time.perf_counter() - start
    plans_dir = base / "preprocessed" / dataset
    plans, previous = [], None
    for target in MEMORY_TARGETS_GB:
        name = "nnUNetPlans" if target == 8.0 else f"nnUNetPlans_{target:g}GB"
        if name != "nnUNetPlans":
            _nnunet_cli("nnUNetv2_plan_experiment", ["-d", str(dataset_id), "-gpu_memory_target", str(target),
                                                     "-overwrite_plans_name", name], env, log)
            path = plans_dir / f"{name}.json"
            derived = json.loads(path.read_text())
            derived["configurations"]["3d_fullres"]["data_identifier"] = "nnUNetPlans_3d_fullres"  # the same spacing: one preprocessing
            path.write_text(json.dumps(derived, indent=1))
        configuration = json.loads((plans_dir / f"{name}.json").read_text())["configurations"]["3d_fullres"]
        shape = (configuration["patch_size"], configuration["batch_size"], configuration["architecture"]["arch_kwargs"]["features_per_stage"])
        if shape == previous:
            continue  # the same plan as a higher target (a patch as large as the images): no new timing
        previous = shape
        timing = _worker("time", {"plans": str(plans_dir / f"{name}.json"), "dataset_json": str(plans_dir / "dataset.json"),
                                  "results": str(base / "results")}, env, log)
        plans.append({"plans": name, "memory_gb": target, "patch_size": shape[0], "batch_size": shape[1],
                      "features": shape[2], "s_per_iteration": timing["s_per_iteration"],
                      "iterations_in_budget": int(budget_s / timing["s_per_iteration"])})
        if plans[-1]["iterations_in_budget"] >= TARGET_ITERATIONS:
            break
    chosen = plans[-1]
    search_s = time.perf_counter() - start - preprocessing_s
    choice = {"plan_search_s": round(search_s, 1), "dataset_id": dataset_id, "dataset": dataset, "plans": plans, "chosen": chosen["plans"],
              "preprocessing_s": round(preprocessing_s, 1), "plans_path": str(plans_dir / f"{chosen['plans']}.json"),
              "dataset_json": str(plans_dir / "dataset.json")}
    choice_path.write_text(json.dumps(choice, indent=1))
    return env, choice


def print_plans(task: Task, choice: dict) -> None:
    print(f"  nnU-Net plans for {task.name} (3d_fullres; fingerprint, plan and preprocessing {choice['preprocessing_s']:.0f} s, "
          f"then sizing the plan for this CPU {choice.get('plan_search_s', float('nan')):.0f} s):")
    for plan in choice["plans"]:
        mark = "  <- used" if plan["plans"] == choice["chosen"] else ""
        print(f"    {plan['memory_gb']:>5g} GB  patch {plan['patch_size']}  batch {plan['batch_size']}  "
              f"features {plan['features'][0]}-{plan['features'][-1]}  {plan['s_per_iteration']:.2f} s/iteration  "
              f"{plan['iterations_in_budget']} iterations in the budget{mark}")


def run_nnunet(task: Task, work: Path, env: dict[str, str], choice: dict, budget_s: float, seed: int,
               mirroring: bool) -> tuple[dict, list[dict]]:
    folder = work / "nnunet" / task.name / f"{budget_s:g}s-seed{seed}-{'mirror' if mirroring else 'nomirror'}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    answer = _worker("train", {"plans": choice["plans_path"], "dataset_json": choice["dataset_json"],
                               "results": str(folder / "results"), "budget_s": budget_s, "seed": seed,
                               "mirroring": mirroring, "images": str(task.test_images), "masks": str(folder / "test")},
                     env, folder / "nnunet.log")
    cases = score(task, folder / "test")
    row = {"chosen": choice["chosen"], "train_s": answer["train_s"],
           "wall_s": round(time.perf_counter() - start + choice["preprocessing_s"], 1),
           "detail": f"{answer['iterations']} iterations in {answer['epochs']} epochs; predict {answer['predict_s']:.0f} s",
           **summarize(cases, task.classes)}
    return row, cases


def worker(mode: str, spec: dict) -> None:
    """Inside the child: time a plan (`time`), or train and predict (`train`)."""
    import random

    os.environ["nnUNet_results"] = spec["results"]  # nnunetv2.paths reads it on import
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring,
    )

    torch.set_num_threads(os.cpu_count() or 1)
    seed = int(spec.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    base = nnUNetTrainer if spec.get("mirroring", True) else nnUNetTrainerNoMirroring

    class BudgetTrainer(base):
        """nnU-Net's trainer, stopped at a wall-clock budget with its poly schedule spread over
        the epochs that fit; nnU-Net's recipe otherwise."""

        def run_training_for(self, budget_s: float) -> dict:
            self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
            self.num_val_iterations_per_epoch = VAL_ITERATIONS_PER_EPOCH
            self.on_train_start()
            start = time.perf_counter()
            self.network.train()
            for _ in range(2):  # the first iterations: allocation, worker start-up
                self.train_step(next(self.dataloader_train))
            probe = time.perf_counter()
            for _ in range(3):
                self.train_step(next(self.dataloader_train))
            per_iteration = (time.perf_counter() - probe) / 3
            per_epoch = per_iteration * (ITERATIONS_PER_EPOCH + 0.4 * VAL_ITERATIONS_PER_EPOCH)
            self.num_epochs = max(1, int((budget_s - (time.perf_counter() - start)) / per_epoch))
            self.lr_scheduler = PolyLRScheduler(self.optimizer, self.initial_lr, self.num_epochs)
            iterations, epochs = 5, 0
            for _ in range(self.num_epochs):
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = []
                for _ in range(ITERATIONS_PER_EPOCH):
                    outputs.append(self.train_step(next(self.dataloader_train)))
                    iterations += 1
                    if time.perf_counter() - start >= budget_s:
                        break
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val = [self.validation_step(next(self.dataloader_val)) for _ in range(VAL_ITERATIONS_PER_EPOCH)]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()
                epochs += 1
                if time.perf_counter() - start >= budget_s:
                    break
            train_s = time.perf_counter() - start
            self.on_train_end()
            return {"iterations": iterations, "epochs": epochs, "train_s": round(train_s, 1),
                    "s_per_iteration": per_iteration}

    plans = {**json.loads(Path(spec["plans"]).read_text()), "continue_training": False}  # what run_training adds
    dataset_json = json.loads(Path(spec["dataset_json"]).read_text())
    trainer = BudgetTrainer(plans, "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
    if mode == "time":
        trainer.on_train_start()
        for _ in range(2):
            trainer.train_step(next(trainer.dataloader_train))
        start = time.perf_counter()
        for _ in range(4):
            trainer.train_step(next(trainer.dataloader_train))
        answer = {"s_per_iteration": (time.perf_counter() - start) / 4}
        Path(spec["answer"]).write_text(json.dumps(answer))
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            getattr(loader, "_finish", lambda: None)()
        os._exit(0)
    answer = trainer.run_training_for(float(spec["budget_s"]))
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    start = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(spec["mirroring"]),
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()], trainer.dataset_json, base.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    Path(spec["masks"]).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(spec["images"], spec["masks"], save_probabilities=False, overwrite=True,
                                            folder_with_segs_from_prev_stage=None)
    answer["predict_s"] = time.perf_counter() - start
    Path(spec["answer"]).write_text(json.dumps(answer))
    os._exit(0)


# -------------------------------------------------------------------------------------- report
def bootstrap_difference(a: dict[tuple, float], b: dict[tuple, float], seed: int = 0) -> tuple[float, float, float]:
    """Mean over test cases of (a - b), each case's Dice the mean over its classes; a paired
    95 % bootstrap interval over cases (medseg's own, as `select` compares with the champion)."""
    from medseg.evaluation.statistics import Bootstrap, paired_bootstrap

    cases = sorted({case for case, _ in a} & {case for case, _ in b})
    def per_case(scores):
        return np.array([np.nanmean([v for (c, _), v in scores.items() if c == case]) for case in cases])
    result = paired_bootstrap(per_case(a), per_case(b), Bootstrap(BOOTSTRAP_RESAMPLES, seed, 0.95))
    return result.difference, result.low, result.high


def _seed_mean(found: dict[int, dict[tuple, float]]) -> dict[tuple, float]:
    keys = set.intersection(*(set(scores) for scores in found.values()))
    return {key: float(np.mean([scores[key] for scores in found.values()])) for key in keys}


def _mean_nsd(found: dict[int, dict[tuple, float]], classes: dict[int, str]) -> float:
    """The NSD's mean over classes and seeds; NaN for rows scored before NSD was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.mean(list(_class_means(_seed_mean(found), classes).values()))) if found else float("nan")


def _class_means(scores: dict[tuple, float], classes: dict[int, str]) -> dict[str, float]:
    return {name: float(np.nanmean([v for (_, c), v in scores.items() if c == name])) for name in classes.values()}


def report(task: Task, records: Records, budget: float, ablation: bool) -> list:
    from _targets import Target

    print(f"\n== {task.name}: {len(list(task.test_labels.glob('*.nii.gz')))} test cases, "
          f"{len(list((task.train / 'labelsTr').glob('*.nii.gz')))} training cases; mean Dice over seeds")
    names = list(task.classes.values())
    print(f"  {'system':<9} {'configuration':<34} {'budget':>8} {'seeds':>5} " + " ".join(f"{n[:9]:>9}" for n in names)
          + f" {'mean':>7} {'NSD':>6} {'HD95 mm':>8} {'train s':>8} {'wall s':>8}")
    seen, scores = set(), {}
    for row in records.rows:
        key = (row["system"], row["configuration"], float(row["budget_min"]))
        if row["task"] != task.name or key in seen:
            continue
        seen.add(key)
        rows = [r for r in records.rows if r["task"] == task.name and (r["system"], r["configuration"], float(r["budget_min"])) == key]
        found = records.cases(task.name, *key)
        scores[key] = _seed_mean(found)
        classes = _class_means(scores[key], task.classes)
        budget_text = "default" if float(row["budget_min"]) == 0 else f"{float(row['budget_min']):g} min"
        print(f"  {key[0]:<9} {key[1]:<34} {budget_text:>8} {len(rows):>5} " + " ".join(f"{classes[n]:>9.4f}" for n in names)
              + f" {np.mean(list(classes.values())):>7.4f} {_mean_nsd(records.cases(task.name, *key, metric='nsd'), task.classes):>6.3f}"
              + f" {np.mean([float(r['hd95_mm']) for r in rows]):>8.2f}"
              + f" {np.mean([float(r['train_s']) for r in rows]):>8.0f} {np.mean([float(r['wall_s']) for r in rows]):>8.0f}")
    targets = []
    # The reference is nnU-Net at its best here: with mirroring, or without it where that row scores higher.
    candidates = {key[1]: value for key, value in scores.items() if key[0] == "nnunet" and key[2] == budget}
    best = max(candidates, key=lambda c: np.nanmean(list(_class_means(candidates[c], task.classes).values())), default=None)
    reference = candidates.get(best)
    if best is not None and len(candidates) > 1:
        print(f"  the reference: nnU-Net {best}, its better row here")
    long, short = scores.get(("medseg", "chosen", budget)), scores.get(("medseg", "default", 0.0))
    if reference is not None:
        for label, mine, slack in ((f"medseg at {budget:g} min", long, 0.0), ("medseg at its default budget", short, 0.01)):
            if mine is None:
                continue
            mean, low, high = bootstrap_difference(mine, reference)
            print(f"  {label} - nnU-Net at {budget:g} min: {mean:+.4f} Dice (95 % CI {low:+.4f} to {high:+.4f}, paired over cases)")
            targets.append(Target(f"{task.name}: {label} - nnU-Net at {budget:g} min, mean Dice", mean, ">=", -slack))
            if slack == 0.0:
                mine_classes, theirs = _class_means(mine, task.classes), _class_means(reference, task.classes)
                for name in names:
                    targets.append(Target(f"{task.name} {name}: {label} - nnU-Net", mine_classes[name] - theirs[name], ">=", -0.01))
    if ablation:
        recipe = scores.get(("medseg", "ablation: nnU-Net recipe", 0.0))
        if recipe is not None:
            print("  ablation (the recipe's mean Dice minus the Dice without the ingredient: its worth):")
            for ingredient in INGREDIENTS:
                without = scores.get(("medseg", f"ablation: recipe - {ingredient}", 0.0))
                if without is not None:
                    worth = np.nanmean(list(recipe.values())) - np.nanmean(list(without.values()))
                    print(f"    {ingredient:<28} {worth:+.4f}")
    return targets


def environment() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from scale_out import cpu_name

    versions = []
    for package in ("medseg", "tensorflow-cpu", "tensorflow", "torch", "nnunetv2"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; " + ", ".join(versions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=15.0, help="training minutes of the long rows (default 15)")
    parser.add_argument("--out", type=Path, default=Path("peers_accuracy"), help="results and work folder (resumable)")
    parser.add_argument("--tasks", default="phantoms,lateralized", help="the benchmark's own tasks to run")
    parser.add_argument("--msd-dir", type=Path, help="a dataset in MSD / nnU-Net v2 layout instead of the own tasks")
    parser.add_argument("--test-share", type=float, default=0.2, help="share of imagesTr held out when there is no labelsTs")
    parser.add_argument("--test-cases", type=int, default=20, help="test cases of the own tasks (20; fewer: a shorter, weaker check)")
    parser.add_argument("--only", choices=["nnunet", "medseg"], help="run one system's rows")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the nnU-Net and default-budget medseg rows")
    parser.add_argument("--quick", action="store_true", help=(
        "the plumbing: one small task, one seed, --budget 2, medseg's default rows at 0.5-minute budgets"))
    parser.add_argument("--ablation", action="store_true", help="medseg with nnU-Net's recipe, one ingredient off at a time")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], json.loads(args.worker[1]))
        return 0
    if importlib_missing := [m for m in ("torch", "nnunetv2") if not _importable(m)]:
        raise SystemExit(f"{', '.join(importlib_missing)} missing: run in the peers environment "
                         "(python3 -m venv .venv-peers && .venv-peers/bin/pip install -e '.[cpu,peers]').")
    quick_budgets = {}
    if args.quick:
        args.budget, args.seeds, args.tasks = min(args.budget, 2.0), 1, args.tasks.split(",")[0]
        quick_budgets = {"planning.budget_minutes.unet": 0.5, "planning.budget_minutes.conv3d": 0.5}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    print(environment())
    if args.msd_dir:
        tasks = [split_task(args.msd_dir.name, args.msd_dir.resolve(), work / "tasks", args.test_share)]
    else:
        tasks = own_tasks(work, args.tasks.split(","), args.quick, args.test_cases)
    records = Records(out)
    targets = []
    for index, task in enumerate(tasks):
        if args.only != "medseg":
            env, choice = prepare_nnunet(task, work, args.budget * 60, 900 + index)
            print_plans(task, choice)
            variants = [("3d_fullres", True)] + ([("3d_fullres no mirroring", False)] if task.name == "lateralized" else [])
            for configuration, mirroring in variants:
                for seed in range(args.seeds if mirroring else 1):
                    if records.find(task.name, "nnunet", configuration, args.budget, seed) is None:
                        print(f"  nnU-Net {configuration}, {args.budget:g} min, seed {seed} ...", flush=True)
                        row, cases = run_nnunet(task, work, env, choice, args.budget * 60, seed, mirroring)
                        records.add({"task": task.name, "system": "nnunet", "configuration": configuration,
                                     "budget_min": args.budget, "seed": seed, **row}, cases)
        if args.only != "nnunet":
            runs = [("default", 0.0, seed, quick_budgets) for seed in range(args.seeds)]
            if args.ablation:  # before the long row, so that a stopped run has the ablation whole
                recipe = {k: v for ingredient in INGREDIENTS.values() for k, v in ingredient.items()}
                runs.append(("ablation: nnU-Net recipe", 0.0, 0, recipe))
                for name, ingredient in INGREDIENTS.items():
                    runs.append((f"ablation: recipe - {name}", 0.0, 0, {k: v for k, v in recipe.items() if k not in ingredient}))
            runs.append(("chosen", args.budget, 0, None))
            for configuration, budget, seed, extra in runs:
                if records.find(task.name, "medseg", configuration, budget, seed) is not None:
                    continue
                print(f"  medseg {configuration}, {'default budget' if not budget else f'{budget:g} min'}, seed {seed} ...", flush=True)
                model = None
                if configuration == "chosen":
                    first = records.find(task.name, "medseg", "default", 0.0, 0)
                    model = first["chosen"] if first else None
                    if model is None:
                        continue
                row, cases = run_medseg(task, work, seed, budget or None, model, extra or {})
                records.add({"task": task.name, "system": "medseg", "configuration": configuration,
                             "budget_min": budget, "seed": seed, **row}, cases)
        targets += report(task, records, args.budget, args.ablation)
    print(f"\nrows: {records.rows_path}; per case: {records.cases_path}")
    if not targets:
        print("no target to check: both systems' rows are needed (drop --only).")
        return 0
    from _targets import report_targets

    return report_targets(targets)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
