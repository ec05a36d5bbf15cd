"""Known errors end a run as `dg.Failure`, so the UI shows the message, not a stack.

Every asset and playbook body runs inside :func:`known_errors`: an
:class:`OpsPlatformError` (missing setting, server down, refused restore, bad
input) becomes a ``dg.Failure`` whose description is the message, once, with
the prefix given and never twice; anything else stays a real error with its
traceback, because it is a bug.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg

from ops_platform.errors import OpsPlatformError


def prefixed(prefix: str | None, message: str) -> str:
    """``prefix: message``, unless the message already starts with the prefix."""
    if not prefix:
        return message
    head = prefix.rstrip(": ")
    return message if message.startswith(head) else f"{head}: {message}"


def failure(prefix: str | None, error: BaseException | str, metadata: Mapping[str, Any] | None = None) -> dg.Failure:
    return dg.Failure(description=prefixed(prefix, str(error)), metadata=dict(metadata or {}))


@contextmanager
def known_errors(prefix: str | None = None, metadata: Mapping[str, Any] | None = None) -> Iterator[None]:
    try:
        yield
    except dg.Failure:
        raise
    except OpsPlatformError as error:
        raise failure(prefix, error, metadata) from None
