"""Provider API keys encrypted at rest (Fernet, from `cryptography`).

The key comes from PROVIDER_KEY_ENCRYPTION_KEY (one or more comma-separated Fernet keys; the
first encrypts, all decrypt, so keys can be rotated). Unset, it is derived from SECRET_KEY, which
the embedded default keeps in DATA_DIR: a database copied without that file is useless to a thief.
Stored values look like `fernet:<token>`; a plain value from before encryption is still read.
"""

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.db import models

from .scrub import remember

PREFIX = "fernet:"


@lru_cache(maxsize=4)
def _fernet(configured: str, secret_key: str) -> MultiFernet:
    keys = [k.strip() for k in configured.split(",") if k.strip()]
    if not keys:
        digest = hashlib.sha256(b"chatapp.provider-keys:" + secret_key.encode()).digest()
        keys = [base64.urlsafe_b64encode(digest).decode()]
    return MultiFernet([Fernet(k.encode()) for k in keys])


def fernet() -> MultiFernet:
    return _fernet(settings.PROVIDER_KEY_ENCRYPTION_KEY, settings.SECRET_KEY)


def encrypt(plain: str) -> str:
    if not plain:
        return ""
    remember(plain)
    return PREFIX + fernet().encrypt(plain.encode()).decode()


def decrypt(stored: str) -> str:
    if not stored or not stored.startswith(PREFIX):
        remember(stored)
        return stored or ""
    try:
        plain = fernet().decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        # Encrypted with a key we no longer have: behave as "no key" (the provider answers
        # 401 and staff see which key), never crash the page.
        return ""
    remember(plain)  # from now on scrubbed from every upstream text this process keeps or logs
    return plain


class EncryptedTextField(models.TextField):
    """A text field whose value is encrypted in the database and plain in Python."""

    def from_db_value(self, value, expression, connection):
        return decrypt(value) if value is not None else value

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        return encrypt(value) if value else value

    def to_python(self, value):
        return decrypt(value) if isinstance(value, str) else value
