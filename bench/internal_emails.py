"""Email addresses at internal and reserved domains, for the scanner benchmark.

Not blind: written on 2026-12-03 with the email recogniser's rule in view, for
the defect that addresses such as ``ops@build01.local`` were missed (their
domains end in labels that are not on the public suffix list: RFC 2606/6761
names, ``.local``, ``.internal``, ``.home.arpa`` and labels in common internal
use such as ``.corp`` and ``.lan``).

INTERNAL_EMAIL_MESSAGES: chat and ticket messages as users write them, each
with one to three addresses wrapped in double square brackets, e.g.
``[[ops@build01.local]]``. Only the addresses are bracketed; the messages name
no people otherwise. Every bracketed address should be found as EMAIL_ADDRESS.

EMAIL_LOOKALIKE_MESSAGES: messages with an ``@`` that is no address (mentions,
decorators, package scopes and versions, image names with a density suffix, a
bare ``user@localhost`` login) and no personal data at all: any redaction or
block there is a false one.
"""

from __future__ import annotations

INTERNAL_EMAIL_MESSAGES: list[str] = [
    "Send the logs to [[ops@build01.local]] before Friday.",
    "The nightly backup report goes to [[backup-alerts@nas.lan]], not to the team channel.",
    "Can you add [[j.pierce@acme-corp.example]] to the pilot tenant? He needs read access only.",
    "HR moved their shared mailbox to [[alice@hr.internal]] last month.",
    "Invoices from the Leeds warehouse still come from [[accounts.payable@erp.corp]], please whitelist it.",
    "Printer alerts: [[printer01@office.lan]] and [[printer02@office.lan]] both report low toner.",
    "From: [[noreply@jenkins.build.internal]]\nSubject: Build #4411 failed on main",
    "For the staging smoke tests use [[qa+staging@test.test]] as the sender address.",
    "The router keeps mailing [[admin@gateway.home.arpa]] about firmware updates.",
    "Cron output is sent to [[root@db02.localdomain]] by default, which nobody reads.",
    "Please forward the vendor quote to [[procurement@intranet.corp]] (cc [[finance-team@hr.internal]]).",
    "Our test fixtures use [[nobody@invalid.invalid]] so that nothing can ever be delivered.",
    "The monitoring agent on srv-07 sends from [[it@srv07.localhost]]; that is expected.",
    "Contact for the Kiosk rollout: <[[kiosk-support@stores.private]]>",
    "I got a bounce from [[Mailer-Daemon@MX1.CORP]] when I tried the distribution list.",
    "mailto:[[servicedesk@helpdesk.intranet]]?subject=VPN%20access",
    "Set ALERT_EMAIL=[[oncall@monitoring.internal]] in the Helm values and redeploy.",
    "Ticket 88213: user [[m.okafor@sales.acme.local]] cannot log in to the CRM since the password reset.",
    "Both [[dev1@lab.home]] and [[dev2@lab.home]] need the new VPN profile.",
    "The demo accounts are [[demo.user@shop.example]] and [[demo.admin@shop.example]]; reset them after the call.",
    "scp the dump to [[deploy@build01.local]]:/srv/backups and tell [[dba@data.corp]] when it is there.",
    "Please don't reply to [[do-not-reply@notifications.lan]], write to the service desk instead.",
]

EMAIL_LOOKALIKE_MESSAGES: list[str] = [
    "Thanks @team, the fix is merged and deployed to staging.",
    "@here the Harbor cluster goes read-only at 02:00 UTC.",
    "Add @babel/core and @babel/preset-env to devDependencies.",
    "Pin pkg@1.2.3 until the regression in 1.2.4 is fixed.",
    "npm i lodash@4.17.21 fixed the prototype pollution warning.",
    "The header uses logo@2x.png on retina screens and logo.png elsewhere.",
    "Export the icons as icon@3x.jpg and icon@2x.jpg for the mobile app.",
    "@dataclass\nclass Row:\n    name: str\n    total: int",
    "Log in as root@localhost and restart the ingestion agent.",
    "GRANT SELECT ON reports.* TO 'etl'@'localhost';",
]
