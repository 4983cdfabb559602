"""``splitstems serve``'s options (no server started)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from splitstems.cli.serve import size, token
from splitstems.web import is_loopback


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 << 20), ("2G", 2 << 30), ("800k", 800 << 10), ("1.5MB", 3 << 19), ("99", 99)],
)
def test_max_upload_sizes_are_read_in_powers_of_1024(text: str, expected: int) -> None:
    assert size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-5M", "12X", "M", "1e9"])
def test_bad_max_upload_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        size(text)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_only_loopback_hosts_count_as_this_machine(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "splitstems", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port} (Address already in use)\n"


def test_tokens_must_be_long_and_safe_in_urls_and_cookies() -> None:
    assert token("s3cret-token_ok.~") == "s3cret-token_ok.~"
    for bad in ("short", "has space in it", "semi;colon=x", "ünïcödé-token"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 8 letters"):
            token(bad)
