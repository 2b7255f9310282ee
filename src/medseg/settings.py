"""Project settings: the project's hooks and where configuration is read from."""

from medseg.runs.credentials import CONFIG_LOADER_ARGS  # noqa: F401  (Kedro reads it here; a Dask worker there)
from medseg.runs.hooks import ComputeHook, MlflowRunHook, RunStartedHook, StageLinesHook
from medseg.runs.resolvers import register_catalog_resolvers
from medseg.runs.summary import RunSummaryHook

# kedro-mlflow's own hook is registered by its entry point. MlflowRunHook runs before it
# (tryfirst): it locks the project, checks the tracking server and names the run.
# RunStartedHook runs after it (trylast), once the run has started. RunSummaryHook ends a
# model run with its test metrics and where to look next. ComputeHook opens and closes the
# per-case executor of `compute.scheduler` (sync, a LocalCluster, or a Dask cluster).
# StageLinesHook writes the console's line per node.
_RUN_HOOK = MlflowRunHook()
HOOKS = (_RUN_HOOK, RunStartedHook(_RUN_HOOK), RunSummaryHook(), ComputeHook(), StageLinesHook())

register_catalog_resolvers()
