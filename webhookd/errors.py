"""The exception tree. Every error webhookd raises on purpose derives from WebhookdError."""

from __future__ import annotations


class WebhookdError(Exception):
    """Root of webhookd's own errors; the CLI prints these as one line and exits non-zero."""


class ConfigError(WebhookdError):
    """The configuration is invalid. ``problems`` holds one ``key.path: message`` line each."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n  " + "\n  ".join(problems))


class PayloadError(WebhookdError, ValueError):
    """An event cannot be sent as-is (bad JSON, not JavaScript-canonical, too large, bad type)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason  # a short stable code, used as the metric label
        super().__init__(message)


class StorageError(WebhookdError):
    """The store failed; the message says what and, where known, what to do."""


class StoreLockedError(StorageError):
    """Another webhookd daemon already owns this database."""


class NotFoundError(WebhookdError):
    """A named delivery, endpoint or event does not exist."""
