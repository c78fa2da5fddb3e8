"""Run a command against a throwaway PostgreSQL server: ``python tests/with_postgres.py CMD [ARG...]``.

Creates a cluster in a fresh temporary directory, starts it on a free loopback
port (its socket in that directory, password authentication, durability off:
the data is thrown away), runs CMD with ``TEST_DATABASE_URL`` naming the
server's ``postgres`` database, then stops the server and deletes the directory
whatever CMD's outcome, Ctrl-C and SIGTERM included. Exits with CMD's status.
``make test`` runs its PostgreSQL pass through this.

``--check`` only reports whether PostgreSQL's server programs are installed:
Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``, newest
version first) or ``initdb`` on ``PATH``; ``PG_BIN`` names another directory.
PostgreSQL refuses to run as root, so as root the cluster belongs to the
``postgres`` user that Debian's package creates (``PG_USER`` names another).

Standard library only: it runs before (and without) the appliance's venv.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def find_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or 0), reverse=True)
    if versions:
        return versions[0].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A PostgreSQL cluster in ``root``, owned by ``user``; :meth:`start` and :meth:`stop` it."""

    def __init__(self, bin_dir: Path, root: Path, user: str) -> None:
        self.bin, self.root, self.user = bin_dir, root, user
        self.data, self.log = root / "data", root / "server.log"
        self.password = secrets.token_urlsafe(24)
        self.port = 0

    def _run(self, *argv: str) -> None:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd] if shutil.which("runuser") else \
                ["su", "-s", "/bin/sh", self.user, "-c", shlex.join(cmd)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=self.root)

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-sync",
                  "-A", "scram-sha-256", f"--pwfile={pwfile}")
        pwfile.unlink()
        for attempt in range(3):  # the port may be taken between choosing and binding it
            self.port = _free_port()
            options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60",
                          "start")
                return
            except subprocess.CalledProcessError:
                if attempt == 2:
                    sys.stderr.write(self.log.read_text(errors="replace") if self.log.exists() else "")
                    raise

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except subprocess.CalledProcessError:
                sys.stderr.write(f"warning: could not stop the PostgreSQL server in {self.data}\n")


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    bin_dir = find_bin()
    if argv[:1] == ["--check"]:
        print(bin_dir or "PostgreSQL is not installed")
        return 0 if bin_dir else 1
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    if bin_dir is None:
        print("PostgreSQL is not installed: `apt-get install postgresql` (make test does so as root) or set PG_BIN",
              file=sys.stderr)
        return 2
    user = os.environ.get("PG_USER", "postgres") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    signal.signal(signal.SIGTERM, _raise_interrupt)
    root = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    cluster = Cluster(bin_dir, root, user)
    try:
        cluster.start()
        print(f"PostgreSQL {bin_dir.parent.name} on 127.0.0.1:{cluster.port} (cluster in {root})", flush=True)
        return subprocess.call(argv, env={**os.environ, "TEST_DATABASE_URL": cluster.url})
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish cleaning up
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
