"""Audited actions from several threads until killed: ``python -m tests.faults.audit_writer RUN THREADS``.

Uses the library as the server does (``IdentityService`` on ``$APPLIANCE_HOME``): each action's state
change and its audit event are one transaction. Prints ``<kind> <id>`` once an action has committed.
"""

from __future__ import annotations

import sys
import threading

from appliance.audit.service import AuditContext
from appliance.bootstrap import open_initialized
from appliance.identity.roles import Role
from appliance.identity.service import IdentityService
from appliance.settings import load_settings


def main(run: str, threads: int) -> None:
    identity = IdentityService(open_initialized(load_settings()))
    ctx = AuditContext.cli("fault-test")
    out = threading.Lock()

    def committed(kind: str, ident: str) -> None:
        with out:
            sys.stdout.write(f"{kind} {ident}\n")
            sys.stdout.flush()

    def work(t: int) -> None:
        i = 0
        while True:
            name = f"p-{run}-{t}-{i}"
            identity.create_project(ctx, name)
            committed("project", name)
            view, _ = identity.create_token(ctx, "olivia", Role.DATA_OWNER, "acme", description=name)
            committed("token", view.token_id)
            i += 1

    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    committed("ready", run)
    for w in workers:
        w.join()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
