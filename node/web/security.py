"""What keeps the console's pages to the people allowed to see them, and its actions to admins.

- **Sessions**: a signed cookie (Starlette's SessionMiddleware, itsdangerous) holding the user's name,
  the time of login and the session's CSRF token; HttpOnly, SameSite=Strict, Secure whenever the
  console is served over TLS; it expires after ``web.session_hours``. The signing key lives in the
  store (``settings``), so every console process of a site accepts the same cookie. A session dies
  when its user is removed or changes password.
- **CSRF**: every state-changing request must carry the session's token (a hidden form field, or the
  ``X-CSRF-Token`` header for the JSON API) and, when the browser sends one, an ``Origin`` of this
  console; otherwise 403.
- **Login throttling**: after ``web.login_attempts`` failures within 15 minutes from one address, or
  for one user name, further tries get 429 with ``Retry-After`` until the window passes.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque

from node.store import Store

SECRET_KEY = "web-session-secret"  # noqa: S105 - the settings row's name, not a secret
WINDOW_SECONDS = 15 * 60


def session_secret(store: Store) -> str:
    """The store's session-signing key, made on first use (every console of the site shares it)."""
    return store.setting_once(SECRET_KEY, secrets.token_urlsafe(48))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class LoginThrottle:
    """Failed logins per key (client address, user name) in a sliding window; thread-safe, per process."""

    def __init__(self, attempts: int, window: float = WINDOW_SECONDS, clock=time.monotonic):
        self.attempts, self.window, self.clock = attempts, window, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def retry_after(self, *keys: str) -> int:
        """Seconds until another try is allowed (0: allowed now)."""
        now = self.clock()
        with self._lock:
            waits = [self.window - (now - q[0]) for q in (self._recent(k, now) for k in keys)
                     if len(q) >= self.attempts]
        return int(max(waits) + 1) if waits else 0

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
