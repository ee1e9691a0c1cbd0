"""parse_profiles: the `profiles:` section of the agent's config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from onprem.agent.profiles import (
    AppProfile,
    ConfigError,
    DatabaseProfile,
    FolderProfile,
    Profiles,
    parse_profiles,
)


def example(tmp_path: Path) -> dict[str, Any]:
    text = f"""
    profiles:
      databases:
        erp: {{url: "postgresql+psycopg://reader@db.internal:5432/erp", password_env: ERP_DB_PASSWORD, read_only: true}}
        local: {{url: "sqlite:////var/lib/demo.db", read_only: false, pool_size: 4}}
      folders:
        exports: {{root: "{tmp_path}", read_only: false}}
      apps:
        crm: {{base_url: "https://crm.internal/api/", headers_from_env: {{Authorization: CRM_TOKEN}}}}
    """
    loaded: dict[str, Any] = yaml.safe_load(text)["profiles"]
    return loaded


def test_example_section_parses_with_defaults(tmp_path: Path) -> None:
    profiles = parse_profiles(example(tmp_path))
    assert profiles.databases["erp"] == DatabaseProfile(
        name="erp", url="postgresql+psycopg://reader@db.internal:5432/erp", password_env="ERP_DB_PASSWORD",
        read_only=True, pool_size=4,
    )
    assert profiles.databases["erp"].dialect == "postgresql"
    assert profiles.databases["local"].dialect == "sqlite"
    assert profiles.folders["exports"] == FolderProfile(name="exports", root=os.path.realpath(tmp_path))
    crm = profiles.apps["crm"]
    assert (crm.base_url, dict(crm.headers_from_env), crm.timeout_seconds) == (
        "https://crm.internal/api/", {"Authorization": "CRM_TOKEN"}, 30.0)


def test_empty_and_missing_sections_give_no_profiles() -> None:
    assert parse_profiles(None) == Profiles()
    assert parse_profiles({"databases": None}) == Profiles()


def test_profiles_are_frozen(tmp_path: Path) -> None:
    profile = parse_profiles(example(tmp_path)).databases["erp"]
    with pytest.raises(AttributeError):
        profile.read_only = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        parse_profiles(example(tmp_path)).apps["crm"].headers_from_env["X"] = "Y"  # type: ignore[index]


def test_folder_root_symlink_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    profiles = parse_profiles({"folders": {"f": {"root": str(tmp_path / "link")}}})
    assert profiles.folders["f"].root == os.path.realpath(tmp_path / "real")


def test_display_url_hides_an_inline_password() -> None:
    profiles = parse_profiles({"databases": {"d": {"url": "postgresql+psycopg://u:hunter2@h/db"}}})
    assert "hunter2" not in profiles.databases["d"].display_url()
    assert "***" in profiles.databases["d"].display_url()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"database": {}}, r"profiles: unknown field 'database'"),
        ({"databases": []}, r"profiles\.databases: expected a mapping"),
        ({"databases": {"bad name": {"url": "sqlite://"}}}, r"profile name 'bad name'"),
        ({"databases": {"x/y": {"url": "sqlite://"}}}, r"profile name 'x/y'"),
        ({"databases": {"d": {}}}, r"profiles\.databases\.d\.url: required"),
        ({"databases": {"d": {"url": 5}}}, r"profiles\.databases\.d\.url: expected a non-empty string"),
        ({"databases": {"d": {"url": "not a url"}}}, r"profiles\.databases\.d\.url: not a valid SQLAlchemy URL"),
        ({"databases": {"d": {"url": "nosuchdb://h/x"}}}, r"profiles\.databases\.d\.url: unknown database dialect"),
        ({"databases": {"d": {"url": "sqlite://", "pool_size": 0}}}, r"profiles\.databases\.d\.pool_size"),
        ({"databases": {"d": {"url": "sqlite://", "pool_size": "4"}}}, r"profiles\.databases\.d\.pool_size"),
        ({"databases": {"d": {"url": "sqlite://", "read_only": "yes"}}}, r"profiles\.databases\.d\.read_only"),
        ({"databases": {"d": {"url": "sqlite://", "max_rows": -1}}}, r"profiles\.databases\.d\.max_rows"),
        ({"databases": {"d": {"url": "sqlite://", "statement_timeout_seconds": 0}}},
         r"profiles\.databases\.d\.statement_timeout_seconds"),
        ({"databases": {"d": {"url": "sqlite://", "pasword_env": "X"}}}, r"profiles\.databases\.d: unknown field 'pasword_env'"),
        ({"databases": {"d": {"url": "sqlite://", "password_env": "X", "password_file": "/p"}}}, r"not both"),
        ({"databases": {"d": {"url": "sqlite://", "password_env": "1-BAD"}}}, r"password_env"),
        ({"databases": {"d": {"url": "sqlite://", "password_file": "relative/pw"}}}, r"password_file: must be an absolute"),
        ({"databases": {"d": {"url": "postgresql://u:p@h/db", "password_env": "PW"}}}, r"holds a password"),
        ({"folders": {"f": {"root": "relative/dir"}}}, r"profiles\.folders\.f\.root: must be an absolute path"),
        ({"folders": {"f": {"root": "/no/such/dir/onprem"}}}, r"profiles\.folders\.f\.root: .* not an existing directory"),
        ({"apps": {"a": {"base_url": "ftp://h/"}}}, r"profiles\.apps\.a\.base_url: must be an http"),
        ({"apps": {"a": {"base_url": "https://h/api"}}}, r"profiles\.apps\.a\.base_url: must end with '/'"),
        ({"apps": {"a": {"base_url": "https://u:p@h/"}}}, r"must not contain user info"),
        ({"apps": {"a": {"base_url": "https://h/?x=1"}}}, r"must not contain a query"),
        ({"apps": {"a": {"base_url": "https://h/#f"}}}, r"must not contain a query or fragment"),
        ({"apps": {"a": {"base_url": "https:///x/"}}}, r"with a host"),
        ({"apps": {"a": {"base_url": "https://h:99999/"}}}, r"invalid port"),
        ({"apps": {"a": {"base_url": "https://h/", "headers_from_env": {"Bad Header": "X"}}}}, r"not a valid header name"),
        ({"apps": {"a": {"base_url": "https://h/", "headers_from_env": {"X-A": "not-env"}}}}, r"headers_from_env\.X-A"),
        ({"apps": {"a": {"base_url": "https://h/", "headers_from_env": {"X-A": "A", "x-a": "B"}}}}, r"listed twice"),
        ({"apps": {"a": {"base_url": "https://h/", "timeout_seconds": -1}}}, r"profiles\.apps\.a\.timeout_seconds"),
        ({"apps": {"a": {"base_url": "https://h/", "read_only": True}}}, r"profiles\.apps\.a: unknown field 'read_only'"),
    ],
)
def test_invalid_config_names_profile_and_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_profiles(raw)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_invalid_url_message_never_shows_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_profiles({"databases": {"d": {"url": "postgresql://u:hunter2@h:notaport/db"}}})
    assert "hunter2" not in str(info.value)


def test_app_profile_default_headers_is_empty() -> None:
    assert dict(AppProfile(name="a", base_url="https://h/").headers_from_env) == {}
