"""A throwaway PostgreSQL cluster on loopback, for the tests and the bench scripts.

``initdb`` refuses to run as root, so when the tests run as root (CI does) the cluster is
created and started as the ``postgres`` system user, in a temporary directory it owns::

    with PostgresCluster.start() as pg:
        psycopg2.connect(pg.dsn)
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flowstone_dagster_tests.support.net import free_port


def postgres_bindir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: ``$PG_BINDIR``, Debian's layout, or PATH."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError(
        "PostgreSQL server binaries not found: run bin/setup (it installs Debian's postgresql) "
        "or set PG_BINDIR to the directory holding initdb and pg_ctl"
    )


@dataclass(frozen=True)
class PostgresCluster:
    host: str
    port: int
    user: str
    password: str
    database: str
    data_dir: Path

    @property
    def dsn(self) -> str:
        """A libpq keyword/value connection string."""
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={self.database}"
        )

    def pg_ctl(self, *args: str) -> None:
        """Run ``pg_ctl`` on this cluster (as the ``postgres`` user when we are root)."""
        command = [str(postgres_bindir() / "pg_ctl"), "-D", str(self.data_dir), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, capture_output=True, text=True, check=True)

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``): every connection breaks."""
        self.pg_ctl("-m", "immediate", "-w", "stop")

    def restart(self) -> None:
        """Start the server again after :meth:`stop`, on the same port."""
        options = (
            f"-p {self.port} -k {self.data_dir.parent} -h 127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        self.pg_ctl("-o", options, "-l", str(self.data_dir.parent / "server.log"), "-w", "start")

    @property
    def url(self) -> str:
        """A ``postgresql://`` URL."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @classmethod
    @contextmanager
    def start(cls) -> Iterator[PostgresCluster]:
        """Create, start and finally stop and delete a cluster."""
        bindir = postgres_bindir()
        as_root = os.geteuid() == 0
        base = Path(tempfile.mkdtemp(prefix="flowstone-pg-"))
        data_dir = base / "data"
        password = secrets.token_hex(12)
        pwfile = base / "pwfile"
        pwfile.write_text(password + "\n")
        if as_root:
            owner = pwd.getpwnam("postgres")
            os.chown(base, owner.pw_uid, owner.pw_gid)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        port = free_port()

        def run(*args: str) -> None:
            command = list(args)
            if as_root:
                command = ["runuser", "-u", "postgres", "--", *command]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(args)} failed ({result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}"
                )

        run(
            str(bindir / "initdb"),
            "-D", str(data_dir),
            "-U", "flowstone",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-sync",
        )  # fmt: skip
        options = f"-p {port} -k {base} -h 127.0.0.1 -c fsync=off -c max_connections=200"
        run(
            str(bindir / "pg_ctl"),
            "-D", str(data_dir),
            "-o", options,
            "-l", str(base / "server.log"),
            "-w", "-t", "60",
            "start",
        )  # fmt: skip
        cluster = cls("127.0.0.1", port, "flowstone", password, "postgres", data_dir)
        try:
            yield cluster
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop")
            shutil.rmtree(base, ignore_errors=True)
