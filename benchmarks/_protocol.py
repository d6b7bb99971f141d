"""The tiny benchmark protocol every server under test speaks.

* A client connects to ``ws://HOST:PORT/?token=<user id>`` and first receives a
  hello event (any JSON with ``"topic": "hello"``).
* The harness drives a server through its stdin, one JSON command per line, and
  the server answers each on stdout with one JSON line:

  - ``{"op": "fanout", "count": N, "size": S, "rate": R}``: send N messages to every
    connection, R messages a second (as fast as possible without R);
  - ``{"op": "to_users", "calls": C, "per_call": K, "users": U, "seed": X}``: C calls,
    each to every connection of K users drawn by ``user_draws``;
  - ``{"op": "quit"}``.

  Every message carries ``"seq"`` (per command, from 0) and ``"t"``
  (``time.monotonic()`` when the server was asked to send it; the clock is
  shared by every process on Linux), padded to S bytes.
* A client may send ``{"type":"request","payload":{"service","method","params","trace_id"}}``;
  the server answers ``{"type":"response","payload":{"trace_id","result":params,"error":null}}``.
* A request whose method is ``"fanout"`` (params ``{"call": K, "users": [...], "size": S}``)
  first has the server send ``message(K, S)`` to every connection of every listed
  user (``fanout_call`` decodes it), then it is answered like any request.
"""

from __future__ import annotations

import itertools
import random
import resource
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson

BENCH_USER_PREFIX = "u"


def message(seq: int, size: int) -> bytes:
    """One benchmark message of about ``size`` bytes, JSON text."""
    head = orjson.dumps({"seq": seq, "t": time.monotonic(), "pad": ""})
    pad = max(0, size - len(head))
    return head[:-2] + b"x" * pad + b'"}'


def iter_user_draws(per_call: int, users: int, seed: int) -> Iterator[list[str]]:
    """Endless lists of ``per_call`` distinct users, the same sequence for a seed."""
    rng = random.Random(seed)
    names = [f"{BENCH_USER_PREFIX}{i}" for i in range(users)]
    while True:
        yield rng.sample(names, per_call)


def user_draws(calls: int, per_call: int, users: int, seed: int) -> list[list[str]]:
    """The user lists of a to_users run, identical in every process."""
    return list(itertools.islice(iter_user_draws(per_call, users, seed), calls))


def expected_per_user(draws: list[list[str]]) -> Counter[str]:
    """How many messages each user receives in a to_users run."""
    return Counter(user for draw in draws for user in draw)


def rpc_response(request: Any) -> dict[str, Any]:
    """The answer every server gives a request."""
    payload = request["payload"]
    return {
        "type": "response",
        "payload": {"trace_id": payload["trace_id"], "result": payload["params"], "error": None},
    }


def fanout_call(request: Any) -> tuple[list[str], str] | None:
    """A ``"fanout"`` request's recipients and the text pushed to them; None for others."""
    payload = request["payload"]
    if payload["method"] != "fanout":
        return None
    params = payload["params"]
    return params["users"], message(params["call"], params["size"]).decode()


def raise_fd_limit() -> None:
    """Allow as many sockets as the hard limit permits (10k connections need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
