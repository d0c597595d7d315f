"""A throwaway PostgreSQL cluster for the tests: `initdb` + `pg_ctl` on a free port in a temp dir.

Debian's `postgresql` package provides the programs (tests/install_postgres.sh installs it when missing). The
server refuses to run as root, so as root the cluster belongs to the `postgres` user (or `nobody`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import asyncpg

USER = "llamarelay"


def _program(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, f"PostgreSQL's {name} is missing: run tests/install_postgres.sh (make test does)"
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One PostgreSQL server of its own; `database()` hands out a new empty database per test."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="llamarelay-pg-"))
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = "postgres" if _has_user("postgres") else "nobody"
            shutil.chown(self.dir, owner)
            self._as = ["runuser", "-u", owner, "--"]
        self._databases = 0
        data = self.dir / "data"
        self._run(
            _program("initdb"), "-D", str(data), "-A", "trust", "-U", USER, "-E", "UTF8", "--no-locale", "--no-sync"
        )
        self._run(
            _program("pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
            "-o",
            f"-p {self.port} -h 127.0.0.1 -k {self.dir} -F -c fsync=off -c full_page_writes=off",
        )

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self._as, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command[0]} failed: {result.stderr}{self._log()}"

    def _log(self) -> str:
        log = self.dir / "log"
        return log.read_text() if log.exists() else ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    async def database(self) -> str:
        """The URL of a new empty database."""
        self._databases += 1
        name = f"test{self._databases}"
        connection = await asyncpg.connect(self.url())
        try:
            await connection.execute(f"CREATE DATABASE {name}")
        finally:
            await connection.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(_program("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
