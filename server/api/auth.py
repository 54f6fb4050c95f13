"""API keys: who is calling (``Authorization: Bearer KEY``), and whether they may change state.

``TTA_API_KEYS`` and ``TTA_ADMIN_API_KEYS`` each hold ``NAME:KEY`` pairs, comma-separated, or ``@FILE`` with
one ``NAME KEY`` (or ``NAME:KEY``) a line. Only the SHA-256 digest of each key is kept; a presented key is
hashed and compared with every digest by ``hmac.compare_digest``, so neither the comparison nor a dict
lookup tells a guesser how close they came. The key's name, never the key, is what the server logs and the
tenant (owner) of everything it stores: keys with one name (an admin key and a classify key of one team, or
an old and a new key while rotating) share their label sets and calibrations.

Any key may classify and read. A request with a state-changing method (POST, PUT, PATCH, DELETE) needs an
admin key, except the routes in ``CLASSIFY_ROUTES``: ``authorize`` decides this for every route of the API
router in one place, so a new endpoint cannot forget it. With no keys configured the server stays open, as
one tenant ('').
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ConfigError, Forbidden, Unauthorized
from server.logs import key_name_var
from server.settings import Settings

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # safe to log and to use as a metric label's part
KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what a header carries unchanged
MIN_KEY_CHARS = 16
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The state-changing routes any key may call: classifying changes nothing a caller keeps.
# Resetting one's own session (DELETE /v1/sessions/{session_id}) is part of classifying: sessions are per key name.
CLASSIFY_ROUTES = frozenset({("POST", "/v1/classify"), ("DELETE", "/v1/sessions/{session_id}")})


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name (the tenant; '' without keys) and whether it may change state."""

    name: str
    admin: bool


OPEN = Caller("", admin=True)  # every request when no keys are configured
# Declares the scheme in the OpenAPI document (the docs page's "Authorize" button); the header is read below.
BEARER = HTTPBearer(auto_error=False, description="An API key of TTA_API_KEYS or TTA_ADMIN_API_KEYS, when set.")


def _pairs(spec: str, setting: str) -> list[tuple[str, str]]:
    """``NAME:KEY`` pairs from a setting's value, or from the file it names with ``@``."""
    if spec.startswith("@"):
        path = Path(spec[1:].strip())
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read the key file {path}: {exc.strerror}") from None
        entries = [(f"{path}:{n}", line.strip()) for n, line in enumerate(lines, 1)]
        entries = [(where, line) for where, line in entries if line and not line.startswith("#")]
    else:
        entries = [(f"entry {n}", part.strip()) for n, part in enumerate(spec.split(","), 1) if part.strip()]
    pairs = []
    for where, entry in entries:
        head = entry.split(None, 1)
        if ":" in head[0]:
            name, _, key = entry.partition(":")
        else:
            name, key = head[0], head[1] if len(head) > 1 else ""
        name, key = name.strip(), key.strip()
        # Never echo the entry: it holds a key.
        if not KEY_NAME.match(name):
            raise ConfigError(
                f"{setting} ({where}): a key's name is 1-64 letters, digits, '.', '_' or '-' (NAME:KEY or NAME KEY)"
            )
        if len(key) < MIN_KEY_CHARS or not KEY.match(key):
            raise ConfigError(
                f"{setting} ({where}, key {name!r}): a key is at least {MIN_KEY_CHARS} printable characters "
                "without spaces (openssl rand -hex 32 makes one)"
            )
        pairs.append((name, key))
    return pairs


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Keys:
    """The configured keys as SHA-256 digests, each with its caller."""

    def __init__(self, callers: list[tuple[bytes, Caller]]):
        self._callers = callers

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        """The keys of ``TTA_API_KEYS`` and ``TTA_ADMIN_API_KEYS``; ConfigError naming the setting for a bad one."""
        callers: list[tuple[bytes, Caller]] = []
        for setting, value, admin in (
            ("TTA_API_KEYS", settings.api_keys, False),
            ("TTA_ADMIN_API_KEYS", settings.admin_api_keys, True),
        ):
            if value is None:
                continue
            for name, key in _pairs(value.get_secret_value().strip(), setting):
                digest = _digest(key)
                if any(hmac.compare_digest(digest, d) for d, _ in callers):
                    raise ConfigError(f"{setting} (key {name!r}): the same key is configured twice")
                callers.append((digest, Caller(name, admin)))
        return cls(callers)

    @property
    def enabled(self) -> bool:
        return bool(self._callers)

    def identify(self, key: str) -> Caller | None:
        """The caller whose key this is, or None; compares with every digest, whichever matches."""
        digest = _digest(key)
        found = None
        for known, caller in self._callers:
            if hmac.compare_digest(digest, known):
                found = caller
        return found


def _keys(request: Request) -> Keys:
    keys = request.app.state.keys
    assert isinstance(keys, Keys)
    return keys


def _identify(request: Request) -> Caller:
    keys = _keys(request)
    if not keys.enabled:
        return OPEN
    header = request.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if not header:
        raise Unauthorized("this server needs an API key: send the header 'Authorization: Bearer KEY'")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer KEY'")
    caller = keys.identify(token.strip())
    if caller is None:
        raise Unauthorized("the API key is not valid")
    return caller


def _remember(request: Request, caller: Caller) -> None:
    """Put the key's name on the request's log records and its access log line."""
    if caller.name:
        request.state.key_name = caller.name
        key_name_var.set(caller.name)


async def authorize(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None
) -> Caller:
    """The caller of an API route; 401 without a valid key, 403 for a classify key on a state-changing route.

    Async on purpose: run on the event loop (not a worker thread), the key name it puts in the logging
    context stays there for the rest of the request.
    """
    caller = _identify(request)
    _remember(request, caller)
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    method = request.method
    if method in STATE_CHANGING and (method, path) not in CLASSIFY_ROUTES and not caller.admin:
        raise Forbidden(
            f"{method} {path} changes what the server keeps and needs an admin key (TTA_ADMIN_API_KEYS); "
            f"key {caller.name!r} may classify and read"
        )
    return caller


async def authorize_metrics(request: Request) -> None:
    """``/metrics`` asks for a key (any key) only when ``TTA_METRICS_REQUIRE_KEY`` is set."""
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    if settings.metrics_require_key:
        _remember(request, _identify(request))


def exposed_without_keys(settings: Settings) -> bool:
    """Whether the server binds an address others can reach while no keys are configured."""
    if settings.auth_enabled:
        return False
    if settings.host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(settings.host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        return True


CallerDep = Annotated[Caller, Depends(authorize)]
