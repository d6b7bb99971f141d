"""The pure registry core (trio_gw/_registry.py), without sockets or trio."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from trio_gw._registry import Registry, SessionAdded, SessionRemoved, UserJoined, UserLeft
from trio_gw._targets import ToAll, ToSession, ToUsers, is_local, new_session_id, node_of, to_users


def test_first_and_last_session_of_a_user_are_effects() -> None:
    registry: Registry[str] = Registry()
    assert registry.register("s1", "u", "item1") == (UserJoined("u"), SessionAdded("s1", "u"))
    assert registry.register("s2", "u", "item2") == (SessionAdded("s2", "u"),)
    assert registry.unregister("s1") == (SessionRemoved("s1", "u"),)
    assert registry.unregister("s2") == (SessionRemoved("s2", "u"), UserLeft("u"))
    assert registry.unregister("s2") == ()
    assert registry.session_count == registry.user_count == 0


def test_duplicate_registration_is_refused() -> None:
    registry: Registry[str] = Registry()
    registry.register("s1", "u", "a")
    with pytest.raises(KeyError, match="already registered"):
        registry.register("s1", "v", "b")
    assert registry.user_of("s1") == "u"


def test_resolve_each_target_kind() -> None:
    registry: Registry[str] = Registry()
    registry.register("s1", "u1", "a")
    registry.register("s2", "u1", "b")
    registry.register("s3", "u2", "c")
    assert registry.resolve(ToSession("s3")) == [("s3", "c")]
    assert registry.resolve(ToSession("nope")) == []
    assert sorted(registry.resolve(ToUsers(frozenset({"u1", "ghost"})))) == [
        ("s1", "a"),
        ("s2", "b"),
    ]
    assert sorted(registry.resolve(ToAll())) == [("s1", "a"), ("s2", "b"), ("s3", "c")]


def test_session_ids_name_their_node() -> None:
    session_id = new_session_id("node-7")
    assert node_of(session_id) == "node-7"
    assert is_local(ToSession(session_id), "node-7")
    assert not is_local(ToSession(session_id), "node-8")
    assert not is_local(ToAll(), "node-7")
    assert new_session_id("n") != new_session_id("n")


def test_to_users_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError, match="not a single string"):
        to_users("alice")
    with pytest.raises(TypeError, match="must be str"):
        to_users([1])  # type: ignore[list-item]
    assert to_users(["a", "a", "b"]) == ToUsers(frozenset({"a", "b"}))


class RegistryMachine(RuleBasedStateMachine):
    """Random register/unregister sequences against a model of sets."""

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.registry: Registry[str] = Registry()
        self.model: dict[str, str] = {}  # session -> user
        self.counter = 0

    @rule(target=sessions, user=st.sampled_from(["u1", "u2", "u3", "u4"]))
    def register(self, user: str) -> str:
        self.counter += 1
        session_id = f"s{self.counter}"
        effects = self.registry.register(session_id, user, f"item-{session_id}")
        first = user not in self.model.values()
        assert (UserJoined(user) in effects) == first
        self.model[session_id] = user
        return session_id

    @rule(session_id=sessions)
    def unregister(self, session_id: str) -> None:
        effects = self.registry.unregister(session_id)
        if session_id not in self.model:
            assert effects == ()
            return
        user = self.model.pop(session_id)
        assert SessionRemoved(session_id, user) in effects
        assert (UserLeft(user) in effects) == (user not in self.model.values())

    @rule(users=st.frozensets(st.sampled_from(["u1", "u2", "u3", "u4", "ghost"])))
    def resolve_users(self, users: frozenset[str]) -> None:
        got = {sid for sid, _ in self.registry.resolve(ToUsers(users))}
        assert got == {sid for sid, user in self.model.items() if user in users}

    @rule()
    def resolve_all(self) -> None:
        got = [sid for sid, _ in self.registry.resolve(ToAll())]
        assert sorted(got) == sorted(self.model)

    @invariant()
    def maps_agree(self) -> None:
        self.registry.check_invariants()
        assert self.registry.session_count == len(self.model)
        assert self.registry.user_count == len(set(self.model.values()))
        for user in ("u1", "u2", "u3", "u4"):
            assert self.registry.sessions_of(user) == {
                sid for sid, owner in self.model.items() if owner == user
            }


TestRegistryMachine = RegistryMachine.TestCase
