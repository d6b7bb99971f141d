"""Origin checks (trio_gw/_origins.py): exact origins and explicit wildcards, never suffixes."""

from __future__ import annotations

import pytest

from trio_gw._origins import OriginPolicy

POLICY = OriginPolicy(["https://app.example.com", "https://*.example.org", "http://localhost:3000"])


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://APP.example.com:443", True),
        ("http://app.example.com", False),  # scheme differs
        ("https://evilapp.example.com", False),  # nuropb_gw's suffix match would allow this
        ("https://app.example.com.evil.net", False),
        ("https://a.example.org", True),
        ("https://a.b.example.org", True),
        ("https://example.org", False),  # the wildcard needs a label
        ("https://badexample.org", False),
        ("http://localhost:3000", True),
        ("http://localhost", False),
        ("null", False),
        (None, True),  # no Origin header: not a browser
    ],
)
def test_origin_decisions(origin: str | None, allowed: bool) -> None:
    assert POLICY.allows(origin) is allowed


def test_empty_policy_allows_everything() -> None:
    assert OriginPolicy().allows_any
    assert OriginPolicy().allows("https://anything.example")


@pytest.mark.parametrize(
    "bad",
    ["app.example.com", "https://*bad.com", "https://a.*.com", "https://x.com/path", "ftp://x"],
)
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"origin|wildcard"):
        OriginPolicy([bad])
