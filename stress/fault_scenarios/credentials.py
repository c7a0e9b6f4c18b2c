"""The throw-away user of a fault run, the URL that carries it, and the forms in which its
password could leak."""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

from stress import rabbit_admin
from stress.common import url_for_vhost


def url_with(base: str, vhost: str, user: str | None = None, password: str | None = None) -> str:
    """``base`` with its path replaced by ``vhost`` and, if given, other credentials."""
    url = url_for_vhost(base, vhost)
    if user is None:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    credentials = f"{quote(user, safe='')}:{quote(password or '', safe='')}"
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))


@contextlib.contextmanager
def secret_user(vhost: str) -> Iterator[tuple[str, str]]:
    """A user with a random, distinctive password and full rights on ``vhost``.

    The password contains characters that need URL quoting, so both its raw and quoted forms
    can be looked for in logs. Deleted at exit.
    """
    user = f"faults-{uuid.uuid4().hex[:8]}"
    password = f"S3cr3t#{secrets.token_hex(8)}@x"
    rabbit_admin.rabbitmqctl("add_user", user, password)
    try:
        rabbit_admin.set_permissions(vhost, user)
        yield user, password
    finally:
        with contextlib.suppress(rabbit_admin.RabbitmqctlError):
            rabbit_admin.rabbitmqctl("delete_user", user)


def secret_forms(password: str) -> list[str]:
    """The forms in which a password could leak: raw and URL-quoted."""
    return sorted({password, quote(password, safe=""), quote(password)})
