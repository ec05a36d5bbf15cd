"""Errors that tell the operator what to do.

Every error raised at the boundary of an external system names the system,
where we tried to reach it and the setting that decides it, so the message in
the Dagster UI is enough to fix the problem without reading a traceback.
"""

from __future__ import annotations


class OpsPlatformError(Exception):
    """Base of every error this package raises on purpose."""


class MissingSettingError(OpsPlatformError):
    """A setting an operation needs is not configured in this environment."""

    def __init__(self, setting: str, needed_for: str, hint: str = "") -> None:
        self.setting = setting
        self.needed_for = needed_for
        message = f"{needed_for} needs {setting}, which is not set"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ServerUnreachableError(OpsPlatformError):
    """A server did not answer at the address the configuration gives."""

    def __init__(self, system: str, address: str, setting: str, reason: str) -> None:
        self.system = system
        self.address = address
        self.setting = setting
        super().__init__(
            f"{system}: {reason} at {address} (check {setting})"
        )
