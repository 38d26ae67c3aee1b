"""API keys: who a request's key belongs to, found without leaking which key matched.

The config holds each key's SHA-256 only. A presented key is hashed and compared with every
configured hash in constant time (``hmac.compare_digest``, all of them every time), so
neither the comparison nor the loop's length tells an attacker how close a guess came.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from ensemble_ops.config import ApiKeySpec, AuthSettings

__all__ = ["ANONYMOUS", "OPERATOR", "Caller", "Keyring", "new_key"]

_KEY_BYTES = 32
_PREFIX = "eo-"
MAX_KEY_CHARS = 512
"""Longer credentials are refused before hashing: a key is a key, not a payload."""


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: a key's name (and its limits), ``anonymous`` when no keys
    are configured, ``operator`` on the admin listener."""

    name: str
    key: ApiKeySpec | None = None

    @property
    def weight(self) -> float:
        return self.key.weight if self.key is not None else 1.0

    def may_use(self, model: str) -> bool:
        """Whether the key's model list lets it ask for ``model``."""
        return self.key is None or self.key.models is None or model in self.key.models


ANONYMOUS = Caller("anonymous")
OPERATOR = Caller("operator")


class Keyring:
    """The configured keys, looked up by the key a request presents."""

    def __init__(self, settings: AuthSettings) -> None:
        self._keys = settings.keys
        self._digests = [bytes.fromhex(key.key_sha256) for key in settings.keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def names(self) -> list[str]:
        return [key.name for key in self._keys]

    def identify(self, presented: str) -> Caller | None:
        """The caller whose key ``presented`` is, or None for no such key."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: ApiKeySpec | None = None
        for key, configured in zip(self._keys, self._digests, strict=True):
            if hmac.compare_digest(digest, configured):  # every one, match or not
                found = key
        return None if found is None else Caller(found.name, found)


def new_key() -> tuple[str, str]:
    """A fresh random key and its SHA-256 (hex): the key goes to the caller, once; the hash
    into the config."""
    key = _PREFIX + secrets.token_urlsafe(_KEY_BYTES)
    return key, hashlib.sha256(key.encode()).hexdigest()
