"""Catalog-wide settings: values made once per catalog and shared by every host using it."""
from __future__ import annotations

import os

from .database import CatalogError

TEMP_NAME_KEY = "temp_name_key"


def temp_name_key(catalog) -> bytes:
    """The secret that tags the temporary files castlib writes (transfer.temp_path), made
    on first use. Only a name carrying a tag made with it is a temporary of this catalog's
    runs, and only those are removed or left out of listings: a user's file named alike,
    or another catalog's temporary, is a file like any other."""
    for _attempt in range(3):
        value = catalog.setting(TEMP_NAME_KEY)
        if value is not None:
            return bytes.fromhex(value)
        # (os.urandom's hex, as secrets.token_hex gives it) or another run's, kept
        catalog.add_setting(TEMP_NAME_KEY, os.urandom(32).hex())
    raise CatalogError("the catalog's temporary-name key can be neither read nor made")


def get_setting(catalog, name: str) -> str | None:
    """A catalog-wide value by name (None when never set): the state a stage keeps
    between runs, such as what http-push last sent."""
    return catalog.setting(name)


def set_setting(catalog, name: str, value: str) -> None:
    """Set a catalog-wide value, made if new."""
    catalog.set_setting(name, value)


def message_key(catalog) -> bytes:
    """The key that seals the task messages sent to workers (castlib.worker.seal): derived
    from the catalog's secret (temp_name_key), so every client and worker sharing the
    catalog holds it, and a reader (or writer) of the broker alone does not. A message
    carries the locations' URLs with their credentials and the back-end options: only a
    holder of the catalog may read them, or write a message a worker carries out."""
    import base64
    import hashlib
    import hmac

    derived = hmac.new(temp_name_key(catalog), b"castlib worker messages",
                       hashlib.sha256).digest()
    return base64.urlsafe_b64encode(derived)   # a Fernet key
