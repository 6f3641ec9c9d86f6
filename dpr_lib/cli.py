"""Shared command-line plumbing of the thin jobs: ``--conf`` + ``--set`` overrides, logging, and
turning DprError into a message and an exit code instead of a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Callable

from dpr_lib.config import Config, load_config
from dpr_lib.errors import ConfigError, DprError


def base_parser(description: str, prog: str | None = None,
                default_conf: str | None = "conf/local.yaml") -> argparse.ArgumentParser:
    """``--conf`` (default ``default_conf``; None: the built-in defaults), ``--set`` and ``-v``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--conf", default=default_conf,
                        help=f"YAML config file (default: {default_conf or 'the built-in defaults'})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set corpus.words=50 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def parse_shards(text: str) -> list[int] | None:
    """``--shards 0,2,5`` -> [0, 2, 5]; empty -> None (all shards)."""
    try:
        shards = [int(s) for s in text.split(",") if s.strip()] if text else None
    except ValueError:
        raise ConfigError(f"--shards takes comma-separated shard numbers, got {text!r}") from None
    return shards or None


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "filelock", "faiss", "werkzeug",
                  "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_job(description: str, body: Callable[[Config, argparse.Namespace], dict],
            extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
            argv: list[str] | None = None) -> int:
    """Parse args, load config (failing before Spark on bad keys), run ``body``, print its result."""
    parser = base_parser(description)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load_config(args.conf, args.overrides)
        result = body(cfg, args)
    except DprError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; published versions are unchanged, rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen failure: traceback, then one clear line
        traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
              " (the traceback above is for a bug report; published versions are unchanged)", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0
