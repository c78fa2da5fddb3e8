"""A labelled chat corpus for the scanner benchmark.

Records are OpenAI chat fine-tune records. User and assistant messages mix
clean business sentences with sentences that carry one planted entity each;
every planted entity's exact span is recorded as a :class:`Label`. A separate
set of *clean* messages carries no personal data or secret at all, but does
carry what business text is full of: amounts, dates, order and ticket numbers,
versions, hashes, request ids, product and team names, and code that mentions
credentials without containing one. Any finding there is a false finding.

Values come from Faker in ten locales (names, emails, IBANs, phone numbers),
from Faker's Luhn-valid card numbers, or are generated in the real formats of
each secret with random characters. Phone numbers are kept only when
``phonenumbers`` says they are valid numbers, as real ones are.
"""

from __future__ import annotations

import base64
import random
import string
from dataclasses import dataclass

import phonenumbers
from faker import Faker

LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "nl_NL", "pl_PL", "en_IN"]
PHONE_REGIONS = {"en_US": "US", "en_GB": "GB", "de_DE": "DE", "fr_FR": "FR", "es_ES": "ES",
                 "it_IT": "IT", "pt_BR": "BR", "nl_NL": "NL", "pl_PL": "PL", "en_IN": "IN"}
IBAN_LOCALES = ["de_DE", "fr_FR", "nl_NL", "en_GB", "es_ES", "it_IT", "pl_PL"]


@dataclass(frozen=True)
class Label:
    """One planted entity: where it is and what it is."""

    record: int
    field: str
    entity_type: str
    start: int
    end: int
    locale: str = ""


@dataclass
class Corpus:
    """Records with planted entities, their labels, and clean records."""

    records: list[dict]
    labels: list[Label]
    clean_records: list[dict]


# --------------------------------------------------------------------------- values


