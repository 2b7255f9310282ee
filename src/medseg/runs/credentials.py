"""Credentials that a Dask task names instead of carrying.

Kedro resolves a catalog entry's `credentials: s3_medseg` into the secret itself before it
makes the dataset. A partition that a Dask worker saves (`medseg.datasets.staged`) would carry
that secret in its pickled task, through the scheduler to every worker, and with `tcp://` over
the network. Instead the task carries a :class:`CredentialsName`: the entry's name in the
project's `conf/<env>/credentials.yml`. The worker reads that file itself, with Kedro's own
config loader, once per process. The project's `conf/` must therefore be on the worker at the
same path, as medseg's code must already be (a shared checkout). A set of credentials that is
not in the project's credentials files cannot be named, and is refused before any task is sent.

The project's credentials are registered in this process by `medseg.runs.hooks.ComputeHook`, from
the run's own config loader. No secret is logged or put in an error message.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from medseg.errors import ConfigurationError


# The project's configuration loader arguments (`medseg.settings` takes them from here), so that
# a worker reads the credentials files as the run does without importing the project's hooks.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]},
}


@dataclass(frozen=True)
class CredentialsName:
    """A set of credentials by name, resolved where it is used (`resolve`).

    Attributes:
        name: its key in the project's credentials files.
        conf_source: the project's `conf` folder.
        env: the Kedro environment of the run (None: the default, `local`).
    """

    name: str
    conf_source: str
    env: str | None = None

    def resolve(self) -> Any:
        """The credentials, read from the project's credentials files in this process."""
        table = _project_credentials(self.conf_source, self.env)
        if self.name not in table:
            raise ConfigurationError(
                f"credentials '{self.name}' are not in the credentials files under {self.conf_source} on this worker. "
                "A Dask worker reads the project's conf/ at the same path as the driver: give it the same checkout."
            )
        return table[self.name]


@dataclass(frozen=True)
class _Project:
    conf_source: str
    env: str | None
    credentials: dict[str, Any]


_registered: _Project | None = None


def register_project(conf_source: str | Path, env: str | None, credentials: dict[str, Any]) -> None:
    """Record the run's credentials table (from its config loader), so that `name_of` can
    name a set of them. Called by the project hook when the context is made."""
    global _registered
    _registered = _Project(str(conf_source), env, dict(credentials or {}))


def name_of(credentials: Any) -> CredentialsName:
    """The name of `credentials` in the project's credentials files, to send instead of them.

    Raises:
        ConfigurationError: they are not in the project's credentials files (given in code,
            or no project is registered): sending them would send the secret.
    """
    if _registered is not None:
        for name in sorted(_registered.credentials):
            if _registered.credentials[name] == credentials:
                return CredentialsName(name, _registered.conf_source, _registered.env)
    raise ConfigurationError(
        "A dataset's credentials are not in the project's conf/*/credentials.yml, so a Dask worker could only get them "
        "inside its task, through the scheduler. Put them in conf/local/credentials.yml and name them in the catalog "
        "entry (`credentials: <name>`), or leave `credentials` out and let the store's own sources on each worker "
        "(for S3 the AWS_* variables, ~/.aws) provide them, or use compute.scheduler=sync."
    )


def named(name: str, what: str) -> Any:
    """The credentials entry `name` of the project's credentials files, for the driver's own
    use (a DICOMweb server's): `what` names the parameter in the message.

    Raises:
        ConfigurationError: no project is registered, or no such entry (the message names the
            entries there are, never a secret).
    """
    table = _registered.credentials if _registered is not None else {}
    if name not in table:
        raise ConfigurationError(
            f"{what}={name!r} names no entry of the project's credentials files (conf/local/credentials.yml); it has "
            f"{sorted(table) or 'none'}. Add `{name}: {{username: ..., password: ...}}` (or `{{token: ...}}`) there."
        )
    return table[name]


def resolved(value: Any) -> Any:
    """`value` with a :class:`CredentialsName` replaced by the credentials it names."""
    return value.resolve() if isinstance(value, CredentialsName) else value


@lru_cache(maxsize=4)
def _project_credentials(conf_source: str, env: str | None) -> dict[str, Any]:
    from kedro.config import MissingConfigException, OmegaConfigLoader

    loader = OmegaConfigLoader(conf_source=conf_source, env=env, **CONFIG_LOADER_ARGS)
    try:
        return dict(loader["credentials"])
    except (KeyError, MissingConfigException):  # no credentials files there
        return {}
