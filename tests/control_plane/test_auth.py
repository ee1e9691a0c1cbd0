"""Reading bearer tokens from gRPC metadata, and what a principal may use."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from onprem.control_plane.auth import Principal, parse_bearer
from onprem.control_plane.store import ApiTokenRow, Role

TOKEN = "onp_0123456789abcdef_" + "s" * 43


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", f"Bearer {TOKEN}")],
        [("authorization", f"bearer {TOKEN}")],
        [("authorization", f"BEARER {TOKEN}")],
        [("Authorization", f"Bearer {TOKEN}")],
        [("authorization", f"  Bearer   {TOKEN}  ")],
        [("authorization", f"Bearer {TOKEN}".encode())],
        [("user-agent", "grpcurl/1.8.6"), ("authorization", f"Bearer {TOKEN}"), ("x-trace", "1")],
        ((("authorization", f"Bearer {TOKEN}"),)),
    ],
    ids=[
        "canonical",
        "lower-scheme",
        "upper-scheme",
        "capitalised-key",
        "extra-spaces",
        "bytes",
        "among-others",
        "tuple",
    ],
)
def test_parse_bearer_finds_the_token(metadata: list[tuple[str, str | bytes]]) -> None:
    assert parse_bearer(metadata) == TOKEN


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        [],
        [("user-agent", "grpcurl")],
        [("authorization", "")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer   ")],
        [("authorization", TOKEN)],
        [("authorization", f"Basic {TOKEN}")],
        [("authorization", f"Bearer {TOKEN} extra")],
        [("authorization", f"Bearer{TOKEN}")],
        [("authorization", b"Bearer \xff\xfe")],
        [("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer onp_other")],
        [("x-authorization", f"Bearer {TOKEN}")],
    ],
    ids=[
        "none",
        "empty",
        "no-authorization",
        "empty-value",
        "scheme-only",
        "scheme-and-spaces",
        "no-scheme",
        "basic",
        "trailing-word",
        "no-space",
        "non-ascii-bytes",
        "two-entries",
        "other-key",
    ],
)
def test_parse_bearer_gives_none_without_a_usable_token(
    metadata: list[tuple[str, str | bytes]] | None,
) -> None:
    assert parse_bearer(metadata) is None


def principal(role: Role, *groups: str) -> Principal:
    return Principal(token_id="0123456789abcdef", name="ci", role=role, groups=frozenset(groups))


def test_a_principal_may_use_only_its_groups() -> None:
    p = principal("operator", "plant", "office")
    assert p.may_use_group("plant")
    assert p.may_use_group("office")
    assert not p.may_use_group("lab")
    assert not p.may_use_group("Plant")
    assert not p.may_use_group("*")
    assert not p.is_admin


def test_the_star_grants_every_group() -> None:
    p = principal("operator", "*")
    assert p.may_use_group("plant")
    assert p.may_use_group("anything-else")


def test_admin_role_does_not_widen_the_groups() -> None:
    p = principal("admin", "plant")
    assert p.is_admin
    assert p.may_use_group("plant")
    assert not p.may_use_group("office")
    assert not principal("admin").may_use_group("plant")


def test_principal_is_made_from_an_authenticated_token_row() -> None:
    row = ApiTokenRow(
        token_id="0123456789abcdef",
        name="deploy",
        role="admin",
        groups=("plant", "*"),
        created_at=datetime(2030, 1, 1, tzinfo=UTC),
        revoked_at=None,
    )
    p = Principal.from_api_token(row)
    assert p == Principal(
        token_id="0123456789abcdef", name="deploy", role="admin", groups=frozenset({"plant", "*"})
    )
    assert p.is_admin
    assert p.may_use_group("office")
