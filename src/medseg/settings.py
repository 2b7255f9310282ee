"""Project settings: the project's hooks and where configuration is read from."""

from medseg.hooks import MlflowRunHook, RunStartedHook

# kedro-mlflow's own hook is registered by its entry point. MlflowRunHook runs before it
# (tryfirst): it locks the project, checks the tracking server and names the run.
# RunStartedHook runs after it (trylast), once the run has started.
_RUN_HOOK = MlflowRunHook()
HOOKS = (_RUN_HOOK, RunStartedHook(_RUN_HOOK))

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
}
