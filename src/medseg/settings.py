"""Project settings: the project's hooks and where configuration is read from."""

from medseg.runs.credentials import CONFIG_LOADER_ARGS  # noqa: F401  (Kedro reads it here; a Dask worker there)
from medseg.runs.hooks import BatchedMlflowHook, ComputeHook, MlflowRunHook, RunStartedHook, StageLinesHook
from medseg.runs.resolvers import register_catalog_resolvers
from medseg.runs.summary import RunSummaryHook

# kedro-mlflow's hook is BatchedMlflowHook, its subclass that logs each node's parameters in one
# batch, in place of the plugin's own instance; it comes last, where Kedro put the plugin's hook
# (after the project's), so it keeps its place among them. MlflowRunHook runs before it
# (tryfirst): it locks the project, checks the tracking server and names the run.
# RunStartedHook runs after it (trylast), once the run has started. RunSummaryHook ends a
# model run with its test metrics and where to look next. ComputeHook opens and closes the
# per-case executor of `compute.scheduler` (sync, a LocalCluster, or a Dask cluster).
# StageLinesHook writes the console's line per node.
_RUN_HOOK = MlflowRunHook()
HOOKS = (_RUN_HOOK, RunStartedHook(_RUN_HOOK), RunSummaryHook(), ComputeHook(), StageLinesHook(), BatchedMlflowHook())
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow",)  # its distribution name

register_catalog_resolvers()
