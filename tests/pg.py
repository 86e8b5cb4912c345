"""A real, throwaway PostgreSQL server for tests: initdb into a temp dir, start on 127.0.0.1 at a
free port (trust auth, user and database `protege`), stop, restart on the same port, remove.

As root (CI), initdb and postgres refuse to run: the commands run as the `postgres` user."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from ops.gateway import free_port

INSTALL_HINT = "install the Debian package `postgresql` (apt-get install postgresql)"


def find_bin_dir() -> Path | None:
    """The directory holding `initdb` and `pg_ctl`: PATH first, else the newest
    /usr/lib/postgresql/*/bin (Debian does not put them on PATH)."""
    found = shutil.which("initdb")
    if found:  # often a symlink into /usr/lib/postgresql/N/bin, next to pg_ctl and postgres
        bin_dir = Path(found).resolve().parent
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    dirs = [Path(d).parent for d in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    dirs.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1)
    return dirs[-1] if dirs else None


class PgServer:
    """`PgServer.create()` starts one; `dsn()` / `dsn(dbname)`; `stop()`, `start()`, `destroy()`."""

    WAIT_S = 60  # every pg_ctl wait is bounded

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.as_postgres = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="protege-pg-",
                                          dir="/tmp" if self.as_postgres else None))
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "log"
        self.port = free_port()
        self.running = False
        self.sock.mkdir()
        if self.as_postgres:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(f"running as root needs the `postgres` user: {INSTALL_HINT}")
            self.root.chmod(0o755)
            for path in (self.root, self.sock):
                os.chown(path, user.pw_uid, user.pw_gid)

    @classmethod
    def create(cls) -> PgServer:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise FileNotFoundError(f"no PostgreSQL initdb on PATH or in /usr/lib/postgresql: "
                                    f"{INSTALL_HINT}")
        server = cls(bin_dir)
        try:
            server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", "protege",
                        "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions")
            server.start()
            with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
                conn.execute("CREATE DATABASE protege")
        except BaseException:
            server.destroy()
            raise
        return server

    def dsn(self, dbname: str = "protege") -> str:
        return f"postgresql://protege@127.0.0.1:{self.port}/{dbname}"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin_dir / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True,
                              timeout=self.WAIT_S + 30, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}"
                               f"{done.stderr}\n--- server log ---\n{log}")

    def start(self) -> None:
        """Start (or restart) the server on its port; returns once it accepts connections."""
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.sock} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", str(self.WAIT_S), "start")
        self.running = True

    def stop(self) -> None:
        """Stop it (fast: open connections are closed); `start()` brings it back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", str(self.WAIT_S),
                  "stop")
        self.running = False

    def destroy(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
