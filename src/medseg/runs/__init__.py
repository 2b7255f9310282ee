"""Run infrastructure: what runs around a pipeline run, never inside the science.

- `lock`: one run at a time per project.
- `outputs`: a failed run restores the previous outputs, wherever the catalog puts them.
- `compute`: where per-case work runs (in process, or on Dask workers).
- `tracking`: the MLflow run's name, tags and bookkeeping.
- `summary`: the lines a model run ends with.

The domain (`imaging`, `patching`, `models`, `evaluation`, `inference`) never imports this
package; the pipelines, the hooks and serving do.
"""
