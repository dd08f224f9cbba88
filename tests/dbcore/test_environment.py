"""The environment table of the guide, and passwords that never show."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import REPO

from dbcore.connection import Env, Target, resolve_env, resolve_target
from dbcore.embedded import embedded_database_url
from dbcore.errors import ConfigError, EnvMismatch
from dbcore.redact import mask_url
from dbcore.settings import Settings


@pytest.mark.parametrize(
    ("variables", "requested", "expected"),
    [
        ({}, None, Env.LOCAL),
        ({}, "local", Env.LOCAL),
        ({"USE_FLY_POSTGRES_FROM_LOCAL_PROXY": "1"}, None, Env.PROXY),
        ({"USE_FLY_POSTGRES_FROM_LOCAL_PROXY": "1"}, "proxy", Env.PROXY),
        ({"FLY_APP_NAME": "myapp"}, None, Env.PRODUCTION),
        ({"FLY_APP_NAME": "myapp"}, "production", Env.PRODUCTION),
        ({"USE_FLY_POSTGRES_FROM_LOCAL_PROXY": "0"}, None, Env.LOCAL),
    ],
)
def test_environment_is_detected_as_the_guide_says(monkeypatch, variables, requested, expected):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert resolve_env(Settings(), requested) is expected


@pytest.mark.parametrize(
    ("variables", "requested", "named"),
    [
        ({}, "production", "FLY_APP_NAME"),
        ({}, "proxy", "USE_FLY_POSTGRES_FROM_LOCAL_PROXY"),
        ({"FLY_APP_NAME": "myapp"}, "local", "FLY_APP_NAME=myapp"),
        ({"USE_FLY_POSTGRES_FROM_LOCAL_PROXY": "1"}, "production", "USE_FLY_POSTGRES_FROM_LOCAL_PROXY=1"),
    ],
)
def test_explicit_env_contradicting_the_variables_is_refused(monkeypatch, variables, requested, named):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(EnvMismatch) as info:
        resolve_env(Settings(), requested)
    message = str(info.value)
    assert f"--env {requested}" in message and named in message


def test_production_needs_database_url(monkeypatch):
    monkeypatch.setenv("FLY_APP_NAME", "myapp")
    with pytest.raises(ConfigError, match="DATABASE_URL is not set"):
        resolve_target(Settings())


def test_local_without_any_database_says_how_to_get_one(tmp_path):
    with pytest.raises(ConfigError, match="make run"):
        resolve_target(Settings(local_dir=tmp_path))


def test_passwords_are_masked_wherever_a_url_is_shown():
    url = "postgres://app:p%40ss-w0rd@db.internal:5432/app?sslmode=require"
    assert mask_url(url) == "postgres://app:***@db.internal:5432/app?sslmode=require"
    target = Target(Env.PRODUCTION, url)
    for shown in (str(target), repr(target), target.masked_url):
        assert "w0rd" not in shown
    assert target.password == "p@ss-w0rd" and target.dbname == "app"


def test_the_suite_never_reads_what_make_run_left_under_dot_local():
    """`make run` leaves services.json, the embedded database and Prefect's home under .local/: a test
    run after it (`make run && make test`) must judge the same files the same way, and leave them alone."""
    repo_local = (REPO / ".local").resolve()
    settings = Settings()
    assert repo_local not in (settings.local_dir.resolve(), *settings.local_dir.resolve().parents)
    assert repo_local not in Path(os.environ["PREFECT_HOME"]).resolve().parents
    assert embedded_database_url(settings) is None
    with pytest.raises(ConfigError, match="make run"):
        resolve_target(settings)
