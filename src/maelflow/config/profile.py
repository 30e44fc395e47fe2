"""The services profile: for each of ecFlow, S3 (the EWC), MLflow and the catalogue, embedded or external.

``embedded`` (the default) is the workspace's own server on 127.0.0.1, started by
``maelflow services up``. ``external`` is a server run by someone else (production: ecflow_server on
a data bridge, the EWC object store over HTTPS, a shared MLflow behind authentication, the catalogue
behind HTTPS): the profile gives its address and where its credentials are, and maelflow never
starts or stops it. A profile is a YAML file (``configs/services/NAME.yaml``), put in force for a
workspace with ``maelflow services use NAME`` (every command and suite task of that workspace then
uses it) or named by an experiment (``services: NAME``), which ``maelflow validate`` checks.

Secrets are never written in a profile (it is a config file, copied, committed and printed): a
password, key or token is named by the file that holds it (``*_file``) or the environment variable
(``*_env``). A profile with a secret written inline is refused, naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from maelflow.config.models import Strict

# keys that would hold a secret written inline, and what to write instead
INLINE_SECRETS = {
    "password": "password_file or password_env", "passwd": "password_file",
    "secret_key": "credentials_file, or access_key_env and secret_key_env",
    "access_key": "credentials_file, or access_key_env and secret_key_env",
    "aws_secret_access_key": "credentials_file", "aws_access_key_id": "credentials_file",
    "secret": "a *_file or *_env field", "token": "token_file or token_env", "api_key": "token_file or token_env",
}


def _one_source(section: str, what: str, file: str | None, env: str | None, required: bool) -> None:
    if file and env:
        raise ValueError(f"{section}: give {what}_file or {what}_env, not both")
    if required and not (file or env):
        raise ValueError(f"{section}: external needs {what}_file or {what}_env (where the {what} is kept)")


def _no_userinfo(url: str | None) -> str | None:
    if url and "@" in url.split("://", 1)[-1].split("/", 1)[0]:
        raise ValueError("must not carry a user or password (user:password@host): give them as *_file or *_env")
    return url


class _Section(Strict):
    mode: Literal["embedded", "external"] = Field(
        "embedded", description="embedded: the workspace's own server on 127.0.0.1 (maelflow services up); "
        "external: a server run elsewhere, at the address below (maelflow never starts or stops it).")
    ca_bundle: str | None = Field(None, description="PEM file of the certificate authorities to trust for "
                                                    "HTTPS to this service (default: the system's).")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower() in INLINE_SECRETS:
                    raise ValueError(f"'{key}': secrets must not be written in the profile; name where it is "
                                     f"kept instead ({INLINE_SECRETS[str(key).lower()]})")
        return data

    def _embedded_only_mode(self, *names: str) -> None:
        if self.mode == "embedded":
            given = [n for n in names if getattr(self, n) not in (None, [], {})]
            if given:
                raise ValueError(f"{', '.join(given)} set but mode is embedded (set mode: external)")


class EcflowProfile(_Section):
    host: str | None = Field(None, description="Host of the ecflow_server (the data bridge).")
    port: int | None = Field(None, ge=1, le=65535, description="Port of the ecflow_server.")
    password_file: str | None = Field(
        None, description="ecFlow password file (lines '<user> <host> <port> <password>', mode 0600) of a "
        "server started with ECF_PASSWD; none for a server without passwords.")

    @model_validator(mode="after")
    def _check(self) -> "EcflowProfile":
        self._embedded_only_mode("host", "port", "password_file", "ca_bundle")
        if self.mode == "external" and not (self.host and self.port):
            raise ValueError("ecflow: external needs host and port")
        return self


class S3Profile(_Section):
    endpoint_url: str | None = Field(None, description="S3 endpoint of the EWC object store (https://...).")
    region: str = Field("us-east-1", description="Region the requests are signed for.")
    bucket: str = Field("ewc", description="Bucket of the datasets.")
    catalogue_bucket: str = Field("catalogue", description="Bucket of the catalogue's documents and artefacts.")
    addressing: Literal["path", "virtual"] = Field(
        "path", description="path: https://endpoint/bucket/key; virtual: https://bucket.endpoint/key.")
    credentials_file: str | None = Field(
        None, description="JSON file (mode 0600) with access_key and secret_key.")
    access_key_env: str | None = Field(None, description="Environment variable holding the access key.")
    secret_key_env: str | None = Field(None, description="Environment variable holding the secret key.")

    _url = field_validator("endpoint_url")(classmethod(lambda cls, v: _no_userinfo(v)))

    @model_validator(mode="after")
    def _check(self) -> "S3Profile":
        self._embedded_only_mode("endpoint_url", "credentials_file", "access_key_env", "secret_key_env", "ca_bundle")
        if self.mode == "external":
            if not self.endpoint_url or not self.endpoint_url.startswith("https://"):
                raise ValueError("s3: external needs endpoint_url over HTTPS (https://...)")
            envs = (self.access_key_env, self.secret_key_env)
            if self.credentials_file and any(envs):
                raise ValueError("s3: give credentials_file, or access_key_env and secret_key_env, not both")
            if not self.credentials_file and not all(envs):
                raise ValueError("s3: external needs credentials_file, or access_key_env and secret_key_env")
        return self


class MlflowProfile(_Section):
    tracking_uri: str | None = Field(None, description="URL of the MLflow tracking server.")
    token_file: str | None = Field(None, description="File holding a bearer token (MLFLOW_TRACKING_TOKEN).")
    token_env: str | None = Field(None, description="Environment variable holding a bearer token.")
    username: str | None = Field(None, description="User for HTTP basic authentication.")
    password_file: str | None = Field(None, description="File holding the basic-authentication password.")
    password_env: str | None = Field(None, description="Environment variable holding that password.")

    _url = field_validator("tracking_uri")(classmethod(lambda cls, v: _no_userinfo(v)))

    @model_validator(mode="after")
    def _check(self) -> "MlflowProfile":
        self._embedded_only_mode("tracking_uri", "token_file", "token_env", "username", "password_file",
                                 "password_env", "ca_bundle")
        if self.mode == "external":
            if not self.tracking_uri or not self.tracking_uri.startswith(("http://", "https://")):
                raise ValueError("mlflow: external needs tracking_uri (https://...)")
            token = self.token_file or self.token_env
            _one_source("mlflow", "token", self.token_file, self.token_env, False)
            _one_source("mlflow", "password", self.password_file, self.password_env, bool(self.username))
            if token and self.username:
                raise ValueError("mlflow: give a token or a username and password, not both")
            if (self.password_file or self.password_env) and not self.username:
                raise ValueError("mlflow: a password needs a username")
        return self


class CatalogueProfile(_Section):
    url: str | None = Field(None, description="URL of the catalogue (its web pages; the API is under /api/v1).")
    token_file: str | None = Field(None, description="File holding a catalogue token with the write role.")
    token_env: str | None = Field(None, description="Environment variable holding that token.")

    _url = field_validator("url")(classmethod(lambda cls, v: _no_userinfo(v)))

    @model_validator(mode="after")
    def _check(self) -> "CatalogueProfile":
        self._embedded_only_mode("url", "token_file", "token_env", "ca_bundle")
        if self.mode == "external":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError("catalogue: external needs url (https://...)")
            _one_source("catalogue", "token", self.token_file, self.token_env, True)
        return self


class ServicesProfile(Strict):
    name: str = Field("embedded", description="Profile name (its file name under configs/services/).")
    description: str = Field("", description="Where these services are.")
    ecflow: EcflowProfile = Field(default_factory=EcflowProfile, description="The ecFlow server.")
    s3: S3Profile = Field(default_factory=S3Profile, description="The EWC object store (S3).")
    mlflow: MlflowProfile = Field(default_factory=MlflowProfile, description="The MLflow tracking server.")
    catalogue: CatalogueProfile = Field(default_factory=CatalogueProfile, description="The lineage catalogue.")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower() in INLINE_SECRETS:
                    raise ValueError(f"'{key}': secrets must not be written in the profile; name where it is "
                                     f"kept instead ({INLINE_SECRETS[str(key).lower()]})")
        return data

    def external(self) -> list[str]:
        return [n for n in ("ecflow", "s3", "mlflow", "catalogue") if getattr(self, n).mode == "external"]


# -- the file -------------------------------------------------------------------------------------------
def locate(ref: str, config_root: Path) -> Path:
    """A profile file: a path (``.yaml``, or with a '/'), else ``<config root>/services/REF.yaml``."""
    if ref.endswith((".yaml", ".yml")) or os.sep in ref:
        return Path(ref).expanduser().resolve()
    return config_root / "services" / f"{ref}.yaml"


def load_file(path: Path) -> ServicesProfile:
    """The validated profile in ``path``; ConfigError listing every problem (file, field, value)."""
    import yaml
    from pydantic import ValidationError

    from maelflow.config.errors import ConfigError, ConfigProblem, problems_from_validation

    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ConfigError([ConfigProblem(str(path), "", path.stem,
                                         f"no services profile file {path}; known: {', '.join(known) or 'none'}")])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(str(path), "", "", f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(str(path), "", str(data)[:80], "a profile is a mapping")])
    data.setdefault("name", path.stem)
    problems = inline_secrets(data, str(path))  # reported without their values, and taken out first
    try:
        profile = ServicesProfile.model_validate(data)
    except ValidationError as err:
        problems += problems_from_validation(err, str(path))
    if problems:
        raise ConfigError(problems) from None
    return profile


def inline_secrets(data: dict, file: str) -> list:
    """Problems for every secret written in the profile (removed from ``data``), values hidden."""
    import re

    from maelflow.config.errors import ConfigProblem

    problems = []
    for section, body in [("", data), *((k, v) for k, v in data.items() if isinstance(v, dict))]:
        for key in list(body):
            where = f"{section}.{key}" if section else str(key)
            if str(key).lower() in INLINE_SECRETS:
                body.pop(key)
                problems.append(ConfigProblem(file, where, "***", "a secret must not be written in the profile; "
                                              f"name where it is kept instead ({INLINE_SECRETS[str(key).lower()]})"))
            elif isinstance(body[key], str) and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]+:[^/@]*@", body[key]):
                shown = re.sub(r"(://[^/@:]+:)[^/@]*@", r"\1***@", body[key])
                body.pop(key)
                problems.append(ConfigProblem(file, where, shown, "a URL must not carry a password "
                                              "(user:password@host): give it as *_file or *_env"))
    return problems
