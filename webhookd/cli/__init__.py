"""The ``webhookd`` command. The only place that owns an event loop (uvloop) and reads argv.

One module per group of commands; each has ``register(subparsers, parents)``.
Exit codes: 0 success, 1 failure at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from webhookd.cli import daemon, deliveries, endpoints, events, outbox, stats, verify
from webhookd.cli.common import EXIT_FAILURE, EXIT_USAGE, Parents, run_async
from webhookd.errors import ConfigError, PayloadError, WebhookdError
from webhookd.settings import CONFIG_ENV_VAR

__all__ = ["build_parser", "main", "run_async"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        default=argparse.SUPPRESS,
        help=f"TOML configuration file (default: ${CONFIG_ENV_VAR}, else built-in defaults)",
    )
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parents = Parents(common, listing)

    parser = argparse.ArgumentParser(
        prog="webhookd",
        parents=[common],
        description="Delivers the rows of an outbox table as signed webhooks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from webhookd.send_test import add_send_test_parser

    daemon.register(sub, parents)
    outbox.register(sub, parents)
    endpoints.register(sub, parents)
    deliveries.register(sub, parents)
    stats.register(sub, parents)
    events.add_events_parser(sub, [common], listing)
    add_send_test_parser(sub, [common])
    verify.add_verify_parser(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        where = f" ({exc.source})" if exc.source else ""
        print(f"webhookd: invalid configuration{where}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except PayloadError as exc:
        print(f"webhookd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WebhookdError as exc:
        print(f"webhookd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `webhookd ... | head`: the reader left; say nothing more (as other Unix tools do).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
