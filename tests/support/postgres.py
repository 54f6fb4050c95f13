"""A real PostgreSQL server on loopback for the tests, started once per session from Debian's binaries.

``initdb`` into a temporary directory and ``postgres -h 127.0.0.1 -p PORT``, run as the ``postgres`` user
when the tests run as root (PostgreSQL refuses to run as root; CI runs as root). TCP connections need a
password (scram-sha-256), so the URLs the tests hand to servers carry one, as real ones do. Each test
that wants a clean slate asks for a fresh database (``PostgresServer.new_database``).

The ``postgres_server`` fixture skips, saying why, only when the binaries are absent (``.ci/run``
installs Debian's ``postgresql``); a server that is there but will not start fails the test.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.apps import PATIENCE_S, wait_until
from tests.support.servers import free_port

SUPERUSER = "tta_test"
PASSWORD = "pg-Test-secret-4f1c9e"  # the tests look for it in logs: it must never appear there


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


@dataclass
class PostgresServer:
    """A running server: its port, and URLs of databases on it."""

    port: int
    process: subprocess.Popen[str]
    log_path: Path
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str = "postgres", user: str = SUPERUSER, password: str = PASSWORD) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as the superuser, each committed on its own (CREATE DATABASE cannot be in a transaction)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode())

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"tta_{os.getpid()}_{next(self._names)}"
        self.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _as_postgres_user() -> dict[str, object]:
    """Popen arguments that run a command as ``postgres`` when we are root (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root, and there is no 'postgres' user to run PostgreSQL as (Debian's package adds it)")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _wait_accepting(server: PostgresServer) -> None:
    import psycopg

    def accepting() -> bool:
        if server.process.poll() is not None:
            raise AssertionError(f"postgres exited {server.process.returncode}:\n{server.log()}")
        try:
            with psycopg.connect(server.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    wait_until(accepting, f"postgres to accept connections (its log: {server.log_path})")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's binaries (initdb, postgres) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[dev]'")
    as_user = _as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="tta-postgres-"))  # not under pytest's tmp: that is root's, mode 0700
    data, sockets, pwfile = root / "data", root / "sockets", root / "pwfile"
    sockets.mkdir()
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        for path in (root, sockets, pwfile):
            os.chown(path, int(as_user["user"]), int(as_user["group"]))  # type: ignore[call-overload]
    init = subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        check=False,
        **as_user,  # type: ignore[arg-type]
    )
    assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
    port = free_port()
    log_path = root / "postgres.log"
    with log_path.open("w") as log_file:
        if as_user:
            os.chown(log_path, int(as_user["user"]), int(as_user["group"]))  # type: ignore[call-overload]
        listen = ["-k", str(sockets), "-p", str(port), "-h", "127.0.0.1"]
        process = subprocess.Popen(
            # fsync off: the tests' data needs no crash safety, and the shared disk is slow.
            [str(bindir / "postgres"), "-D", str(data), *listen, "-c", "fsync=off"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            **as_user,  # type: ignore[arg-type]
        )
    server = PostgresServer(port, process, log_path)
    try:
        _wait_accepting(server)
        yield server
    finally:
        process.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown (SIGTERM's smart one waits for clients)
        try:
            process.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(PATIENCE_S)
        shutil.rmtree(root, ignore_errors=True)
