"""Catalog-wide settings: values made once per catalog and shared by every host using it."""
from __future__ import annotations

import secrets

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from .database import CatalogError
from .schema import Setting

S = Setting.__table__
TEMP_NAME_KEY = "temp_name_key"


def temp_name_key(catalog) -> bytes:
    """The secret that tags the temporary files castlib writes (transfer.temp_path), made
    on first use. Only a name carrying a tag made with it is a temporary of this catalog's
    runs, and only those are removed or left out of listings: a user's file named alike,
    or another catalog's temporary, is a file like any other."""
    for _attempt in range(3):
        with catalog.engine.connect() as conn:
            value = conn.execute(select(S.c.value).where(S.c.name == TEMP_NAME_KEY)).scalar()
        if value is not None:
            return bytes.fromhex(value)
        try:
            with catalog.engine.begin() as conn:
                conn.execute(insert(S).values(name=TEMP_NAME_KEY, value=secrets.token_hex(32)))
        except IntegrityError:
            pass   # another run made it at the same moment: read theirs
    raise CatalogError("the catalog's temporary-name key can be neither read nor made")


def get_setting(catalog, name: str) -> str | None:
    """A catalog-wide value by name (None when never set): the state a stage keeps
    between runs, such as what http-push last sent."""
    with catalog.engine.connect() as conn:
        return conn.execute(select(S.c.value).where(S.c.name == name)).scalar()


def set_setting(catalog, name: str, value: str) -> None:
    """Set a catalog-wide value, made if new."""
    with catalog.engine.begin() as conn:
        if conn.execute(update(S).where(S.c.name == name).values(value=value)).rowcount:
            return
        try:
            with conn.begin_nested():
                conn.execute(insert(S).values(name=name, value=value))
        except IntegrityError:   # made meanwhile by another run: ours is the later word
            conn.execute(update(S).where(S.c.name == name).values(value=value))
