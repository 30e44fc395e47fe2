"""The services profile: what validate and 'services use' accept and refuse, and what callers get.

No service is needed: an external service is described from the profile (not checked) by the
stack's discovery, and these tests look at that description and at the refusals.
"""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from maelflow.cli.main import cli
from maelflow.config.errors import ConfigError
from maelflow.config.profile import load_file
from maelflow.services import profile, stack
from maelflow.workspace import Workspace

pytestmark = pytest.mark.unit

EXTERNAL = {
    "name": "prod",
    "ecflow": {"mode": "external", "host": "bridge.example", "port": 3141, "password_file": "/etc/ecf.passwd"},
    "s3": {"mode": "external", "endpoint_url": "https://s3.example", "ca_bundle": "/etc/ca.pem",
           "region": "eu", "bucket": "data", "addressing": "virtual", "credentials_file": "KEYS"},
    "mlflow": {"mode": "external", "tracking_uri": "https://mlflow.example", "username": "mf",
               "password_file": "PASSWORD"},
    "catalogue": {"mode": "external", "url": "https://cat.example/", "token_env": "CAT_TOKEN"},
}


def write(tmp_path, data) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def secrets_in(tmp_path) -> dict:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"access_key": "AK", "secret_key": "SK"}))
    password = tmp_path / "pw"
    password.write_text("hunter2\n")
    data = json.loads(json.dumps(EXTERNAL))
    data["s3"]["credentials_file"] = str(keys)
    data["mlflow"]["password_file"] = str(password)
    return data


@pytest.mark.parametrize("section,key,value", [
    ("s3", "secret_key", "S3CR3T-1"), ("s3", "access_key", "S3CR3T-2"), ("mlflow", "password", "S3CR3T-3"),
    ("catalogue", "token", "S3CR3T-4"), ("ecflow", "password", "S3CR3T-5")])
def test_a_secret_written_inline_is_refused_without_showing_it(tmp_path, section, key, value):
    data = json.loads(json.dumps(EXTERNAL))
    data[section][key] = value
    with pytest.raises(ConfigError) as err:
        load_file(profile.locate(write(tmp_path, data)))
    (problem,) = [p for p in err.value.problems if p.field == f"{section}.{key}"]
    assert problem.value == "***" and "must not be written" in problem.reason
    assert value not in json.dumps([p.to_json() for p in err.value.problems])


def test_a_url_carrying_a_password_is_refused_and_masked(tmp_path):
    data = json.loads(json.dumps(EXTERNAL))
    data["mlflow"]["tracking_uri"] = "https://mf:sesame@mlflow.example"
    with pytest.raises(ConfigError) as err:
        load_file(profile.locate(write(tmp_path, data)))
    (problem,) = [p for p in err.value.problems if p.field == "mlflow.tracking_uri"]
    assert "password" in problem.reason and problem.value == "https://mf:***@mlflow.example"
    assert "sesame" not in json.dumps([p.to_json() for p in err.value.problems])


@pytest.mark.parametrize("section,change,reason", [
    ("s3", {"endpoint_url": "http://s3.example"}, "HTTPS"),
    ("s3", {"credentials_file": None}, "credentials_file"),
    ("ecflow", {"port": None}, "host and port"),
    ("catalogue", {"token_env": None}, "token_file or token_env"),
    ("mlflow", {"token_file": "/t"}, "not both"),
])
def test_an_external_service_needs_its_address_and_credentials(tmp_path, section, change, reason):
    data = json.loads(json.dumps(EXTERNAL))
    data[section].update(change)
    data[section] = {k: v for k, v in data[section].items() if v is not None}
    with pytest.raises(ConfigError) as err:
        load_file(profile.locate(write(tmp_path, data)))
    assert any(reason in p.reason for p in err.value.problems), err.value.problems


def test_an_embedded_service_takes_no_address(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_file(profile.locate(write(tmp_path, {"ecflow": {"host": "x"}})))
    assert "mode is embedded" in err.value.problems[0].reason


def test_use_puts_it_in_force_and_discovery_describes_external_services(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    monkeypatch.setenv("CAT_TOKEN", "the-token")
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_SERVER_CERT_PATH"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(cli, ["services", "use", write(tmp_path, secrets_in(tmp_path)),
                                      "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert ws.path(profile.PROFILE_FILE).stat().st_mode & 0o777 == 0o600
    assert "hunter2" not in ws.path(profile.PROFILE_FILE).read_text()  # names of files, never secrets
    ecf = stack.discover(ws, "ecflow")
    assert (ecf.extra["host"], ecf.extra["port"], ecf.extra["passwd_file"]) == ("bridge.example", 3141,
                                                                               "/etc/ecf.passwd")
    from maelflow.services.stack import s3_settings

    s3 = s3_settings(ws, "catalogue")  # an external endpoint serves every role with its one key pair
    assert (s3["endpoint_url"], s3["access_key"], s3["secret_key"], s3["ca_bundle"], s3["addressing"]) == \
        ("https://s3.example", "AK", "SK", "/etc/ca.pem", "virtual")
    assert stack.discover(ws, "mlflow").url == "https://mlflow.example"
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "mf" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2"
    cat = stack.discover(ws, "catalogue")
    assert cat.url == "https://cat.example" and cat.extra["token"] == "the-token"
    # nothing is started or stopped for them
    assert not ws.path("ecflow").exists()
    downs = stack.down(ws, names=["ecflow", "s3", "mlflow", "catalogue"])
    assert all("external" in downs[n].detail for n in ("ecflow", "s3", "mlflow", "catalogue"))
    # and 'embedded' goes back to the workspace's own services
    assert CliRunner().invoke(cli, ["services", "use", "embedded", "--workspace", str(ws.root)]).exit_code == 0
    assert not profile.is_external(ws, "s3")


def test_a_missing_secret_names_the_file_or_variable(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    monkeypatch.delenv("CAT_TOKEN", raising=False)
    profile.use(ws, write(tmp_path, secrets_in(tmp_path)))
    from maelflow.services.base import ServiceError

    with pytest.raises(ServiceError, match="CAT_TOKEN"):
        stack.discover(ws, "catalogue")


def test_virtual_hosted_addressing_puts_the_bucket_in_the_host():
    from maelflow.s3 import _virtual_host

    assert _virtual_host("https://s3.example:8443", "data") == "https://data.s3.example:8443"


def test_validate_checks_the_experiments_profile(tmp_path):
    bad = json.loads(json.dumps(EXTERNAL))
    bad["s3"]["secret_key"] = "abc"
    path = write(tmp_path, bad)
    result = CliRunner().invoke(cli, ["validate", "demo", f"services={path}", "--json",
                                      "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    problems = json.loads(result.output)["problems"]
    assert any(p["field"] == "s3.secret_key" and p["value"] == "***" for p in problems), problems


def test_an_experiment_naming_a_profile_deploys_only_where_it_is_in_force(tmp_path, monkeypatch):
    from maelflow.services.base import ServiceError

    ws = Workspace(tmp_path / "ws")
    path = write(tmp_path, secrets_in(tmp_path))
    with pytest.raises(ServiceError, match="services use"):
        profile.check_experiment(ws, path)
    profile.use(ws, path)
    profile.check_experiment(ws, path)  # in force: fine
    profile.check_experiment(ws, None)  # an experiment that names none takes the workspace's
