"""Writes docs/reference/parameters.md from the parameter schema: every section's docstring and
every field's type, default (from conf/base/parameters_*.yml) and description.

    python docs/generate_reference.py          # rewrite the page
    python docs/generate_reference.py --check  # exit 1 when a committed section differs

What a parameter means is written once, as its schema field's `description`
(`medseg.parameters`, and each model kind's own section); tests/test_parameters.py fails when a
section of the committed page is not what this script writes. A model kind added since the page
was written is only reported (`--check` names it): adding a kind edits no other file.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "parameters.md"

BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _bounds(metadata: list[Any]) -> list[str]:
    found = []
    for item in metadata:
        for name, sign in BOUNDS.items():
            value = getattr(item, name, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return found


def type_text(annotation: Any, metadata: list[Any] = ()) -> str:
    """A short reading of a field's type: `int ≥ 1 | auto`, `[float, float] | null`."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        nested = [m for e in extra for m in getattr(e, "metadata", [e])]
        return type_text(inner, [*metadata, *nested])
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in get_args(annotation))
    if origin is Literal:
        return " | ".join(f"`{'null' if v is None else v}`" for v in get_args(annotation))
    if origin is tuple:
        return "[" + ", ".join(type_text(arg) for arg in get_args(annotation)) + "]"
    if origin is list:
        return f"list of {type_text(get_args(annotation)[0])}"
    if origin is dict:
        key, value = get_args(annotation)
        return f"{{{type_text(key)}: {type_text(value)}}}"
    if annotation is type(None):
        return "null"
    name = getattr(annotation, "__name__", str(annotation))
    bounds = _bounds(list(metadata))
    return f"{name} {', '.join(bounds)}" if bounds else name


def _default_text(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return "`" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "`" if value else "`{}`"
    return f"`{value}`"


def _is_section(annotation: Any) -> bool:
    from medseg.parameters import Section

    return isinstance(annotation, type) and issubclass(annotation, Section)


def _rows(section: type, prefix: str, defaults: Any, sections: list[tuple[str, type]]) -> list[str]:
    rows = []
    for name, field in section.__pydantic_fields__.items():
        dotted = f"{prefix}.{name}"
        default = defaults.get(name) if isinstance(defaults, dict) else None
        if _is_section(field.annotation):
            sections.append((dotted, field.annotation))
            rows.extend(_rows(field.annotation, dotted, default, sections))
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        kind = type_text(field.annotation, field.metadata).replace("|", "\\|")
        given = isinstance(defaults, dict) and name in defaults
        shown = _default_text(default) if given or not field.is_required() else "required"
        rows.append(f"| `{dotted}` | {shown} | {kind} | {description} |")
        optional = _optional_section(field.annotation)
        if optional is not None:  # null by default: its keys, with the defaults they take when it is given
            sections.append((dotted, optional))
            own = {name: f.default for name, f in optional.__pydantic_fields__.items() if not f.is_required()}
            rows.extend(_rows(optional, dotted, {**own, **(default or {})}, sections))
    return rows


def _optional_section(annotation: Any) -> type | None:
    """The section of a `Section | None` field, else None."""
    if get_origin(annotation) in (Union, types.UnionType):
        found = [arg for arg in get_args(annotation) if _is_section(arg)]
        return found[0] if len(found) == 1 else None
    return None


def _docstring(section: type) -> str:
    return " ".join(inspect.cleandoc(section.__doc__ or "").split())


def defaults() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in sorted((ROOT / "conf" / "base").glob("parameters_*.yml")):
        values.update(yaml.safe_load(path.read_text()) or {})
    return values


def render() -> str:
    from medseg.kinds import model_kinds, parameter_roots

    values = defaults()
    kinds = model_kinds()
    lines = [
        "# Parameters",
        "",
        "<!-- Generated by `python docs/generate_reference.py` from the parameter schema; do not edit. -->",
        "",
        "Every parameter, its default (`conf/base/parameters_*.yml`), what it accepts and what it does. Set one for a",
        "run with `kedro run --params <name>=<value>` (several separated by commas), or for every run in",
        "`conf/local/parameters.yml`. An unknown name or a value out of range stops the run before any work, naming",
        "the parameter. `auto` values are decided by the planner and recorded in the model's `plan.json`.",
        "",
    ]
    for root, schema in parameter_roots().items():
        owner = f" (model kind, `{kinds[root].defaults_file}`)" if root in kinds else f" (`parameters_{root}.yml`)"
        lines += [f"## `{root}`{owner}", "", _docstring(schema), ""]
        sections: list[tuple[str, type]] = []
        rows = _rows(schema, root, values.get(root, {}), sections)
        for dotted, section in sections:
            lines.append(f"- `{dotted}`: {_docstring(section)}")
        if sections:
            lines.append("")
        lines += ["| parameter | default | accepts | what it does |", "|---|---|---|---|", *rows, ""]
    return "\n".join(lines)


def sections(text: str) -> dict[str, str]:
    """The page split at its `## ` headings: {"": the header, root: that root's section}."""
    head, *parts = text.split("\n## `")
    found = {"": head}
    for part in parts:
        root = part.split("`", 1)[0]
        found[root] = part
    return found


def stale_sections(committed: str, generated: str) -> tuple[list[str], list[str]]:
    """(stale, missing): the sections of the committed page that differ from the generated ones
    or are no longer generated, and the generated sections the page does not have yet (a model
    kind added since the page was written: the page stays true for what it documents)."""
    have, want = sections(committed), sections(generated)
    stale = [root or "(header)" for root, text in have.items() if want.get(root) != text]
    missing = [root for root in want if root not in have]
    return stale, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed page is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        stale, missing = stale_sections(PAGE.read_text() if PAGE.exists() else "", text)
        if missing:
            print(f"{PAGE.relative_to(ROOT)} does not list {missing} yet: `python docs/generate_reference.py` adds them.")
        if stale:
            print(f"{PAGE.relative_to(ROOT)} is out of date in {stale}: run `python docs/generate_reference.py`.", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
