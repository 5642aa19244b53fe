"""Encryption at rest for sensitive events (R7.7): AES-256-GCM with a key id, so keys can rotate.

``SCRIBE_EVENTS_ENCRYPTION_KEYS`` is a comma-separated list of 32-byte keys in URL-safe base64
(``scribe-events keygen`` makes one). The first key encrypts; every key decrypts. A stored value is
``base64url(nonce ‖ ciphertext)`` beside the key id (the first 8 hex digits of the key's SHA-256),
and the ciphertext is bound to the event's type and audience, so it cannot be moved to another row.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class CryptoError(Exception):
    """A key is malformed, missing, or a ciphertext does not verify."""


def new_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def _decode_key(text: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise CryptoError("an encryption key is not URL-safe base64") from exc
    if len(raw) != 32:
        raise CryptoError(f"an encryption key must be 32 bytes, this one is {len(raw)}")
    return raw


def key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:8]


class Cipher:
    def __init__(self, keys: str) -> None:
        parsed = [_decode_key(k.strip()) for k in keys.split(",") if k.strip()]
        if not parsed:
            raise CryptoError("SCRIBE_EVENTS_ENCRYPTION_KEYS holds no key")
        self._keys = {key_id(k): AESGCM(k) for k in parsed}
        self.current = key_id(parsed[0])

    @staticmethod
    def _aad(context: str) -> bytes:
        return context.encode("utf-8")

    def encrypt(self, plaintext: str, context: str) -> tuple[str, str]:
        """Returns ``(key_id, token)``."""
        nonce = os.urandom(12)
        sealed = self._keys[self.current].encrypt(nonce, plaintext.encode("utf-8"), self._aad(context))
        return self.current, base64.urlsafe_b64encode(nonce + sealed).decode()

    def decrypt(self, kid: str, token: str, context: str) -> str:
        aead = self._keys.get(kid)
        if aead is None:
            raise CryptoError(f"no key with id {kid} is configured")
        blob = base64.urlsafe_b64decode(token)
        try:
            return aead.decrypt(blob[:12], blob[12:], self._aad(context)).decode("utf-8")
        except InvalidTag as exc:
            raise CryptoError(f"a ciphertext under key {kid} does not verify") from exc