class Values:
    """Realistic values of every planted type, drawn from one seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.fakers = {loc: Faker(loc) for loc in LOCALES}
        for i, f in enumerate(self.fakers.values()):
            f.seed_instance(rng.randrange(2**31) + i)

    def _faker(self) -> tuple[str, Faker]:
        loc = self.rng.choice(LOCALES)
        return loc, self.fakers[loc]

    def _chars(self, alphabet: str, n: int) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    # personal data
    def person(self) -> tuple[str, str]:
        loc, f = self._faker()
        style = self.rng.random()
        if style < 0.55:
            return f"{f.first_name()} {f.last_name()}", loc
        if style < 0.8:
            return f.name(), loc  # may carry titles such as "Dr." or "B.Sc."
        return f.first_name(), loc  # chat often uses a first name alone

    def email(self) -> str:
        _, f = self._faker()
        return self.rng.choice([f.email, f.free_email, f.company_email, f.ascii_safe_email])()

    def phone(self) -> str:
        for _ in range(200):
            loc, f = self._faker()
            raw = f.phone_number()
            try:
                num = phonenumbers.parse(raw, PHONE_REGIONS[loc])
            except phonenumbers.NumberParseException:
                continue
            if not phonenumbers.is_valid_number(num):
                continue
            style = self.rng.random()
            if style < 0.35:
                return raw.split("x")[0].strip()
            if style < 0.65:
                return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
            if style < 0.85:
                return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.NATIONAL)
            return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
        raise RuntimeError("no valid phone number generated")

    def credit_card(self) -> str:  # grouped the way the card networks print them
        f = self.fakers["en_US"]
        number = f.credit_card_number()
        style = self.rng.random()
        if style < 0.4:
            return number
        sep = " " if style < 0.75 else "-"
        groups = {15: (4, 6, 5), 14: (4, 6, 4), 16: (4, 4, 4, 4), 19: (4, 4, 4, 4, 3)}.get(len(number))
        if groups is None:
            return number
        out, i = [], 0
        for g in groups:
            out.append(number[i : i + g])
            i += g
        return sep.join(out)

    def iban(self) -> str:
        value = self.fakers[self.rng.choice(IBAN_LOCALES)].iban()
        if self.rng.random() < 0.5:
            return " ".join(value[i : i + 4] for i in range(0, len(value), 4))
        return value

    def ssn(self) -> str:
        value = self.fakers["en_US"].ssn()
        return value.replace("-", " ") if self.rng.random() < 0.15 else value

    def ip(self) -> str:
        f = self.fakers["en_US"]
        r = self.rng.random()
        if r < 0.5:
            return f.ipv4_public()
        if r < 0.8:
            return f.ipv4_private()
        return f.ipv6()

    # secrets
    def aws_access_key_id(self) -> str:
        return self.rng.choice(["AKIA", "ASIA"]) + self._chars(string.ascii_uppercase + "234567", 16)

    def aws_secret_access_key(self) -> str:
        return self._chars(string.ascii_letters + string.digits + "+/", 40)

    def gcp_api_key(self) -> str:
        return "AIza" + self._chars(string.ascii_letters + string.digits + "-_", 35)

    def azure_storage_key(self) -> str:
        return base64.b64encode(self.rng.randbytes(64)).decode()

    def github_token(self) -> str:
        if self.rng.random() < 0.25:
            alnum = string.ascii_letters + string.digits
            return "github_pat_" + self._chars(alnum, 22) + "_" + self._chars(alnum, 59)
        prefix = self.rng.choice(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"])
        return prefix + self._chars(string.ascii_letters + string.digits, 36)

    def gitlab_token(self) -> str:
        return "glpat-" + self._chars(string.ascii_letters + string.digits + "-_", 20)

    def slack_token(self) -> str:
        kind = self.rng.choice(["xoxb", "xoxp", "xoxa", "xoxr", "xoxs", "hook"])
        if kind == "hook":
            return (
                "https://hooks.slack.com/services/T" + self._chars(string.ascii_uppercase + string.digits, 10)
                + "/B" + self._chars(string.ascii_uppercase + string.digits, 10)
                + "/" + self._chars(string.ascii_letters + string.digits, 24)
            )
        digits = string.digits
        return f"{kind}-{self._chars(digits, 12)}-{self._chars(digits, 13)}-" + self._chars(
            string.ascii_letters + string.digits, 24
        )

    def private_key(self) -> str:
        kind = self.rng.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED "])
        body = base64.b64encode(self.rng.randbytes(self.rng.choice([120, 240, 480]))).decode()
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return f"-----BEGIN {kind}PRIVATE KEY-----\n" + "\n".join(lines) + f"\n-----END {kind}PRIVATE KEY-----"

    def jwt(self) -> str:
        def seg(raw: bytes) -> str:
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        header = seg(b'{"alg":"HS256","typ":"JWT"}')
        sub = self.rng.randrange(10**6)
        payload = seg(f'{{"sub":"{sub}","iat":{1700000000 + sub},"scope":"read write"}}'.encode())
        return f"{header}.{payload}.{seg(self.rng.randbytes(32))}"

    def appliance_token(self) -> str:
        return f"apl_{self.rng.randbytes(6).hex()}_{base64.urlsafe_b64encode(self.rng.randbytes(32)).rstrip(b'=').decode()}"

    def generic_secret(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return self.fakers["en_US"].password(length=self.rng.randint(10, 20))
        if r < 0.7:
            return base64.urlsafe_b64encode(self.rng.randbytes(self.rng.choice([16, 24, 32]))).rstrip(b"=").decode()
        return self.rng.randbytes(self.rng.choice([16, 20, 32])).hex()


# --------------------------------------------------------------------------- templates

# One planted value per template, written as "{v}"; "{name}" in clean text is
# never used, so clean sentences stay free of personal data.
TEMPLATES: dict[str, list[str]] = {
    "PERSON": [
        "Hi, my name is {v} and I need help with my account.",
        "Please forward the signed contract to {v} before Friday.",
        "{v} said the shipment would arrive two days late.",
        "Can you set up a call with {v} sometime next week?",
        "Thanks {v}, I'll look into it right away.",
        "The refund was approved by {v} from accounting.",
        "Dear {v}, your subscription has been renewed for another year.",
        "I spoke with {v} yesterday about the missing invoice.",
        "Kind regards,\n{v}",
        "Our new team lead, {v}, starts on Monday.",
        "Hello {v}! Thanks for reaching out to support.",
        "Could you ask {v} whether the budget was signed off?",
        "This ticket was opened on behalf of {v}.",
        "According to {v}, the outage started around noon.",
        "I'm writing on behalf of my colleague {v}, who is on leave.",
        "Write a short thank-you note to {v} for hosting the workshop.",
        "The account holder is {v}.",
        "Summarise the complaint that {v} sent us this morning.",
        "{v} will present the roadmap at the all-hands.",
        "Best,\n{v}",
        "My manager {v} asked me to escalate this.",
        "Please update the delivery name to {v}.",
    ],
    "EMAIL_ADDRESS": [
        "You can reach me at {v} if anything changes.",
        "Please send the invoice to {v}.",
        "My login email is {v} but the reset link never arrives.",
        "CC {v} on the next update, please.",
        "Contact: {v}",
        "Add {v} to the distribution list.",
        "The customer wrote from {v} to ask about the refund.",
        "reply-to: {v}",
    ],
    "PHONE_NUMBER": [
        "Call me on {v} after 3pm.",
        "My mobile number is {v}.",
        "You can reach the site manager at {v}.",
        "Phone: {v}",
        "Please text {v} when the driver arrives.",
        "The hotline number {v} kept me on hold for an hour.",
        "Tel. {v}",
        "If the portal is down, ring {v} instead.",
        "Update my contact number to {v}, please.",
        "She left a voicemail from {v} this morning.",
    ],
    "CREDIT_CARD": [
        "I was charged twice on my card {v}.",
        "Card number: {v}",
        "Please refund the payment made with {v}.",
        "My Visa ending in the digits below was declined: {v}",
        "Can you update the billing card to {v}?",
        "The chargeback concerns card {v}.",
    ],
    "IBAN_CODE": [
        "Please wire the deposit to IBAN {v}.",
        "Our bank details: {v}",
        "The refund should go to account {v}.",
        "Update the supplier's IBAN to {v} before the next payment run.",
        "Bank account (IBAN): {v}",
    ],
    "US_SSN": [
        "My SSN is {v}.",
        "Social security number: {v}",
        "The form asks for the SSN ({v}) on page two.",
        "Employee SSN {v} appears twice in the payroll export.",
        "Verify the applicant's social security number, {v}, against the record.",
    ],
    "IP_ADDRESS": [
        "The requests are coming from {v}.",
        "Please whitelist {v} on the firewall.",
        "The VPN assigned me {v} today.",
        "Login attempt blocked from IP {v}.",
        "ssh admin@{v} fails with a timeout.",
        "Server {v} stopped responding at 02:14.",
    ],
    "UK_NHS": [
        "My NHS number is {v}.",
        "NHS no. {v} is on the referral letter.",
        "Please check the patient's NHS number ({v}) before booking.",
    ],
    "AWS_ACCESS_KEY_ID": [
        "aws_access_key_id = {v}",
        "export AWS_ACCESS_KEY_ID={v}",
        "Why does the key {v} get AccessDenied on s3:PutObject?",
        '"AccessKeyId": "{v}",',
        "The IAM user's access key {v} was rotated yesterday.",
    ],
    "AWS_SECRET_ACCESS_KEY": [
        "aws_secret_access_key = {v}",
        "export AWS_SECRET_ACCESS_KEY={v}",
        '"SecretAccessKey": "{v}"',
        "Here is the AWS secret key: {v}",
        "AWS_SECRET_ACCESS_KEY: {v}",
        "my aws secret is {v} and the region is eu-west-1",
    ],
    "GCP_API_KEY": [
        "const apiKey = '{v}';",
        "The Maps call fails with key={v}",
        "GOOGLE_API_KEY={v}",
        "I restricted the API key {v} to our domain.",
    ],
    "AZURE_STORAGE_KEY": [
        "DefaultEndpointsProtocol=https;AccountName=contosodata;AccountKey={v};EndpointSuffix=core.windows.net",
        "AZURE_STORAGE_KEY={v}",
        "The storage account key is {v}",
        "az storage blob upload --account-name contosodata --account-key {v}",
    ],
    "GITHUB_TOKEN": [
        "git clone https://{v}@github.com/acme/platform.git",
        "export GITHUB_TOKEN={v}",
        "The workflow fails even with token {v}.",
        "Authorization: token {v}",
        "I generated {v} with repo scope.",
    ],
    "GITLAB_TOKEN": [
        "export GITLAB_TOKEN={v}",
        "curl --header 'PRIVATE-TOKEN: {v}' https://gitlab.example.com/api/v4/projects",
        "The runner uses the access token {v}.",
    ],
    "SLACK_TOKEN": [
        "SLACK_BOT_TOKEN={v}",
        "The bot posts with {v} but gets not_in_channel.",
        "slack:\n  token: {v}",
        "Send the alert to {v}",
    ],
    "PRIVATE_KEY": [
        "Here is the deploy key:\n{v}",
        "{v}",
        "ssh fails with this key, what is wrong?\n\n{v}\n",
    ],
    "JWT": [
        "Authorization: Bearer {v}",
        "The API rejects my token {v} as expired.",
        "Decode this JWT for me: {v}",
        "document.cookie = 'session={v}'",
    ],
    "APPLIANCE_TOKEN": [
        "export APPLIANCE_TOKEN={v}",
        "curl -H 'Authorization: Bearer {v}' https://appliance.local/v1/projects",
        "My token {v} stopped working after the upgrade.",
    ],
    "GENERIC_SECRET": [
        "password={v}",
        "DB_PASSWORD: {v}",
        '"api_key": "{v}",',
        "client_secret = '{v}'",
        "The admin password is {v}",
        "secret: {v}",
        "SMTP_PASSWORD={v}",
        "token = \"{v}\"",
        "mysql -u root -p'{v}' -h db01",
    ],
}

VALUE_OF = {
    "PERSON": "person", "EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "credit_card",
    "IBAN_CODE": "iban", "US_SSN": "ssn", "IP_ADDRESS": "ip", "UK_NHS": "nhs",
    "AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "GCP_API_KEY": "gcp_api_key", "AZURE_STORAGE_KEY": "azure_storage_key", "GITHUB_TOKEN": "github_token",
    "GITLAB_TOKEN": "gitlab_token", "SLACK_TOKEN": "slack_token", "PRIVATE_KEY": "private_key", "JWT": "jwt",
    "APPLIANCE_TOKEN": "appliance_token", "GENERIC_SECRET": "generic_secret",
}

PLANTED_TYPES = list(TEMPLATES)


def _nhs(rng: random.Random) -> str:
    while True:
        digits = [rng.randrange(10) for _ in range(9)]
        check = 11 - sum(d * w for d, w in zip(digits, range(10, 1, -1))) % 11
        if check == 11:
            check = 0
        if check != 10:
            s = "".join(map(str, digits + [check]))
            return f"{s[:3]} {s[3:6]} {s[6:]}" if rng.random() < 0.6 else s


# Half dictionary words, half invented brand names, as product names are.
PRODUCTS = ["Atlas", "Beacon", "Nimbus", "Orbit", "Quartz", "Zentrix", "Lumora", "Vexo", "Corvana", "Quillio"]
TOOLS = ["Jira", "Salesforce", "Zendesk", "Kubernetes", "Grafana", "Okta", "Slack", "PostgreSQL", "Terraform",
         "HubSpot", "Datadog", "Confluence", "SharePoint", "Tableau", "Snowflake", "GitHub", "Workday", "ServiceNow"]
TEAMS = ["Finance", "Platform", "Customer Success", "Procurement", "Legal", "Data Engineering", "Security",
         "Marketing", "Support", "Facilities", "Sales Operations", "Human Resources"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

CLEAN: list[str] = [
    "Revenue for Q{q} grew {pct}% to ${amt}M compared with the same quarter last year.",
    "Ticket INC-{n5} was escalated to the {team} team on {day}.",
    "Please deploy version {ver} to staging before {hh}:{mm}.",
    "The invoice total is {amt},{n3}.00 EUR, payable within 30 days.",
    "Order {n10} shipped from the central warehouse on {month} {dd}.",
    "The {team} review is scheduled for {day} at {hh}:{mm}.",
    "Our churn rate dropped to {pct}.{d}% after the {prod} launch.",
    "Can you summarise the main points of the {prod} release notes?",
    "The build failed on commit {sha} because a unit test timed out.",
    "Request id {uuid} returned a 502 from the load balancer.",
    "We need {n2} more licences for the {team} department by the end of {month}.",
    "The SLA guarantees {pct}.9% uptime, measured monthly.",
    "Please rewrite this paragraph in a more formal tone.",
    "What is the difference between a purchase order and an invoice?",
    "The {prod} dashboard shows {n4} active users in the last 24 hours.",
    "Reset the cache TTL to {n3} seconds and redeploy.",
    "Our office will be closed on {month} {dd} for the public holiday.",
    "The {team} budget for FY{yy} is capped at ${amt}k.",
    "Set password_min_length to {n2} in the security policy.",
    "Read the database password from os.environ['DB_PASSWORD'] instead of hard-coding it.",
    "api_key: ${{API_KEY}}",
    "password: <redacted>",
    "The token expires after {n2} minutes; refresh it with the refresh endpoint.",
    "Rotate the secret every {n2} days and store it in the vault, never in the repo.",
    "Run `pip install {prod_l}=={ver}` and restart the worker.",
    "See https://docs.python.org/3/library/json.html for the details.",
    "The meeting notes are in the shared drive under {prod}/{month}/minutes.",
    "Shipping costs rose by {pct}% in {month}, mostly because of fuel surcharges.",
    "Please translate the onboarding checklist into German and French.",
    "The warehouse processed {n4} parcels on {day}, a new record.",
    "Write a SQL query that counts orders per customer_id for {yyyy}.",
    "SKU {prodU}-{n4}-{L} is out of stock until week {n2}.",
    "The {prod} API returns HTTP 429 when more than {n3} requests per minute are sent.",
    "Thanks, that answers my question.",
    "Could you draft an agenda for the quarterly business review?",
    "Sure! Here is a summary of the three options with their costs and risks.",
    "The contract renews automatically unless cancelled {n2} days before the end date.",
    "Migrate the cron job to run at {hh}:{mm} UTC on weekdays.",
    "Disk usage on the build server is at {pct}%; clean up old artifacts.",
    "The {team} team approved the change request CR-{n4}.",
    "Average handling time fell from {n2} to {n1} minutes.",
    "Let me know if you'd like me to expand any of these sections.",
    "Interest accrues at {n1}.{d}% per annum on overdue balances.",
    "Use `git rebase -i HEAD~{n1}` to squash the last commits.",
    "The checksum of the installer is sha256:{sha64}.",
    "Our NPS for {month} was {n2}, up {n1} points.",
    "Please convert the table to CSV with semicolons as separators.",
    "Version {ver} fixes the memory leak in the export job.",
    "Batch {n6} failed validation: {n3} rows had an empty amount column.",
    "The pallet weighs {n3} kg and measures 120 x 80 x {n3} cm.",
    "The {tool} integration stopped syncing after the upgrade to {ver}.",
    "Export the report from {tool} and attach it to the ticket.",
    "We are moving our dashboards from {tool} to {tool2} next quarter.",
    "Can you write a {tool} automation that closes stale tickets after {n2} days?",
    "Our {tool} licence renewal is due in {month}; the quote is ${amt}k.",
    "Single sign-on through {tool} fails for users in the {team} group.",
]

# PERSON templates the recogniser's rules were not written against: committed
# before the context-cue rules (see bench/RESULTS.md), used only for a separate
# held-out recall figure, never for tuning.
HELDOUT_PERSON_TEMPLATES = [
    "Our driver, {v}, could not find the loading dock.",
    "Is {v} still the point of contact for the Berlin office?",
    "The invoice is addressed to {v} but the company name is wrong.",
    "{v} from procurement wants an updated quote.",
    "We received a complaint from {v} about the late delivery.",
    "Please add {v} as a second user on the account.",
    "Last week {v} reported the same error on the mobile app.",
    "The parcel was signed for by {v} at the front desk.",
    "Yesterday's meeting with {v} went well.",
    "Can someone reply to {v} before the end of the day?",
    "The contract lists {v} as the legal representative.",
    "Give {v} access to the shared drive, please.",
    "As discussed with {v}, we will extend the trial.",
    "Greetings from {v} and the rest of the logistics team.",
    "Let {v} know when the replacement ships.",
    "The new hire, {v}, needs a laptop by Monday.",
]

# PERSON templates written blind: by a helper that was shown neither the
# recogniser nor the other templates, after the context-cue rules were written.
# Measured once blind (0.967 pooled over five seeds), then used to tune the
# rules (0.975): a development set from then on.
BLIND_PERSON_TEMPLATES = [
    'Can you reset the VPN password for {v}? They are locked out again.',
    '{v} from accounts payable says the March invoice was paid twice.',
    'Please forward the shipping manifest to {v} before the truck leaves at noon.',
    'I spoke with {v} this morning and the refund has been approved.',
    'Thanks for your help with the onboarding paperwork. Best regards, {v}',
    'Our new regional manager, {v}, will need access to the sales dashboard starting Monday.',
    'Who approved the expense report submitted by {v} last week?',
    'The laptop assigned to {v} keeps crashing after the latest Windows update.',
    'Schedule a call with {v} and the warehouse team for Thursday afternoon.',
    'According to {v}, the pallet was already damaged before it reached the loading dock.',
    'Has anyone heard back from {v} about the contract renewal?',
    'Attendees for the quarterly review: the finance lead, {v}, and two people from procurement.',
    'Could you draft a polite reply to {v} explaining that the order is delayed by three days?',
    'The customer on line two is {v}, and they want to escalate the billing dispute.',
    'Please add {v} to the payroll distribution list.',
    "I'm out of office until Friday, so for urgent HR questions please contact {v} instead.",
    'Ticket #4821 was reassigned to {v} because the original agent is on leave.',
    'Does {v} still have admin rights on the CRM, or were they revoked after the reorg?',
    'Summarize this email thread for {v}, who just joined the project.',
    'When {v} tried to log in, the system said the account was disabled.',
    'Per our conversation, {v} will handle the customs clearance for the Rotterdam shipment.',
    'Hi team, quick update from {v}: the price list for Q3 is now final.',
    'Write a short performance review summary based on the notes I took about {v}.',
    'Between {v} and the vendor, nobody seems to know who signed off on the discount.',
    "Can you check whether the reimbursement for {v} went out in yesterday's payment batch?",
    'Sent on behalf of {v}, Senior Logistics Coordinator',
    'The sales lead was originally owned by {v}, but it should now go to the enterprise team.',
    'Remind {v} that the mandatory security training is due by the end of the month.',
    'Is it okay if {v} works remotely next week while the office is being renovated?',
    'Special thanks to {v} for reporting the email outage so quickly this morning.',
]

# A second blind set, written by another such helper while the first was used
# for tuning; never looked at for tuning. The honest recall figure.
BLIND2_PERSON_TEMPLATES = [
    'Can you reset the VPN password for {v} before the morning shift starts?',
    '{v} called again about the duplicate charge on the March invoice.',
    'Please forward the signed NDA to {v} in legal by end of day.',
    "Ticket escalated: the laptop assigned to {v} won't boot after the latest update.",
    "Hi team, {v} will be covering the front desk while I'm at the dentist.",
    'Patient name: {v}. Reason for visit: follow-up on blood pressure medication.',
    'Thanks for your patience, and let me know if anything else comes up. Best regards, {v}',
    'Draft a polite reply to {v} explaining that the refund will take 5 to 7 business days.',
    'Has anyone heard back from {v} about the shipment stuck in customs?',
    'Our new account manager, {v}, starts on Monday and will need access to the CRM.',
    'The parents of {v} asked for a meeting to discuss the midterm grades.',
    'I spoke with {v} this morning and they agreed to renew the contract for another year.',
    'Who approved the expense report submitted by {v} last Friday?',
    'Onboarding checklist for {v}: laptop, badge, email account, payroll setup.',
    'Please add {v} to the distribution list for the weekly logistics update.',
    'Summarize the complaint {v} filed about the late delivery and suggest next steps.',
    'According to {v}, the pallet was damaged before it left the warehouse.',
    'Employee: {v} | Department: Finance | Leave requested: 3 days',
    'Does {v} still need a wheelchair accessible room for the appointment on Thursday?',
    'Meeting notes: {v}, the procurement lead and I reviewed the vendor quotes and picked the cheaper option.',
    'Can you check whether {v} has completed the mandatory compliance training?',
    'The package was signed for by {v} at the reception desk at 2:14 pm.',
    'Remind {v} that the quarterly tax filing is due next Tuesday.',
    'Write a short thank-you email to {v} for helping us close the deal with the distributor.',
    'Unfortunately {v} is out sick today, so the client demo has been moved to Wednesday.',
    'Customer {v} reports that the mobile app crashes every time they try to upload a receipt.',
    "I'm cc'ing {v}, who handles billing disputes for the northern region.",
    'Between {v} and the night shift supervisor, someone should have logged the temperature readings.',
    'Is it okay if {v} joins the call late? Their flight lands at noon.',
    'Attached is the performance review for {v}; please sign and return it to HR.',
    'Per our conversation, {v} will send over the updated purchase order tomorrow.',
    'Lead owner changed to {v} after the territory reassignment.',
    'Could you translate this discharge summary into plain language for {v} and the family?',
    'Students who need extra time on the exam should contact {v} in the accessibility office.',
    'Just a heads up, {v} mentioned the printer on the third floor is jammed again.',
    'Sorry for the delay, I was waiting on {v} to confirm the delivery address.',
    'Grant {v} read-only access to the shared finance folder until the audit is finished.',
    'Interview scheduled with {v} for the warehouse coordinator position at 10 am.',
    'Why was {v} charged twice for the same consultation?',
    'The tenant, {v}, disputes the late fee and claims the rent was paid on time.',
]

SYSTEM_PROMPTS = [
    "You are a helpful customer support assistant for an online retailer.",
    "You are an internal IT helpdesk assistant. Answer concisely.",
    "You are a finance operations assistant. Be precise with numbers.",
    "You help engineers debug their deployments. Prefer concrete commands.",
    "You are a friendly assistant that drafts business emails.",
    "You answer questions about company policies and procedures.",
]


class Generator:
    """Builds records, labels and clean messages from one seed."""

    def __init__(self, seed: int = 1234, templates: dict[str, list[str]] | None = None) -> None:
        self.rng = random.Random(seed)
        self.values = Values(self.rng)
        self.templates = templates or {}  # replaces TEMPLATES per type

    def person_corpus(self, n_records: int) -> tuple[list[dict], list[Label]]:
        """Records of one user message each with one planted PERSON (and 1-3 clean sentences)."""
        records: list[dict] = []
        labels: list[Label] = []
        for i in range(n_records):
            records.append({"messages": [{"role": "user", "content": self.message(i, "messages[0].content",
                                                                                  ["PERSON"], labels)}]})
        return records, labels

    def value(self, entity_type: str) -> tuple[str, str]:
        if entity_type == "UK_NHS":
            return _nhs(self.rng), ""
        v = getattr(self.values, VALUE_OF[entity_type])()
        return v if isinstance(v, tuple) else (v, "")

    def clean_sentence(self) -> str:
        r = self.rng
        t = r.choice(CLEAN)
        prod = r.choice(PRODUCTS)
        return t.format(
            q=r.randint(1, 4), pct=r.randint(2, 60), amt=r.randint(1, 900), n1=r.randint(2, 9),
            n2=r.randint(10, 99), n3=r.randint(100, 999), n4=r.randint(1000, 9999), n5=r.randint(10000, 99999),
            n6=r.randint(100000, 999999), n10=r.randint(10**9, 10**10 - 1), d=r.randint(0, 9),
            team=r.choice(TEAMS), day=r.choice(WEEKDAYS), month=r.choice(MONTHS), dd=r.randint(1, 28),
            hh=f"{r.randint(7, 19):02d}", mm=r.choice(["00", "15", "30", "45"]), prod=prod,
            prod_l=prod.lower(), tool=r.choice(TOOLS), tool2=r.choice(TOOLS), prodU=prod.upper()[:3], ver=f"{r.randint(1, 9)}.{r.randint(0, 30)}.{r.randint(0, 20)}",
            sha=r.randbytes(20).hex(), sha64=r.randbytes(32).hex(), uuid=self._uuid(), yy=r.randint(24, 27),
            yyyy=r.randint(2019, 2026), L=r.choice(string.ascii_uppercase),
        )

    def _uuid(self) -> str:
        h = self.rng.randbytes(16).hex()
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

    def message(self, record: int, field: str, plant: list[str], labels: list[Label]) -> str:
        parts: list[str] = []
        n_clean = self.rng.randint(1, 3)
        slots = ["clean"] * n_clean + plant
        self.rng.shuffle(slots)
        text = ""
        for slot in slots:
            sep = "" if not text else self.rng.choice([" ", " ", "\n", "\n\n"])
            if slot == "clean":
                text += sep + self.clean_sentence()
                continue
            template = self.rng.choice(self.templates.get(slot) or TEMPLATES[slot])
            value, locale = self.value(slot)
            before, after = template.split("{v}")
            start = len(text) + len(sep) + len(before)
            text += sep + before + value + after
            labels.append(Label(record, field, slot, start, start + len(value), locale))
        del parts
        return text

    def corpus(self, n_records: int, n_clean: int) -> Corpus:
        records: list[dict] = []
        labels: list[Label] = []
        # Cycle through the types so every one is planted about equally often.
        queue: list[str] = []
        for i in range(n_records):
            messages = [{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)}]
            for turn in range(self.rng.choice([1, 1, 2])):
                for role in ("user", "assistant"):
                    k = self.rng.choice([0, 1, 1, 2])
                    plant = []
                    for _ in range(k):
                        if not queue:
                            queue = PLANTED_TYPES[:]
                            self.rng.shuffle(queue)
                        plant.append(queue.pop())
                    field = f"messages[{len(messages)}].content"
                    messages.append({"role": role, "content": self.message(i, field, plant, labels)})
            records.append({"messages": messages})
        clean = []
        for _ in range(n_clean):
            text = " ".join(self.clean_sentence() for _ in range(self.rng.randint(1, 4)))
            clean.append({"messages": [{"role": "user", "content": text}]})
        return Corpus(records=records, labels=labels, clean_records=clean)


# --------------------------------------------------------------------------- business text (precision)

# Business chat with no personal data at all, made of what proprietary text is made of: codenames
# (many of them words that are also given names or surnames), products and their versions and
# editions, projects, teams, components, invented customer companies, places and months. Any
# redaction or block here is a false one. The PERSON context rules were tuned on these templates
# (see bench/RESULTS.md); bench/business_blind.py holds messages written without reading the rules.
CODENAMES = ["Harbor", "Falcon", "Willow", "Hazel", "Hunter", "Carter", "Marshall", "Aurora", "Delta", "Sierra",
             "Raven", "Velvet Anchor", "Amber Tundra", "Rusty Lantern", "Hollow Maple", "Juniper", "Mercury",
             "Phoenix", "Kestrel", "Tango", "Orion", "Maverick", "Sterling", "Everest", "Cobalt", "Nova",
             "Quill", "Silver Fox", "Blue Heron", "Iron Gate", "Morgan", "Jasper", "Ruby", "Sage", "Winston"]
COMPONENTS = ["ingestion service", "billing API", "search cluster", "auth gateway", "data lake", "ETL pipeline",
              "mobile app", "admin console", "recommendation engine", "payments backend", "reporting dashboard"]
COMPANIES = ["Brightwater Logistics", "Kessler Dynamics", "Northwind Traders", "Halvorsen Marine", "Calder & Price",
             "Meridian Health", "Oakridge Capital", "Fairbanks Retail", "Lindqvist Foods", "Ashford Analytics"]
PLACES = ["Berlin", "Dublin", "Singapore", "Austin", "Lisbon", "Toronto", "Warsaw", "Osaka", "eu-west-1",
          "the Frankfurt data centre", "the Leeds office"]

BUSINESS_TEMPLATES: list[str] = [
    "What is the internal codename of project {code}?",
    "The codename of project {code} is {code2}.",
    "Project {code} ships in {month} with the new {component}.",
    "The {code} team owns the {component}.",
    "We migrated from {code} to {code2} last quarter.",
    "{code} {ver} fixes the export bug in the {component}.",
    "{code} Pro is the premium tier; {code2} Lite is the free one.",
    "The {code} cluster in {place} is at {pct}% capacity.",
    "{code}'s SDK needs an update before the {month} release.",
    "Is the {code} migration still on track for {day}?",
    "{company} renewed their {code} licence for another {n1} years.",
    "The {code} rollout to {company} is blocked on the {component}.",
    "Codename {code} replaces {code2} in {month}.",
    "Roadmap: {code} {ver} in Q{q}, then {code2} in Q{q2}.",
    "The {code} service returned 503s in {place} between {hh}:{mm} and {hh2}:{mm}.",
    "Which customers are still on {code} {ver}?",
    "{company} asked for a demo of {code} at their {place} office.",
    "Move the {component} from the {code} environment to {code2}.",
    "{code} is the internal name for the {component} rewrite.",
    "The {team} team presents the {code} results on {day}.",
    "Sunset plan: {code} goes read-only in {month}, {code2} takes over.",
    "Incident {n4}: {code} failover to {place} took {n2} minutes.",
    "How do I request access to the {code} repository?",
    "{code} and {code2} share the same {component}.",
]


def business_messages(seed: int, n: int) -> list[str]:
    """``n`` business messages from :data:`BUSINESS_TEMPLATES` (one to three sentences each)."""
    rng = random.Random(seed)

    def sentence() -> str:
        code, code2 = rng.sample(CODENAMES, 2)
        return rng.choice(BUSINESS_TEMPLATES).format(
            code=code, code2=code2, component=rng.choice(COMPONENTS), company=rng.choice(COMPANIES),
            place=rng.choice(PLACES), month=rng.choice(MONTHS), day=rng.choice(WEEKDAYS), team=rng.choice(TEAMS),
            ver=f"{rng.randint(1, 9)}.{rng.randint(0, 12)}", pct=rng.randint(20, 95), n1=rng.randint(2, 5),
            n2=rng.randint(10, 59), n4=rng.randint(1000, 9999), q=rng.randint(1, 2), q2=rng.randint(3, 4),
            hh=f"{rng.randint(0, 11):02d}", hh2=f"{rng.randint(12, 23):02d}", mm=rng.choice(["00", "15", "30", "45"]))

    return [" ".join(sentence() for _ in range(rng.randint(1, 3))) for _ in range(n)]
