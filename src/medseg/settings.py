"""Project settings: the project's hooks and where configuration is read from."""

from medseg.hooks import MlflowRunHook

# kedro-mlflow's own hook is registered by its entry point; ours runs first (tryfirst) to name
# the run and to check the tracking server before kedro-mlflow contacts it.
HOOKS = (MlflowRunHook(),)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
}
