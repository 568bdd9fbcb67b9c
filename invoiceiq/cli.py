"""``invoiceiq serve | migrate | check-config | reconcile | prune``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import anyio

from .config import ConfigError, Settings, load_settings, render_effective_config, resolve_config_path
from .observability import configure_logging, get_logger

log = get_logger("invoiceiq")


def _settings(args: argparse.Namespace) -> Settings:
    path = resolve_config_path(args.config, os.environ)
    return load_settings(path, os.environ)


def _serve(settings: Settings) -> int:
    from .daemon import Daemon

    anyio.run(Daemon(settings).run)
    return 0


def _migrate(settings: Settings) -> int:
    from .store import Store

    async def main() -> list[int]:
        store = Store(settings.database.url)
        await store.open()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.run_writer)
                applied = await store.migrate()
                tg.cancel_scope.cancel()
            return applied
        finally:
            await store.close()

    applied = anyio.run(main)
    print(f"applied migrations: {applied}" if applied else "database schema is up to date")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="invoiceiq", description=__doc__)
    parser.add_argument("--config", help="TOML file (default ./config.toml if present)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the daemon"), ("migrate", "apply database migrations and exit"),
                       ("check-config", "print the effective configuration, secrets masked")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--config", dest="config_sub", help="TOML file")
    args = parser.parse_args(argv)
    args.config = getattr(args, "config_sub", None) or args.config

    try:
        settings = _settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    configure_logging(settings.log.level)

    if args.command == "check-config":
        print(render_effective_config(settings))
        return 0
    if args.command == "migrate":
        return _migrate(settings)
    return _serve(settings)


if __name__ == "__main__":
    sys.exit(main())
