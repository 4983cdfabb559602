"""``splitstems serve``: the web page and JSON API on uvicorn (extra ``web``)."""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import threading
import webbrowser

from splitstems.cli.options import EXIT_OK, EXIT_USAGE, add_model_options, positive_int

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(text: str) -> int:
    """Parse a size in bytes: ``500M``, ``2G``, ``800k``, ``1048576`` (powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size (e.g. 200M, 2G): {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


_TOKEN = re.compile(r"[A-Za-z0-9._~-]{8,}")


def token(text: str) -> str:
    """Check a ``--token``: at least 8 letters, digits or ``-_.~`` (it goes in URLs, cookies)."""
    if _TOKEN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            "must be at least 8 letters, digits or -_.~ (e.g. python3 -c 'import secrets; "
            "print(secrets.token_urlsafe())')"
        )
    return text


def add_parser(sub: argparse._SubParsersAction, **kwargs: object) -> None:
    """Add the ``serve`` command to ``sub``."""
    serve = sub.add_parser(
        "serve", help="a web page to separate songs in the browser (extra web)", **kwargs
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; any other than loopback needs --token",
    )
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--open", action="store_true", help="open the page in a browser")
    serve.add_argument(
        "--token",
        type=token,
        default=None,
        help="secret the page and API ask for (a --host other than loopback needs one; "
        "default: none)",
    )
    serve.add_argument(
        "--max-upload",
        type=size,
        default="512M",
        help="largest song accepted, e.g. 200M or 2G",
    )
    serve.add_argument(
        "--workers", type=positive_int, default=1, help="songs separated at the same time"
    )
    serve.add_argument(
        "--queue", type=positive_int, default=16, help="most songs waiting or running at once"
    )
    serve.add_argument(
        "--keep",
        type=positive_int,
        default=3600,
        help="seconds a finished song's stems are kept before they are deleted",
    )
    add_model_options(serve)  # -p: the model the page selects first (loaded at start)
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: automatic)")
    serve.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (default: automatic)"
    )
    serve.add_argument("--verbose", action="store_true", help="more logging")
    serve.set_defaults(handler=run, long_running=True)  # see cli.main.finish_startup


def run(args: argparse.Namespace) -> int:
    """Run ``splitstems serve`` until Ctrl-C or SIGTERM; return the exit code."""
    try:
        import uvicorn

        from splitstems.web import Settings, create_app, is_loopback
    except ImportError as exc:
        print(
            f"error: splitstems serve needs the web extra ({exc.name} is missing): "
            "pip install 'splitstems[web]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    loopback = is_loopback(args.host)
    if not loopback and not args.token:
        print(
            f"error: --host {args.host} can be reached from other machines: pass --token "
            "SECRET too (anyone who reaches the port could use the server otherwise)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    settings = Settings(
        max_upload=args.max_upload,
        default_model=args.params,
        token=args.token,
        loopback=loopback,
        workers=args.workers,
        queue_size=args.queue,
        keep_seconds=float(args.keep),
        separator_kwargs={
            "model_dir": args.model_dir,
            "device": args.device,
            "threads": args.threads,
        },
    )
    shown = "localhost" if loopback else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={args.token}" if args.token else "")
    if not loopback:
        print(
            f"warning: listening on {args.host}:{args.port}, reachable from other machines; "
            "traffic is not encrypted (put a TLS proxy in front for untrusted networks)",
            file=sys.stderr,
        )
    try:  # bound here, so that a port in use is one line and exit 2
        sock = socket.create_server(
            (args.host, args.port), family=socket.AF_INET6 if ":" in args.host else socket.AF_INET
        )
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"error: cannot listen on {args.host}:{args.port} ({reason})", file=sys.stderr)
        return EXIT_USAGE
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="info" if args.verbose else "warning",
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            print(f"splitstems: serving on {url} (Ctrl-C stops)", flush=True)
            if args.open:
                webbrowser.open(url)

    threading.Thread(target=announce, daemon=True).start()
    with sock:
        server.run(sockets=[sock])
    return EXIT_OK if server.started else EXIT_USAGE
