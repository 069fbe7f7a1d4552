"""webhookd: turns rows of an application's outbox table into signed webhook deliveries."""

from __future__ import annotations

__version__ = "0.1.0"
