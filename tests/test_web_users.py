"""The console's users: argon2id hashes in the store, never the password; roles; the CLI that manages them."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select, update

from node.cli import main
from node.store import Store, web_users
from node.web import users
from node.web.errors import WebError
from node.web.security import LoginThrottle


def test_a_user_is_stored_as_an_argon2id_hash_and_verified_by_it(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    users.add(store, "alice", "admin", "correct-horse-battery")
    with store.engine.connect() as conn:
        stored = conn.execute(select(web_users.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and "correct-horse-battery" not in stored
    assert users.verify(store, "alice", "correct-horse-battery") == users.User("alice", "admin")
    assert users.verify(store, "alice", "correct-horse-batterY") is None
    assert users.verify(store, "mallory", "correct-horse-battery") is None


def test_a_hash_made_with_weaker_parameters_is_upgraded_at_the_next_good_login(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    users.add(store, "bob", "viewer", "viewer-password-1")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("viewer-password-1")
    with store.engine.begin() as conn:
        conn.execute(update(web_users).values(password_hash=weak))
    assert users.verify(store, "bob", "viewer-password-1") is not None
    with store.engine.connect() as conn:
        assert conn.execute(select(web_users.c.password_hash)).scalar_one() != weak


@pytest.mark.parametrize(("name", "role", "password", "why"), [
    ("a b", "viewer", "long-enough-1", "user name"), ("carol", "root", "long-enough-1", "role"),
    ("carol", "viewer", "short", "at least 10"),
])
def test_malformed_users_are_refused_with_the_reason(tmp_path, name, role, password, why):
    with pytest.raises(WebError, match=why):
        users.add(Store(f"sqlite:///{tmp_path / 'db.sqlite'}"), name, role, password)


def test_the_cli_adds_lists_and_removes_users_and_refuses_a_second_alice(tmp_path, monkeypatch, capsys):
    import io

    conf = ["--set", f"storage.root={tmp_path / 'var'}"]
    monkeypatch.setattr("sys.stdin", io.StringIO("correct-horse-battery\n"))
    assert main([*conf, "web", "user", "add", "alice", "--role", "admin", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("correct-horse-battery\n"))
    assert main([*conf, "web", "user", "add", "alice", "--password-stdin"]) == 1
    assert main([*conf, "web", "user", "list"]) == 0
    assert main([*conf, "web", "user", "remove", "alice"]) == 0
    assert main([*conf, "web", "user", "remove", "alice"]) == 1
    printed = capsys.readouterr()
    assert "exists already" in printed.err and "no user 'alice'" in printed.err and "admin" in printed.out


def test_the_throttle_counts_failures_per_key_within_its_window():
    now = [0.0]
    throttle = LoginThrottle(attempts=2, window=60, clock=lambda: now[0])
    throttle.failed("ip:1", "user:a")
    assert throttle.retry_after("ip:1", "user:a") == 0
    throttle.failed("ip:1", "user:a")
    assert throttle.retry_after("ip:1") == 61 and throttle.retry_after("ip:2", "user:b") == 0
    now[0] = 30.0
    assert throttle.retry_after("user:a") == 31
    now[0] = 61.0
    assert throttle.retry_after("ip:1", "user:a") == 0
