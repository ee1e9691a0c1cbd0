"""App profiles in the agent's YAML: every setting, and the mistakes refused at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from onprem.agent.profiles import (
    DEFAULT_APP_METHODS,
    AppProfile,
    BasicAuth,
    ConfigError,
    SecretSource,
    parse_profiles,
)


@pytest.fixture
def tls_files(tmp_path: Path) -> Path:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("PEM\n")
    return tmp_path


def test_a_full_app_profile_parses(tls_files: Path) -> None:
    text = f"""
    apps:
      erp:
        base_url: "https://erp.internal/api/"
        methods: [GET, post]
        path_prefixes: ["orders/", "v2/customers"]
        headers_from_env: {{X-Tenant: ERP_TENANT}}
        headers_from_file: {{X-Api-Key: /run/secrets/erp-key}}
        basic_auth: {{username_env: ERP_USER, password_file: /run/secrets/erp-password}}
        ca_file: {tls_files / "ca.pem"}
        client_cert_file: {tls_files / "client.pem"}
        client_key_file: {tls_files / "client.key"}
        connect_timeout_seconds: 3
        read_timeout_seconds: 120
        max_response_bytes: 1073741824
    """
    erp = parse_profiles(yaml.safe_load(text)).apps["erp"]
    assert erp == AppProfile(
        name="erp", base_url="https://erp.internal/api/",
        headers_from_env={"X-Tenant": "ERP_TENANT"}, headers_from_file={"X-Api-Key": "/run/secrets/erp-key"},
        basic_auth=BasicAuth(password=SecretSource(file="/run/secrets/erp-password"),
                             username_source=SecretSource(env="ERP_USER")),
        methods=frozenset({"GET", "POST"}), path_prefixes=("orders", "v2/customers"),
        ca_file=str(tls_files / "ca.pem"), client_cert_file=str(tls_files / "client.pem"),
        client_key_file=str(tls_files / "client.key"), connect_timeout_seconds=3.0, read_timeout_seconds=120.0,
        max_response_bytes=1073741824,
    )
    assert erp.injected_header_names() == {"x-tenant", "x-api-key", "authorization"}


def test_defaults_allow_the_common_methods_and_the_whole_base_url() -> None:
    app = parse_profiles({"apps": {"a": {"base_url": "http://h/"}}}).apps["a"]
    assert (app.methods, app.path_prefixes, app.tls_verify, app.max_response_bytes) == (
        DEFAULT_APP_METHODS, None, True, None)
    assert (app.connect_timeout_seconds, app.read_timeout_seconds) == (10.0, 30.0)


def test_the_older_single_timeout_sets_both_unless_one_is_given() -> None:
    app = parse_profiles({"apps": {"a": {"base_url": "http://h/", "timeout_seconds": 5,
                                         "read_timeout_seconds": 60}}}).apps["a"]
    assert (app.connect_timeout_seconds, app.read_timeout_seconds, app.timeout_seconds) == (5.0, 60.0, 60.0)


def test_a_bearer_token_from_a_file_injects_authorization() -> None:
    app = parse_profiles({"apps": {"a": {"base_url": "http://h/", "bearer_token_file": "/run/t"}}}).apps["a"]
    assert app.bearer_token == SecretSource(file="/run/t")
    assert app.injected_header_names() == {"authorization"}


def test_tls_verify_false_is_accepted_when_explicit() -> None:
    app = parse_profiles({"apps": {"a": {"base_url": "https://h/", "tls_verify": False}}}).apps["a"]
    assert app.tls_verify is False


def _app(**fields: Any) -> dict[str, Any]:
    return {"apps": {"a": {"base_url": "https://h/", **fields}}}


@pytest.mark.parametrize(("raw", "message"), [
    (_app(methods=[]), r"methods: expected a non-empty list"),
    (_app(methods="GET"), r"methods: expected a non-empty list"),
    (_app(methods=["GET", "CONNECT"]), r"CONNECT is never allowed"),
    (_app(methods=["trace"]), r"TRACE is never allowed"),
    (_app(methods=["G T"]), r"'G T' is not an HTTP method"),
    (_app(path_prefixes=[]), r"path_prefixes: expected a non-empty list"),
    (_app(path_prefixes=["/orders"]), r"must not start with '/'"),
    (_app(path_prefixes=[""]), r"must be a non-empty path"),
    (_app(path_prefixes=["orders/../admin"]), r"must be plain path segments"),
    (_app(path_prefixes=["orders/%2e"]), r"must be plain path segments"),
    (_app(path_prefixes=["a//b"]), r"must be plain path segments"),
    (_app(path_prefixes=["a?b"]), r"must be plain path segments"),
    (_app(headers_from_file={"X-Key": "relative/path"}), r"headers_from_file\.X-Key: must be an absolute path"),
    (_app(headers_from_file={"Host": "/run/h"}), r"'Host' is managed by the HTTP client"),
    (_app(headers_from_env={"Content-Length": "X"}), r"'Content-Length' is managed by the HTTP client"),
    (_app(headers_from_env={"X-Key": "A"}, headers_from_file={"x-key": "/run/k"}), r"'x-key' is injected twice"),
    (_app(bearer_token_env="T", bearer_token_file="/t"), r"set bearer_token_env or bearer_token_file, not both"),
    (_app(bearer_token_env="not-env"), r"bearer_token_env: 'not-env' is not an environment variable"),
    (_app(bearer_token_env="T", basic_auth={"username": "u", "password_env": "P"}), r"not both"),
    (_app(bearer_token_env="T", headers_from_env={"Authorization": "A"}), r"Authorization is injected twice"),
    (_app(basic_auth={"username": "u"}), r"basic_auth: set password_env or password_file"),
    (_app(basic_auth={"username": "u", "password": "hunter2"}), r"basic_auth: unknown field 'password'"),
    (_app(basic_auth={"password_env": "P"}), r"exactly one of username, username_env, username_file"),
    (_app(basic_auth={"username": "a:b", "password_env": "P"}), r"must not contain ':'"),
    (_app(basic_auth="u:p"), r"basic_auth: expected a mapping"),
    (_app(ca_file="/no/such/ca.pem"), r"ca_file: '/no/such/ca.pem' is not an existing file"),
    (_app(ca_file="ca.pem"), r"ca_file: must be an absolute path"),
    (_app(tls_verify="false"), r"tls_verify: expected true or false"),
    (_app(max_response_bytes=0), r"max_response_bytes: expected a positive integer"),
    (_app(connect_timeout_seconds=0), r"connect_timeout_seconds"),
    (_app(read_timeout_seconds=float("inf")), r"read_timeout_seconds"),
    ({"apps": {"a": {"base_url": "http://h/", "tls_verify": False}}}, r"need an https:// base_url"),
])
def test_invalid_app_settings_are_refused_naming_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_profiles(raw)


def test_tls_settings_that_contradict_each_other_are_refused(tls_files: Path) -> None:
    with pytest.raises(ConfigError, match="pointless with tls_verify: false"):
        parse_profiles(_app(tls_verify=False, ca_file=str(tls_files / "ca.pem")))
    with pytest.raises(ConfigError, match="client_key_file: set client_cert_file too"):
        parse_profiles(_app(client_key_file=str(tls_files / "client.key")))


# -- allow_caller_headers --


def test_allowed_caller_headers_are_kept_in_canonical_form() -> None:
    app = parse_profiles(_app(allow_caller_headers=["X-Forwarded-For", "X_Real_IP", "Host", "X-HTTP-Method-Override"]))
    assert app.apps["a"].allow_caller_headers == {"x-forwarded-for", "x-real-ip", "host", "x-http-method-override"}


def test_by_default_no_steering_header_is_allowed() -> None:
    assert parse_profiles(_app()).apps["a"].allow_caller_headers == frozenset()
    assert parse_profiles(_app(allow_caller_headers=[])).apps["a"].allow_caller_headers == frozenset()


def test_caller_credentials_may_be_allowed_only_where_the_profile_injects_its_own() -> None:
    keyed = parse_profiles(_app(headers_from_env={"X-Api-Key": "K"}, allow_caller_headers=["Cookie", "Authorization"]))
    assert keyed.apps["a"].allow_caller_headers == {"cookie", "authorization"}
    with pytest.raises(ConfigError, match=r"callers may already send 'Cookie'"):
        parse_profiles(_app(allow_caller_headers=["Cookie"]))


@pytest.mark.parametrize(("raw", "message"), [
    (_app(allow_caller_headers="X-Forwarded-For"),
     r"a\.allow_caller_headers: expected a list of header names such as \[X-Forwarded-For\]"),
    (_app(allow_caller_headers=["X Forwarded"]), r"allow_caller_headers: 'X Forwarded' is not a valid header name"),
    (_app(allow_caller_headers=["X-Forwarded-For\n"]), r"'X-Forwarded-For\\n' is not a valid header name"),
    (_app(allow_caller_headers=[7]), r"allow_caller_headers: 7 is not a valid header name"),
    (_app(allow_caller_headers=["Transfer-Encoding"]),
     r"'Transfer-Encoding' is hop-by-hop: it belongs to the agent's own connection to the app and can never come "
     r"from a caller"),
    (_app(allow_caller_headers=["connection"]), r"'connection' is hop-by-hop"),
    (_app(allow_caller_headers=["Upgrade"]), r"'Upgrade' is hop-by-hop"),
    (_app(allow_caller_headers=["TE"]), r"'TE' is hop-by-hop"),
    (_app(allow_caller_headers=["Proxy_Authorization"]), r"'Proxy_Authorization' is hop-by-hop"),
    (_app(allow_caller_headers=["X-Trace"]),
     r"callers may already send 'X-Trace'; list only headers the agent refuses \(method overrides, rewritten "
     r"URLs, Host, Forwarded, X-Forwarded-\*, client addresses, and Authorization or Cookie on a profile that "
     r"injects credentials\)"),
    (_app(allow_caller_headers=["Content-Length"]), r"callers may already send 'Content-Length'"),
    (_app(allow_caller_headers=["Authorization"]), r"callers may already send 'Authorization'"),
    (_app(headers_from_env={"X-Api-Key": "K"}, allow_caller_headers=["x_api_key"]),
     r"'x_api_key' is injected by the agent for this profile; a caller can never send or override it"),
    (_app(bearer_token_env="T", allow_caller_headers=["Authorization"]), r"'Authorization' is injected by the agent"),
    (_app(allow_caller_headers=["X-Forwarded-For", "x_forwarded_for"]), r"'x_forwarded_for' is listed twice"),
])
def test_invalid_allowed_caller_headers_are_refused_naming_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_profiles(raw)
