"""Handshake parsing and token extraction (trio_gw/_auth.py)."""

from __future__ import annotations

import pytest

from trio_gw import Handshake, Identity, bearer_token_authorizer, extract_token


def handshake(target: str = "/", **headers: str) -> Handshake:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Handshake.from_request(target, raw, ("127.0.0.1", 5000))


@pytest.mark.parametrize("header", ["Bearer abc", "Bearer:abc", "Bearer :abc", "bearer  abc "])
def test_bearer_header_forms(header: str) -> None:
    assert extract_token(handshake(authorization=header)) == "abc"


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearerabc", "Bearer a b"])
def test_malformed_header_gives_no_token(header: str) -> None:
    # a malformed header does not fall through to the query string
    assert extract_token(handshake("/?token=q", authorization=header)) is None


def test_cookie_and_query_token() -> None:
    assert extract_token(handshake(cookie="a=1; Authorization=Bearer cookietok")) == "cookietok"
    assert extract_token(handshake(cookie="Authorization=rawtok")) == "rawtok"
    assert extract_token(handshake("/ws?x=1&token=qtok")) == "qtok"
    assert extract_token(handshake("/ws?token=")) is None
    assert extract_token(handshake("/ws")) is None


def test_handshake_fields() -> None:
    h = handshake("/chat?room=1&room=2", origin="https://a.example", cookie="k=v")
    assert h.path == "/chat"
    assert h.query["room"] == ("1", "2")
    assert h.headers["origin"] == "https://a.example"
    assert h.cookies == {"k": "v"}
    assert h.remote == ("127.0.0.1", 5000)


def test_identity_defaults_and_validation() -> None:
    assert Identity("u1").username == "u1"
    with pytest.raises(ValueError, match="user_id"):
        Identity("")


async def test_bearer_authorizer_accepts_sync_and_async_checkers() -> None:
    def sync_check(token: str) -> Identity | None:
        return Identity("u-sync") if token == "good" else None

    async def async_check(token: str) -> Identity | None:
        return Identity("u-async") if token == "good" else None

    for check, user in ((sync_check, "u-sync"), (async_check, "u-async")):
        authorize = bearer_token_authorizer(check)
        identity = await authorize(handshake(authorization="Bearer good"))
        assert identity is not None and identity.user_id == user
        assert await authorize(handshake(authorization="Bearer bad")) is None
        assert await authorize(handshake()) is None
