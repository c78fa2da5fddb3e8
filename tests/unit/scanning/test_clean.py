"""Clean business text: nothing is flagged (where stock presidio flags dates, numbers, products)."""

from __future__ import annotations

CLEAN = [
    "Revenue for Q3 grew 12% to $4.2M compared with the same quarter last year.",
    "Ticket INC-48213 was escalated to the Platform team on Tuesday.",
    "Please deploy version 2.14.3 to staging before 16:00.",
    "The invoice total is 12,480.00 EUR, payable within 30 days.",
    "Order 5837201946 shipped from the central warehouse on March 14.",
    "The Customer Success review is scheduled for Friday at 09:30.",
    "Our churn rate dropped to 4.2% after the Atlas launch.",
    "The build failed on commit 3f9a1c7e2b8d4f6a0c5e9b1d7f3a2c8e4b6d0f1a because a unit test timed out.",
    "Request id 7c9e6679-7425-40de-944b-e07fc1f90ae7 returned a 502 from the load balancer.",
    "The SLA guarantees 99.9% uptime, measured monthly.",
    "What is the difference between a purchase order and an invoice?",
    "Reset the cache TTL to 300 seconds and redeploy.",
    "Set password_min_length to 12 in the security policy.",
    "Read the database password from os.environ['DB_PASSWORD'] instead of hard-coding it.",
    "The token expires after 15 minutes; refresh it with the refresh endpoint.",
    "See https://docs.python.org/3/library/json.html for the details.",
    "Write a SQL query that counts orders per customer_id for 2024.",
    "SKU ATL-4821-B is out of stock until week 32.",
    "Thanks, that answers my question.",
    "Sure! Here is a summary of the three options with their costs and risks.",
    "Migrate the cron job to run at 02:00 UTC on weekdays.",
    "Use `git rebase -i HEAD~3` to squash the last commits.",
    "The checksum of the installer is sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08.",
    "Batch 403858 failed validation: 793 rows had an empty amount column.",
    "The pallet weighs 412 kg and measures 120 x 80 x 150 cm.",
    "Interest accrues at 7.5% per annum on overdue balances.",
    "Please translate the onboarding checklist into German and French.",
    "Export the report and attach it to the ticket by the end of May.",
    "Average handling time fell from 14 to 6 minutes in June.",
    "Dear Customer, your order has shipped.",
]


def test_no_findings_on_clean_business_text(scanner):
    from appliance.scanning import ScanUnit

    findings = scanner.scan([ScanUnit(i, "text", t) for i, t in enumerate(CLEAN)])
    assert [(CLEAN[f.record][f.start : f.end], f.entity_type) for f in findings] == []
