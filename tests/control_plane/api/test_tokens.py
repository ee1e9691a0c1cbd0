"""Operator and enrollment tokens are created, listed and revoked, over the API and with both CLIs.

One real control plane (no agent needed) for the module; each test makes its own tokens. What is checked is
what an admin and an attacker see: exact statuses and messages, secrets shown once and never listed, scopes
that cannot be widened.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from onprem.agent.identity import make_key_and_csr
from onprem.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    tokens_pb2,
    tokens_pb2_grpc,
)
from tools.cluster import ControlPlaneProcess, agents_stub, bearer

S = grpc.StatusCode
ONPREM = str(Path(sys.executable).parent / "onprem")
CONTROL_PLANE = str(Path(sys.executable).parent / "onprem-control-plane")
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
OPERATOR, ADMIN = tokens_pb2.TOKEN_ROLE_OPERATOR, tokens_pb2.TOKEN_ROLE_ADMIN


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    process = ControlPlaneProcess(tmp_path_factory.mktemp("tokens") / "cp")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def admin(cp: ControlPlaneProcess) -> str:
    return cp.admin_token("root")


@pytest.fixture
def channel(cp: ControlPlaneProcess) -> Iterator[grpc.Channel]:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    with grpc.secure_channel(cp.operator_address, creds) as ch:
        yield ch


def tokens(channel: grpc.Channel) -> tokens_pb2_grpc.TokenServiceStub:
    return tokens_pb2_grpc.TokenServiceStub(channel)


def create(channel: grpc.Channel, caller: str, name: str, groups: list[str],
           role: tokens_pb2.TokenRole = OPERATOR,
           ttl: dt.timedelta | None = None) -> tokens_pb2.CreateTokenResponse:
    request = tokens_pb2.CreateTokenRequest(token=tokens_pb2.Token(display_name=name, role=role, groups=groups))
    if ttl is not None:
        request.ttl.FromTimedelta(ttl)
    return tokens(channel).CreateToken(request, metadata=bearer(caller))


def refused(call: object) -> tuple[grpc.StatusCode, str]:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


def all_tokens(channel: grpc.Channel, caller: str, page_size: int = 0) -> list[tokens_pb2.Token]:
    found: list[tokens_pb2.Token] = []
    page_token = ""
    while True:
        page = tokens(channel).ListTokens(tokens_pb2.ListTokensRequest(page_size=page_size, page_token=page_token),
                                          metadata=bearer(caller))
        found.extend(page.tokens)
        page_token = page.next_page_token
        if not page_token:
            return found


# --- creating -----------------------------------------------------------------------------------------------------


def test_a_created_token_works_and_its_secret_is_shown_once(channel: grpc.Channel, admin: str) -> None:
    made = create(channel, admin, "ci-bot", ["ci"], ttl=dt.timedelta(days=30))
    assert made.secret.startswith(f"onp_{made.token.id}_")
    assert (made.token.name, made.token.display_name, made.token.role, list(made.token.groups), made.token.state) == (
        f"tokens/{made.token.id}", "ci-bot", OPERATOR, ["ci"], tokens_pb2.TOKEN_STATE_ACTIVE)
    lifetime = made.token.expires_at.ToDatetime() - made.token.created_at.ToDatetime()
    assert lifetime == dt.timedelta(days=30)
    assert re.fullmatch(r"'root' \(onp_[0-9a-f]{16}\)", made.token.created_by)
    groups = agents_pb2_grpc.AgentServiceStub(channel).ListGroups(agents_pb2.ListGroupsRequest(),
                                                                  metadata=bearer(made.secret))
    assert isinstance(groups, agents_pb2.ListGroupsResponse)


def test_a_token_made_without_a_lifetime_gets_the_default_of_90_days(channel: grpc.Channel, admin: str) -> None:
    made = create(channel, admin, "default-ttl", ["ci"])
    assert made.token.expires_at.ToDatetime() - made.token.created_at.ToDatetime() == dt.timedelta(days=90)


@pytest.mark.parametrize(("spec", "ttl", "field", "message"), [
    (dict(display_name="", role=OPERATOR, groups=["ci"]), None, "token.display_name",
     "'token.display_name' is required: a name for people, e.g. \"ci-bot\" (at most 200 characters)"),
    (dict(display_name="x", groups=["ci"]), None, "token.role",
     "'token.role' is required: TOKEN_ROLE_OPERATOR or TOKEN_ROLE_ADMIN"),
    (dict(display_name="x", role=OPERATOR), None, "token.groups",
     "'token.groups' is required: the groups the token may use, or \"*\" for every group"),
    (dict(display_name="x", role=OPERATOR, groups=["no spaces"]), None, "token.groups",
     "'token.groups': invalid group name 'no spaces': use 1 to 63 letters, digits, '-' or '_'"),
    (dict(display_name="x", role=OPERATOR, groups=["ci"]), dt.timedelta(0), "ttl",
     "'ttl' must be more than 0 and at most 366 days"),
    (dict(display_name="x", role=OPERATOR, groups=["ci"]), dt.timedelta(days=367), "ttl",
     "'ttl' must be at most 366 days, 0:00:00"),
], ids=["no-name", "no-role", "no-groups", "bad-group", "zero-ttl", "ttl-too-long"])
def test_a_malformed_create_request_is_invalid_argument_naming_its_field(
    channel: grpc.Channel, admin: str, spec: dict[str, object], ttl: dt.timedelta | None, field: str, message: str
) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    request = tokens_pb2.CreateTokenRequest(token=tokens_pb2.Token(**spec))  # type: ignore[arg-type]
    if ttl is not None:
        request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl.total_seconds())))
    with pytest.raises(grpc.RpcError) as info:
        tokens(channel).CreateToken(request, metadata=bearer(admin))
    error = info.value
    assert isinstance(error, grpc.Call)
    assert (error.code(), error.details()) == (S.INVALID_ARGUMENT, message)
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR))
    assert [v.field for v in bad.field_violations] == [field]


# --- listing ------------------------------------------------------------------------------------------------------


def test_the_token_list_shows_who_when_and_never_a_secret_or_its_hash(
    cp: ControlPlaneProcess, channel: grpc.Channel, admin: str
) -> None:
    made = create(channel, admin, "listed", ["ci"])
    secret_part = made.secret.split("_", 2)[2]
    digest = hashlib.sha256(secret_part.encode()).hexdigest()
    listed = {t.id: t for t in all_tokens(channel, admin)}
    assert listed[made.token.id] == made.token
    local = subprocess.run([CONTROL_PLANE, "list-tokens", "--state-dir", str(cp.state_dir), "--json"],
                           capture_output=True, text=True, check=True).stdout
    remote = subprocess.run([ONPREM, "tokens", "--json"], capture_output=True, text=True, check=True,
                            env=cli_env(cp, admin)).stdout
    table = subprocess.run([ONPREM, "tokens"], capture_output=True, text=True, check=True, env=cli_env(cp, admin)).stdout
    for shown in (local, remote, table, str(listed)):
        assert secret_part not in shown and digest not in shown
        assert f"onp_{made.token.id}" in shown or made.token.id in shown
    assert [t["id"] for t in json.loads(local)["tokens"]] == [t["id"] for t in json.loads(remote)["tokens"]]
    assert table.splitlines()[0].split() == ["NAME", "ID", "ROLE", "GROUPS", "STATE", "CREATED", "EXPIRES", "LAST",
                                             "USED"]


def test_a_token_shows_when_it_was_last_used(cp: ControlPlaneProcess, channel: grpc.Channel, admin: str) -> None:
    made = create(channel, admin, "used", ["ci"])
    agents_pb2_grpc.AgentServiceStub(channel).ListGroups(agents_pb2.ListGroupsRequest(), metadata=bearer(made.secret))
    cp.stop()  # last-used times are written in batches; a stop writes what is pending
    cp.start()
    (listed,) = [t for t in all_tokens(channel, admin) if t.id == made.token.id]
    assert listed.last_used_at.ToDatetime() >= listed.created_at.ToDatetime()


def test_listing_pages_through_every_token_exactly_once(channel: grpc.Channel, admin: str) -> None:
    made = {create(channel, admin, f"page-{i}", ["ci"]).token.id for i in range(5)}
    paged = [t.id for t in all_tokens(channel, admin, page_size=2)]
    assert len(paged) == len(set(paged))
    assert made <= set(paged)
    assert paged == [t.id for t in all_tokens(channel, admin)]


def test_a_page_token_the_api_did_not_issue_is_invalid_argument(channel: grpc.Channel, admin: str) -> None:
    code, message = refused(lambda: tokens(channel).ListTokens(
        tokens_pb2.ListTokensRequest(page_token="not-a-page-token"), metadata=bearer(admin)))
    assert (code, message) == (S.INVALID_ARGUMENT, "'page_token' is not one this API returned; pass the previous "
                               "response's 'next_page_token', or nothing for the first page")


# --- who may manage tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", ["CreateToken", "ListTokens", "RevokeToken", "ListEnrollmentTokens",
                                 "RevokeEnrollmentToken"])
def test_an_operator_token_may_not_manage_tokens(channel: grpc.Channel, admin: str, rpc: str) -> None:
    operator = create(channel, admin, "just-ops", ["*"])
    request = tokens_pb2.DESCRIPTOR.services_by_name["TokenService"].methods_by_name[rpc].input_type
    from google.protobuf import message_factory

    empty = message_factory.GetMessageClass(request)()
    code, message = refused(lambda: getattr(tokens(channel), rpc)(empty, metadata=bearer(operator.secret)))
    assert (code, message) == (S.PERMISSION_DENIED, f"token 'just-ops' (onp_{operator.token.id}) is not an admin "
                               "token; ask an admin to do this")


def test_an_admin_of_one_group_cannot_grant_another_group_or_every_group(channel: grpc.Channel, admin: str) -> None:
    site_admin = create(channel, admin, "plant-admin", ["plant"], role=ADMIN).secret
    for groups in (["office"], ["plant", "office"], ["*"]):
        code, message = refused(lambda groups=groups: create(channel, site_admin, "wider", groups))
        assert (code, message) == (S.PERMISSION_DENIED,
                                   f"token 'plant-admin' (onp_{site_admin.split('_')[1]}) may not grant groups it "
                                   "cannot use itself (plant)")
    assert list(create(channel, site_admin, "plant-ops", ["plant"]).token.groups) == ["plant"]


def test_an_admin_of_one_group_sees_and_revokes_only_that_groups_tokens(channel: grpc.Channel, admin: str) -> None:
    site_admin = create(channel, admin, "lab-admin", ["lab"], role=ADMIN).secret
    other = create(channel, admin, "office-ops", ["office"]).token
    mine = create(channel, admin, "lab-ops", ["lab"]).token
    seen = {t.id for t in all_tokens(channel, site_admin)}
    assert mine.id in seen and other.id not in seen
    code, message = refused(lambda: tokens(channel).RevokeToken(
        tokens_pb2.RevokeTokenRequest(name=other.name), metadata=bearer(site_admin)))
    assert (code, message) == (S.NOT_FOUND, f"no operator token has the id '{other.id}'; ListTokens shows the tokens "
                               "you may manage")


# --- revoking -----------------------------------------------------------------------------------------------------


def test_revoking_says_by_whom_and_why_and_a_second_revocation_keeps_the_first(channel: grpc.Channel,
                                                                               admin: str) -> None:
    made = create(channel, admin, "to-revoke", ["ci"])
    first = tokens(channel).RevokeToken(tokens_pb2.RevokeTokenRequest(name=made.token.name, reason="rotated"),
                                        metadata=bearer(admin)).token
    assert first.state == tokens_pb2.TOKEN_STATE_REVOKED
    assert (first.revoke_reason, re.fullmatch(r"'root' \(onp_[0-9a-f]{16}\)", first.revoked_by) is not None) == (
        "rotated", True)
    again = tokens(channel).RevokeToken(tokens_pb2.RevokeTokenRequest(name=f"onp_{made.token.id}", reason="twice"),
                                        metadata=bearer(admin)).token
    assert (again.revoked_at, again.revoke_reason) == (first.revoked_at, "rotated")


@pytest.mark.parametrize(("name", "code", "message"), [
    ("tokens/0000000000000000", S.NOT_FOUND,
     "no operator token has the id '0000000000000000'; ListTokens shows the tokens you may manage"),
    ("tokens/ci-bot", S.INVALID_ARGUMENT,
     "'name' must name an operator token: \"tokens/<id>\", where ListTokens shows the ids (16 hex digits)"),
    ("", S.INVALID_ARGUMENT,
     "'name' must name an operator token: \"tokens/<id>\", where ListTokens shows the ids (16 hex digits)"),
])
def test_revoking_something_that_is_not_a_token_says_what_to_pass(
    channel: grpc.Channel, admin: str, name: str, code: grpc.StatusCode, message: str
) -> None:
    assert refused(lambda: tokens(channel).RevokeToken(tokens_pb2.RevokeTokenRequest(name=name),
                                                       metadata=bearer(admin))) == (code, message)


def test_an_admin_token_can_revoke_itself_and_is_refused_from_then_on(channel: grpc.Channel, admin: str) -> None:
    made = create(channel, admin, "self-revoker", ["*"], role=ADMIN)
    response = tokens(channel).RevokeToken(tokens_pb2.RevokeTokenRequest(name=made.token.name),
                                           metadata=bearer(made.secret))
    # The revoking call itself is answered: it is the one call of the token not ended by its revocation.
    assert (response.token.id, response.token.state) == (made.token.id, tokens_pb2.TOKEN_STATE_REVOKED)
    code, message = refused(lambda: all_tokens(channel, made.secret))
    assert code == S.UNAUTHENTICATED
    assert message.startswith(f"token 'self-revoker' (onp_{made.token.id}) was revoked at ")


# --- the local CLI -------------------------------------------------------------------------------------------------


def local(cp: ControlPlaneProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CONTROL_PLANE, args[0], "--state-dir", str(cp.state_dir), *args[1:]],
                          capture_output=True, text=True)


def test_create_admin_token_makes_an_expiring_token_unless_told_and_then_says_so(cp: ControlPlaneProcess) -> None:
    expiring = local(cp, "create-admin-token", "--name", "expiring")
    assert expiring.returncode == 0
    assert re.fullmatch(r"created admin token 'expiring' \(onp_[0-9a-f]{16}\) for groups \*, expires "
                        r"\d{4}-\d\d-\d\dT[\d:.]+Z\n", expiring.stderr)
    forever = local(cp, "create-admin-token", "--name", "bootstrap", "--no-expiry")
    assert forever.returncode == 0
    token_id = forever.stdout.split("_")[1]
    assert forever.stderr.splitlines() == [
        f"created admin token 'bootstrap' (onp_{token_id}) for groups *, expires never",
        f"this admin token NEVER EXPIRES: use it to make expiring tokens, then revoke it with "
        f"`onprem-control-plane revoke-token onp_{token_id}`",
    ]


def test_the_default_lifetime_is_an_admin_setting(cp: ControlPlaneProcess, channel: grpc.Channel, admin: str) -> None:
    assert json.loads(local(cp, "token-settings", "--default-ttl", "7d").stdout) == {"default_ttl_seconds": 604800}
    try:
        made = create(channel, admin, "week", ["ci"])
        assert made.token.expires_at.ToDatetime() - made.token.created_at.ToDatetime() == dt.timedelta(days=7)
    finally:
        local(cp, "token-settings", "--default-ttl", "90d")


def test_a_token_written_to_a_file_is_private_and_never_overwrites_one(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    target = tmp_path / "ci.token"
    made = local(cp, "create-token", "--name", "to-file", "--groups", "ci", "--output", str(target))
    assert (made.returncode, made.stdout) == (0, "")
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.read_text().startswith("onp_")
    again = local(cp, "create-token", "--name", "to-file", "--groups", "ci", "--output", str(target))
    assert (again.returncode, again.stderr) == (
        2, f"onprem-control-plane: {target} exists already; remove it or choose another --output\n")


def test_revoking_an_unknown_token_with_the_local_cli_says_where_the_ids_are(cp: ControlPlaneProcess) -> None:
    result = local(cp, "revoke-token", "onp_0000000000000000")
    assert (result.returncode, result.stderr) == (
        2, "onprem-control-plane: no operator token has the id '0000000000000000'; `list-tokens` shows the ids\n")


# --- the onprem CLI --------------------------------------------------------------------------------------------------


def cli_env(cp: ControlPlaneProcess, token: str) -> dict[str, str]:
    return {**os.environ, "ONPREM_ADDRESS": cp.operator_address, "ONPREM_CACERT": str(cp.ca_file),
            "ONPREM_TOKEN": token}


def test_the_onprem_cli_creates_lists_and_revokes_a_token(cp: ControlPlaneProcess, admin: str) -> None:
    env = cli_env(cp, admin)
    made = subprocess.run([ONPREM, "create-token", "deploy-bot", "--groups", "ci,web", "--ttl", "12h"],
                          capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    token_id = secret.split("_")[1]
    assert re.fullmatch(f"created operator token 'deploy-bot' \\(onp_{token_id}\\) for groups ci,web, expires "
                        f"{TIME}; it is shown only now\n", made.stderr)
    table = subprocess.run([ONPREM, "tokens"], capture_output=True, text=True, env=env).stdout
    (line,) = [row for row in table.splitlines() if f"onp_{token_id}" in row]
    assert line.split()[:5] == ["deploy-bot", f"onp_{token_id}", "operator", "ci,web", "ACTIVE"]
    revoked = subprocess.run([ONPREM, "revoke-token", f"onp_{token_id}", "--reason", "done"],
                             capture_output=True, text=True, env=env)
    assert re.fullmatch(f"revoked token 'deploy-bot' \\(onp_{token_id}\\) at {TIME}\n", revoked.stdout)
    refused_call = subprocess.run([ONPREM, "groups"], capture_output=True, text=True, env=cli_env(cp, secret))
    assert refused_call.returncode == 5
    assert refused_call.stderr.startswith(f"onprem: UNAUTHENTICATED: token 'deploy-bot' (onp_{token_id}) was revoked ")


# --- enrollment tokens -----------------------------------------------------------------------------------------------


def enroll(cp: ControlPlaneProcess, token: str) -> enrollment_pb2.EnrollResponse:
    _key, csr = make_key_and_csr("an-agent")
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{cp.enroll_port}", creds) as ch:
        response: enrollment_pb2.EnrollResponse = enrollment_pb2_grpc.EnrollmentStub(ch).Enroll(
            enrollment_pb2.EnrollRequest(token=token, csr_pem=csr.decode(), name="an-agent"))
        return response


def new_enrollment_token(channel: grpc.Channel, admin: str, group: str) -> str:
    response = agents_pb2_grpc.AgentServiceStub(channel).CreateEnrollmentToken(
        agents_pb2.CreateEnrollmentTokenRequest(group=group, description="for a test"), metadata=bearer(admin))
    token: str = response.token
    return token


def test_a_revoked_enrollment_token_cannot_enroll_and_says_why(cp: ControlPlaneProcess, channel: grpc.Channel,
                                                                admin: str) -> None:
    token = new_enrollment_token(channel, admin, "enroll-revoked")
    listed = tokens(channel).ListEnrollmentTokens(tokens_pb2.ListEnrollmentTokensRequest(group="enroll-revoked"),
                                                  metadata=bearer(admin)).enrollment_tokens
    assert [(t.id, t.state, t.description) for t in listed] == [
        (token.split("_")[1], tokens_pb2.ENROLLMENT_TOKEN_STATE_ACTIVE, "for a test")]
    revoked = tokens(channel).RevokeEnrollmentToken(
        tokens_pb2.RevokeEnrollmentTokenRequest(name=listed[0].name, reason="typo in the group"),
        metadata=bearer(admin)).enrollment_token
    assert revoked.state == tokens_pb2.ENROLLMENT_TOKEN_STATE_REVOKED
    code, message = refused(lambda: enroll(cp, token))
    assert code == S.PERMISSION_DENIED
    assert re.fullmatch(r"the enrollment token was revoked at \d{4}-[\d\-T:.]+Z by 'root' \(onp_[0-9a-f]{16}\); ask "
                        "an administrator for a new one", message)


def test_a_used_enrollment_token_cannot_be_revoked_and_points_at_the_agent(cp: ControlPlaneProcess,
                                                                           channel: grpc.Channel, admin: str) -> None:
    token = new_enrollment_token(channel, admin, "enroll-used")
    agent_id = enroll(cp, token).agent_id
    code, message = refused(lambda: tokens(channel).RevokeEnrollmentToken(
        tokens_pb2.RevokeEnrollmentTokenRequest(name=f"onpe_{token.split('_')[1]}"), metadata=bearer(admin)))
    assert code == S.FAILED_PRECONDITION
    assert re.fullmatch(f"enrollment token onpe_{token.split('_')[1]} was already used by agent {agent_id} at "
                        r"[\d\-T:.]+Z, so there is nothing to revoke; revoke the agent instead "
                        r"\(AgentService/RevokeAgent\)", message)


async def test_concurrent_enrollments_with_one_token_have_exactly_one_winner(cp: ControlPlaneProcess,
                                                                            admin: str) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_file.read_bytes())
    async with grpc.aio.secure_channel(cp.operator_address, creds) as operator:
        response = await agents_stub(operator).CreateEnrollmentToken(
            agents_pb2.CreateEnrollmentTokenRequest(group="race"), metadata=bearer(admin))
    csrs = [make_key_and_csr(f"racer-{i}")[1].decode() for i in range(6)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{cp.enroll_port}", creds) as ch:
        stub: enrollment_pb2_grpc.EnrollmentAsyncStub = enrollment_pb2_grpc.EnrollmentStub(ch)
        results = await asyncio.gather(*(stub.Enroll(enrollment_pb2.EnrollRequest(
            token=response.token, csr_pem=csr, name=f"racer-{i}")) for i, csr in enumerate(csrs)),
            return_exceptions=True)
    winners = [r for r in results if isinstance(r, enrollment_pb2.EnrollResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 5
    assert {(e.code(), bool(re.fullmatch(f"the enrollment token was already used by agent {winners[0].agent_id} at "
                                         r".+; enrollment tokens are single use, ask an administrator for a new one",
                                         e.details() or ""))) for e in losers} == {(S.PERMISSION_DENIED, True)}
