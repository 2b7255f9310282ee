"""The run layer: what runs around a pipeline run, never inside the science.

- `hooks`: Kedro's hooks: the MLflow run's name and checks, the lock, the outputs' staging, the
  per-case executor; `resolvers`: the `${medseg.*:}` resolvers of the configuration.
- `lock`: one run at a time per project.
- `outputs`: a failed run restores the previous outputs, wherever the catalog puts them.
- `compute`: where per-case work runs (in process, or on Dask workers); `credentials`: the
  catalog's credentials by name, read again where a task runs.
- `tracking`: the MLflow run's name, tags and bookkeeping, and what nodes log to it.
- `summary`: the lines a model run ends with; `console`: third-party notices left out.

The pipelines and the Kedro datasets import this package; the model kinds, serving and the
domain never do (`[tool.importlinter]` in pyproject.toml).
"""
