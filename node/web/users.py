"""Local users of the web console: a name, a role (viewer or admin) and an argon2id hash.

Passwords are hashed with argon2-cffi's defaults (argon2id, RFC 9106 low-memory profile) and never
stored or logged in clear; a hash made with older parameters is upgraded at the next good login. A
failed login takes as long for an unknown name as for a wrong password (a dummy hash is verified), so
the answer time does not tell which names exist.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from node.store import Store, utcnow, web_users
from node.web.errors import WebError

Role = Literal["viewer", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "admin")
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD = 10

_hasher = PasswordHasher()
_DUMMY = _hasher.hash("not a password anyone has")


@dataclass(frozen=True)
class User:
    name: str
    role: Role

    @property
    def can_act(self) -> bool:
        return self.role == "admin"


def check_new(name: str, role: str, password: str) -> None:
    if not NAME.match(name):
        raise WebError(f"user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise WebError(f"role {role!r}: one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise WebError(f"password: at least {MIN_PASSWORD} characters")


def add(store: Store, name: str, role: str, password: str, now: dt.datetime | None = None) -> User:
    """Create a user; WebError if the name is taken or anything is malformed."""
    check_new(name, role, password)
    now = now or utcnow()
    try:
        with store.engine.begin() as conn:
            conn.execute(insert(web_users).values(name=name, role=role, password_hash=_hasher.hash(password),
                                                  created_at=now, password_changed_at=now))
    except IntegrityError as exc:
        raise WebError(f"user {name!r} exists already") from exc
    return User(name, role)  # type: ignore[arg-type]


def set_password(store: Store, name: str, password: str) -> None:
    check_new(name, "viewer", password)
    with store.engine.begin() as conn:
        done = conn.execute(update(web_users).where(web_users.c.name == name).values(
            password_hash=_hasher.hash(password), password_changed_at=utcnow())).rowcount
    if not done:
        raise WebError(f"no user {name!r}")


def remove(store: Store, name: str) -> None:
    with store.engine.begin() as conn:
        if not conn.execute(delete(web_users).where(web_users.c.name == name)).rowcount:
            raise WebError(f"no user {name!r}")


def get(store: Store, name: str) -> User | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(web_users.c.name, web_users.c.role).where(web_users.c.name == name)).first()
    return None if row is None else User(row.name, row.role)


def password_changed_at(store: Store, name: str) -> dt.datetime | None:
    with store.engine.connect() as conn:
        value = conn.execute(select(web_users.c.password_changed_at).where(web_users.c.name == name)).scalar()
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def listing(store: Store) -> list[dict]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(web_users.c.name, web_users.c.role, web_users.c.created_at,
                                   web_users.c.password_changed_at).order_by(web_users.c.name)).all()
    return [dict(r._mapping) for r in rows]


def verify(store: Store, name: str, password: str) -> User | None:
    """The user if the password is right, else None (same work either way)."""
    with store.engine.connect() as conn:
        row = conn.execute(select(web_users).where(web_users.c.name == name)).first()
    stored = row.password_hash if row is not None else _DUMMY
    try:
        _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    if _hasher.check_needs_rehash(stored):
        with store.engine.begin() as conn:
            conn.execute(update(web_users).where(web_users.c.name == name).values(
                password_hash=_hasher.hash(password)))
    return User(row.name, row.role)
