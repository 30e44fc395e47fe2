"""The workspace's services profile at run time: which services are external, how to reach and check them.

The profile's schema is :mod:`maelflow.config.profile`. ``maelflow services use NAME`` validates a
profile and keeps a copy in the workspace (``<workspace>/services.yaml``); from then on every
command and every suite task of that workspace reads it here, through the stack's ``discover``
(:mod:`maelflow.services.stack`): an external service is described from the profile, never started,
never stopped, and ``maelflow services status`` checks it for real (a signed S3 listing, an MLflow
search, a catalogue ``_whoami``, an ecFlow request) and names what is wrong: unreachable, a
certificate that does not verify, or credentials refused.

Secrets are read when needed, from the files or environment variables the profile names.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from typing import TYPE_CHECKING

from maelflow.services.base import ServiceError, ServiceInfo
from maelflow.workspace import SERVICES_PROFILE as PROFILE_FILE
from maelflow.workspace import Workspace, write_atomic

if TYPE_CHECKING:   # the schema (pydantic) is imported where a profile is read: most commands never read one
    from maelflow.config.profile import ServicesProfile

EXTERNAL_NAMES = ("ecflow", "s3", "mlflow", "catalogue")
CHECK_TIMEOUT = 5.0

_cache: dict[Path, tuple[tuple, ServicesProfile]] = {}


# -- loading and choosing -----------------------------------------------------------------------------
def locate(ref: str, config_root: Path | None = None) -> Path:
    """A profile file (:func:`maelflow.config.profile.locate`), under the default config root."""
    from maelflow.config.loader import default_config_root
    from maelflow.config.profile import locate as locate_in

    return locate_in(ref, config_root or default_config_root())


def use(ws: Workspace, ref: str) -> ServicesProfile:
    """Put a profile in force for ``ws`` (``embedded``: back to the workspace's own services)."""
    from maelflow.config.profile import ServicesProfile, load_file

    target = ws.path(PROFILE_FILE)
    if ref == "embedded" and not locate(ref).is_file():
        target.unlink(missing_ok=True)
        return ServicesProfile()
    profile = load_file(locate(ref))
    ws.create()
    write_atomic(target, json.dumps(profile.model_dump(mode="json"), indent=2) + "\n", mode=0o600)
    return profile


def current(ws: Workspace) -> ServicesProfile:
    """The profile in force for ``ws`` (re-read when its file changes); embedded when there is none."""
    from maelflow.config.profile import ServicesProfile, load_file

    path = ws.path(PROFILE_FILE)
    try:
        st = path.stat()
    except FileNotFoundError:
        return ServicesProfile()
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _cache.get(path)
    if cached and cached[0] == stamp:
        return cached[1]
    profile = load_file(path)
    _cache[path] = (stamp, profile)
    return profile


def check_experiment(ws: Workspace, services: str | None, config_root: Path | None = None) -> None:
    """An experiment that names a profile (``services: NAME``) deploys only to a workspace where that
    profile is in force: ServiceError saying what to run otherwise."""
    if not services:
        return
    from maelflow.config.profile import load_file

    wanted = load_file(locate(services, config_root))
    if wanted.model_dump() != current(ws).model_dump():
        raise ServiceError(f"the experiment runs against services profile {wanted.name!r}, but workspace "
                           f"{ws.root} uses {current(ws).name!r}",
                           hint=f"maelflow services use {services} --workspace {ws.root}")


def is_external(ws: Workspace, name: str) -> bool:
    """Whether the profile in force makes ``name`` external; without a profile file (the workspace's
    own services) that is known without reading the schema."""
    if name not in EXTERNAL_NAMES or not ws.path(PROFILE_FILE).is_file():
        return False
    return getattr(current(ws), name).mode == "external"


# -- secrets --------------------------------------------------------------------------------------------
def _secret(service: str, what: str, file: str | None, env: str | None) -> str | None:
    if file:
        path = Path(file).expanduser()
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ServiceError(f"{service}: cannot read the {what} file {path}: {exc.strerror or exc}",
                               hint="the services profile names it (maelflow services use)") from None
    if env:
        value = os.environ.get(env)
        if not value:
            raise ServiceError(f"{service}: the environment variable {env} (the {what}) is not set",
                               hint="the services profile names it (maelflow services use)")
        return value
    return None


def s3_keys(section) -> tuple[str, str]:
    if section.credentials_file:
        raw = _secret("s3", "credentials", section.credentials_file, None)
        try:
            data = json.loads(raw or "")
            return data["access_key"], data["secret_key"]
        except (ValueError, KeyError, TypeError):
            raise ServiceError(f"s3: the credentials file {section.credentials_file} must be JSON with "
                               "access_key and secret_key") from None
    return (_secret("s3", "access key", None, section.access_key_env) or "",
            _secret("s3", "secret key", None, section.secret_key_env) or "")


def mlflow_environment(section) -> dict[str, str]:
    """What MLflow's client reads from the environment to authenticate (token or basic) and to
    verify the server's certificate."""
    env: dict[str, str] = {}
    token = _secret("mlflow", "token", section.token_file, section.token_env)
    if token:
        env["MLFLOW_TRACKING_TOKEN"] = token
    if section.username:
        env["MLFLOW_TRACKING_USERNAME"] = section.username
        env["MLFLOW_TRACKING_PASSWORD"] = _secret("mlflow", "password", section.password_file,
                                                  section.password_env) or ""
    if section.ca_bundle:
        env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(Path(section.ca_bundle).expanduser())
    return env


def catalogue_token(section) -> str:
    return _secret("catalogue", "token", section.token_file, section.token_env) or ""


# -- descriptions (what discover returns) -------------------------------------------------------------------
def info(ws: Workspace, name: str) -> ServiceInfo:
    """The external service ``name`` as callers use it (with its credentials); not checked.

    For MLflow the credentials go into this process's environment, where MLflow's client (and the
    training or sync a task starts) reads them."""
    section = getattr(current(ws), name)
    extra: dict[str, Any] = {"mode": "external", "ca_bundle": section.ca_bundle}
    if name == "ecflow":
        extra.update(host=section.host, port=section.port, passwd_file=section.password_file)
        url = f"ecflow://{section.host}:{section.port}"
    elif name == "s3":
        access, secret = s3_keys(section)
        extra.update(endpoint_url=section.endpoint_url, access_key=access, secret_key=secret,
                     region=section.region, bucket=section.bucket, catalogue_bucket=section.catalogue_bucket,
                     addressing=section.addressing)
        url = section.endpoint_url
    elif name == "mlflow":
        os.environ.update(mlflow_environment(section))
        extra.update(auth="token" if (section.token_file or section.token_env) else
                     "basic" if section.username else "none")
        url = section.tracking_uri.rstrip("/")
    else:
        url = section.url.rstrip("/")
        extra.update(api_url=f"{url}/api/v1", web_url=url, token=catalogue_token(section))
    return ServiceInfo(name=name, url=url, healthy=True, running=True, detail="external", extra=extra)


# -- checks (services status) -------------------------------------------------------------------------------
def check(ws: Workspace, name: str) -> ServiceInfo:
    """The external service ``name``, checked for real; ``detail`` names what is wrong."""
    section = getattr(current(ws), name)
    try:
        described = info(ws, name)
    except ServiceError as exc:
        return _result(name, None, False, f"credentials missing: {exc}")
    url = described.url
    try:
        problem = {"ecflow": _check_ecflow, "s3": _check_s3, "mlflow": _check_mlflow,
                   "catalogue": _check_catalogue}[name](section, described)
    except Exception as exc:  # noqa: BLE001 - whatever the client raised, say it rather than crash
        problem = f"check failed: {type(exc).__name__}: {str(exc)[:300]}"
    public = {k: v for k, v in described.extra.items() if k not in ("secret_key", "token", "access_key")}
    return _result(name, url, problem is None, problem or "external: ok", public)


def _result(name: str, url: str | None, healthy: bool, detail: str, extra: dict | None = None) -> ServiceInfo:
    return ServiceInfo(name=name, url=url, healthy=healthy, running=healthy, detail=detail,
                       extra={"mode": "external", **(extra or {})})


def _reachable(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=CHECK_TIMEOUT).close()
    except OSError as exc:
        return f"unreachable: {host}:{port}: {exc.strerror or exc}"
    return None


def _url_reachable(url: str) -> str | None:
    u = urlsplit(url)
    return _reachable(u.hostname or "", u.port or (443 if u.scheme == "https" else 80))


def _tls_problem(text: str) -> bool:
    low = text.lower()
    return any(w in low for w in ("certificate", "unknownissuer", "cert_", "ssl", "tls handshake", "invalidcert"))


def _check_ecflow(section, described: ServiceInfo) -> str | None:
    from maelflow.services.ecflow import make_client

    problem = _reachable(section.host, section.port)
    if problem:
        return problem
    try:
        ci = make_client(section.host, section.port, passwd_file=section.password_file)
        ci.sync_local()  # needs read access: a refused user or password fails here, a ping would not
    except RuntimeError as exc:
        text = str(exc).strip().replace("\n", " ")
        low = text.lower()
        if any(w in low for w in ("password", "authentic", "access", "not allowed", "white list", "permission")):
            return f"credentials refused: {text[:300]}"
        return f"not answering as an ecflow_server: {text[:300]}"
    return None


def _check_s3(section, described: ServiceInfo) -> str | None:
    import obstore

    from maelflow.s3 import settings_from_service
    from maelflow.s3 import object_store

    problem = _url_reachable(section.endpoint_url)
    if problem:
        return problem
    settings = settings_from_service(described.extra, "write")
    for bucket in dict.fromkeys((section.bucket, section.catalogue_bucket)):
        store = object_store(settings, bucket, connect_timeout=CHECK_TIMEOUT, read_timeout=CHECK_TIMEOUT,
                             max_retries=0, retry_timeout=CHECK_TIMEOUT)
        try:
            obstore.list_with_delimiter(store)
        except Exception as exc:  # noqa: BLE001 - obstore's errors are classified by their text
            text = str(exc).replace("\n", " ")
            if _tls_problem(text):
                return f"bad certificate: {section.endpoint_url} does not verify" \
                       f"{' against ' + section.ca_bundle if section.ca_bundle else ''}: {text[:300]}"
            if any(w in text for w in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")):
                return f"credentials refused by {section.endpoint_url}: {text[:300]}"
            if "NoSuchBucket" in text or "404" in text:
                return f"bucket {bucket!r} does not exist at {section.endpoint_url}"
            return f"S3 request failed: {text[:300]}"
    return None


def _http(section, url: str, headers: dict[str, str] | None = None, auth=None):
    import requests

    verify: Any = str(Path(section.ca_bundle).expanduser()) if section.ca_bundle else True
    return requests.get(url, headers=headers or {}, auth=auth, verify=verify, timeout=CHECK_TIMEOUT)


def _http_problem(section, base: str, do) -> str | None:
    import requests

    problem = _url_reachable(base)
    if problem:
        return problem
    try:
        resp = do()
    except requests.exceptions.SSLError as exc:
        return f"bad certificate: {base} does not verify" \
               f"{' against ' + section.ca_bundle if section.ca_bundle else ''}: {str(exc)[:300]}"
    except requests.exceptions.RequestException as exc:
        return f"unreachable: {base}: {str(exc)[:300]}"
    if resp.status_code in (401, 403):
        return f"credentials refused by {base} (HTTP {resp.status_code})"
    if resp.status_code != 200:
        return f"{base} answered HTTP {resp.status_code}: {resp.text[:200]}"
    return None


def _check_mlflow(section, described: ServiceInfo) -> str | None:
    env = mlflow_environment(section)
    headers, auth = {}, None
    if env.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
    if env.get("MLFLOW_TRACKING_USERNAME"):
        auth = (env["MLFLOW_TRACKING_USERNAME"], env.get("MLFLOW_TRACKING_PASSWORD", ""))
    base = described.url
    return _http_problem(section, base, lambda: _http(
        section, f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers, auth))


def _check_catalogue(section, described: ServiceInfo) -> str | None:
    base = described.url
    token = described.extra["token"]
    answers: list = []

    def whoami():
        answers.append(_http(section, f"{base}/api/v1/_whoami", {"Authorization": f"Bearer {token}"}))
        return answers[-1]

    problem = _http_problem(section, base, whoami)
    if problem:
        return problem
    role = answers[-1].json().get("role")
    if role not in ("write", "admin"):
        return f"credentials refused by {base}: the token's role is {role!r}, tasks need 'write'"
    return None
