"""The parameter schema: refused up front, named, described once, and in step with the YAML and the reference page."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from conftest import REPO_ROOT, TINY_DATA_PARAMS, make_project_copy, mlflow_runs, run_pipeline
from medseg.kinds import parameter_roots
from medseg.parameters import Section, leaf_names

ROOTS = parameter_roots()


def _defaults() -> dict:
    values = {}
    for path in sorted((REPO_ROOT / "conf" / "base").glob("parameters_*.yml")):
        values.update(yaml.safe_load(path.read_text()))
    return values


def _with(root: str, dotted: str, value):
    section = copy.deepcopy(_defaults()[root])
    *parents, leaf = dotted.split(".")
    node = section
    for key in parents:
        node = node[key]
    node[leaf] = value
    return section


def test_the_defaults_validate_and_read_like_dicts():
    for root, schema in ROOTS.items():
        section = schema(**_defaults()[root])
        assert isinstance(section, dict) and section == _defaults()[root] | {k: section[k] for k in section}
    unet = ROOTS["unet"](**_defaults()["unet"])
    assert unet["training"]["epochs"] == "auto" and unet["training"]["batch_size"] == "auto" and dict(unet["sampling"])["queue_length"] == 128


@pytest.mark.parametrize(
    ("root", "dotted", "value", "message"),
    [
        ("unet", "training.epoch", 2, r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"),
        ("unet", "training.batch_size", "abc", r"training\.batch_size.*valid integer.*should be 'auto'"),
        ("unet", "training.epochs", -1, r"training\.epochs.*greater than or equal to 1"),
        ("unet", "training.learning_rate", 0, r"training\.learning_rate\n.*greater than 0"),
        ("unet", "model.input_size", 50, r"input_size=50 is not divisible by 2\*\*depth=8"),
        ("conv3d", "model.network", "unet2d", r"model\.network\n.*'unet3d' or 'patch_classifier'"),
        ("conv3d", "sampling.patch_size", [32, 32], r"sampling\.patch_size"),
        ("conv3d", "inference.overlap", 1.0, r"inference\.overlap\n.*less than 1"),
        ("data", "split.val", 0.5, r"train \+ val \+ test must be 1"),
        ("data", "preprocessing.clip_percentiles", [99, 1], r"low < high"),
        ("data", "foreground_labels", [300], r"foreground_labels\.0\n.*less than or equal to 255"),
        ("data", "sourec", "msd", r"unknown parameter 'sourec' \(did you mean 'source'\?\)"),
        ("data", "label_mode", "multi", r"label_mode\n.*'auto', 'multiclass' or 'binary'"),
        ("data", "synthetic.n_classes", 4, r"synthetic\.n_classes\n.*less than or equal to 3"),
    ],
)
def test_mistakes_are_refused_naming_the_parameter(root, dotted, value, message):
    with pytest.raises(ValidationError, match=re.compile(message, re.S)):
        ROOTS[root](**_with(root, dotted, value))


def test_multiclass_with_foreground_labels_is_refused():
    section = _with("data", "label_mode", "multiclass")
    section["foreground_labels"] = [1]
    with pytest.raises(ValidationError, match=r"label_mode=multiclass.*unset foreground_labels, or use label_mode=binary"):
        ROOTS["data"](**section)
    section["label_mode"] = "binary"
    assert ROOTS["data"](**section)["foreground_labels"] == [1]


def _reference_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_reference", REPO_ROOT / "docs" / "generate_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_yaml_holds_every_leaf_of_the_schema_and_nothing_else():
    def leaves(tree, prefix):
        if isinstance(tree, dict) and not prefix.endswith("budget_minutes"):
            return [name for key, value in tree.items() for name in leaves(value, f"{prefix}.{key}")]
        return [prefix]

    yaml_names = [name for root, section in _defaults().items() for name in leaves(section, root)]
    schema_names = [name for root, schema in ROOTS.items() for name in leaf_names(schema, root)]
    assert sorted(yaml_names) == sorted(schema_names)


def _sections(schema: type[Section]):
    yield schema
    for field in schema.__pydantic_fields__.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield from _sections(field.annotation)


def test_every_parameter_is_described_once_in_the_schema():
    for root, schema in ROOTS.items():
        for section in _sections(schema):
            assert (section.__doc__ or "").strip(), f"{section.__name__} has no docstring"
            for name, field in section.__pydantic_fields__.items():
                nested = isinstance(field.annotation, type) and issubclass(field.annotation, Section)
                assert nested or (field.description or "").strip(), f"{root}: {section.__name__}.{name} has no description"


def test_the_reference_page_is_generated_from_the_schema(monkeypatch):
    reference = _reference_module()
    page = (REPO_ROOT / "docs" / "reference" / "parameters.md").read_text()
    stale, missing = reference.stale_sections(page, reference.render())
    assert stale == [], f"docs/reference/parameters.md is out of date in {stale}: run `python docs/generate_reference.py`"
    assert {"data", "planning", "predict", "compute", "cv", "unet", "conv3d"} <= set(reference.sections(page))
    # Each parameter's row carries its description and its YAML default.
    assert "| `unet.training.epochs` | `auto` |" in page
    field = ROOTS["unet"].__pydantic_fields__["seed"]
    assert field.description in page
    # A changed description changes the page: the check is not vacuous.
    monkeypatch.setattr(field, "description", "A description that the committed page does not hold.")
    assert reference.stale_sections(page, reference.render())[0] == ["unet"] and reference.main(["--check"]) == 1


def test_a_kind_added_since_the_page_was_written_is_reported_not_failed():
    reference = _reference_module()
    page = (REPO_ROOT / "docs" / "reference" / "parameters.md").read_text()
    without_conv3d = "\n## `".join(part for part in page.split("\n## `") if not part.startswith("conv3d`"))
    assert reference.stale_sections(without_conv3d, page) == ([], ["conv3d"])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"unet.training.epoch": 2}, r"unknown parameter 'epoch' \(did you mean 'epochs'\?\)"),
        ({"unet.training.batch_size": "abc"}, r"Parameter 'unet'.*training\.batch_size"),
        ({"unet.training.epochs": -1}, r"Parameter 'unet'.*training\.epochs"),
    ],
)
def test_a_bad_parameter_stops_the_run_before_any_work(tmp_path: Path, params, message):
    from kedro.validation.exceptions import ParameterValidationError

    project = make_project_copy(tmp_path / "project")
    with pytest.raises(ParameterValidationError, match=re.compile(message, re.S)):
        run_pipeline(project, "unet", params)
    assert [p for p in (project / "data").rglob("*") if p.is_file()] == []
    _, runs = mlflow_runs(project)
    assert runs == []  # no MLflow run was opened


@pytest.mark.parametrize("pipeline", ["unet", "conv3d"])
def test_a_split_without_validation_cases_is_refused_before_any_work_by_a_model_run(tmp_path: Path, pipeline):
    """Training keeps its best epoch by validation loss: with data.split.val=0 a model run would
    prepare every case, then fail when training starts. It is refused first, saying what to
    set; a run that trains nothing (`data`) is not."""
    from medseg.cases.split import require_validation_cases
    from medseg.errors import SplitError

    assert require_validation_cases(0.0, []) is None

    project = make_project_copy(tmp_path / "project")
    split = {"data.split.train": 0.8, "data.split.val": 0.0, "data.split.test": 0.2}
    with pytest.raises(SplitError, match=rf"data.split.val=0 leaves no validation case, and training {pipeline} needs one.*"
                                         r"Set data.split.val above 0"):
        run_pipeline(project, pipeline, {**TINY_DATA_PARAMS, **split})
    assert [p for p in (project / "data").rglob("*") if p.is_file()] == []
    _, runs = mlflow_runs(project)
    assert runs == []  # no MLflow run was opened
