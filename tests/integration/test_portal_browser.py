"""The portal driven in headless Chromium (Debian's package) with Playwright, against `appliance serve`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.cli_helpers import APPLIANCE, Server, cli_env, run_cli
from tests.conftest import REPO, free_port
from tests.timing import ms

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "portal"
PASSWORD = "correct horse battery staple"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)")


def _passwd(home: Path, user: str) -> None:
    subprocess.run([str(APPLIANCE), "users", "passwd", user, "--password-stdin"], input=PASSWORD + "\n", text=True,
                   env=cli_env(home), check=True, capture_output=True)


@pytest.fixture(scope="module")
def portal_server(tmp_path_factory):
    from appliance.modelstore import build_tiny_causal_lm

    tmp = tmp_path_factory.mktemp("portal")
    home = tmp / "var"
    run_cli(home, "init")
    run_cli(home, "models", "import", str(build_tiny_causal_lm(tmp / "tiny", seed=0)), "--name", "tiny-llama")
    for project in ("acme", "globex"):
        run_cli(home, "projects", "add", project)
    run_cli(home, "users", "add", "olivia", "--role", "data-owner", "--project", "acme")
    for role in ("trainer", "consumer"):
        run_cli(home, "users", "grant", "olivia", "--role", role, "--project", "acme")
    run_cli(home, "users", "add", "gus", "--role", "data-owner", "--project", "globex")
    run_cli(home, "users", "add", "audrey", "--role", "auditor")
    for user in ("olivia", "gus", "audrey"):
        _passwd(home, user)
    server = Server(home, free_port())
    server.wait_healthy()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def login(browser, server, user: str):
    context = browser.new_context(base_url=server.base_url)
    context.set_default_timeout(ms(30))  # Playwright's 30 s, stretched on a loaded machine
    page = context.new_page()
    page.goto("/datasets")
    assert "/login" in page.url
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/datasets$"))
    return context, page


def switch_role(page, label: str) -> None:
    # The select submits its form on change: wait for that navigation, not merely for an idle network
    # (a later goto could otherwise race the switch and land in the old role; seen once under load).
    with page.expect_navigation():
        page.get_by_label(re.compile("acting as")).select_option(label=label)
    page.wait_for_load_state("networkidle")


def test_upload_scan_train_and_audit_in_the_browser(portal_server, browser, tmp_path):
    context, page = login(browser, portal_server, "olivia")
    shot(page, "01-datasets")
    records = [{"messages": [{"role": "user", "content": f"What colour is box {i}?"},
                             {"role": "assistant", "content": f"Box {i} is blue. Contact jane.doe@example.com"}]}
               for i in range(24)]
    data = tmp_path / "boxes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    page.set_input_files("#file", str(data))
    page.get_by_role("button", name="Upload and scan").click()
    page.wait_for_url(re.compile(r"/datasets/file-"))
    file_id = page.url.rsplit("/", 1)[1]
    assert page.get_by_role("heading", name="Scan report").is_visible()
    assert "accepted" in page.inner_text("main")
    assert "EMAIL_ADDRESS" in page.inner_text("main") and "<EMAIL_ADDRESS>" in page.inner_text("main")
    assert "jane.doe@example.com" not in page.content()
    shot(page, "02-scan-report")

    switch_role(page, "trainer @ acme")
    page.goto("/jobs/new")
    page.locator("#model-advice summary").click()  # the starting point, with the memory plan's reason
    assert re.search(r"tiny-llama: Start with LoRA: it fits .*\([\d.]+ GiB predicted",
                     page.inner_text("#model-advice"))
    page.get_by_label("Base model").select_option("tiny-llama")
    page.get_by_label("Training dataset").select_option(file_id)
    page.get_by_label("n_epochs").fill("-3")
    page.get_by_label("lora_dropout").fill("0.9")
    page.get_by_label("Suffix").fill("my model!")
    page.get_by_role("button", name="Start training").click()
    # Checked in the browser, all fields at once, with the server's own ranges: nothing was sent.
    assert "from 1 to 100; got -3" in page.inner_text("#hp-n_epochs-err")  # shown next to the field
    assert "from 0 to 0.5; got 0.9" in page.inner_text("#hp-lora_dropout-err")
    summary = page.locator("#form-summary")
    assert "must be 1-64 characters of letters, digits, '.', '_' or '-'; got my model!" in page.inner_text("#suffix-err")
    assert summary.is_visible() and summary.inner_text().startswith("3 fields need fixing:")
    assert "/jobs/new" in page.url
    shot(page, "03-job-form-error")
    page.get_by_label("lora_dropout").fill("auto")
    page.get_by_label("Suffix").fill("")
    page.get_by_label("n_epochs").fill("2")
    page.get_by_label("batch_size").fill("4")
    page.get_by_label("learning_rate").fill("0.005")
    page.get_by_label("lora_r").fill("4")
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_function("() => document.getElementById('job-status').textContent.trim() === 'succeeded'",
                           timeout=ms(240))
    assert page.locator("#progress").get_attribute("value") == "100"
    assert page.locator("svg[aria-label='loss by step'] polyline").count() >= 1
    shot(page, "04-job-succeeded")
    model = page.inner_text("#ft-model")
    assert model.startswith("ft:tiny-llama:acme::")
    assert re.fullmatch(r"· \d+ (s|min) elapsed", page.inner_text("#job-timing"))  # no time left once done
    assert re.match(r"Planned peak\s+[\d.]+ GiB on cpu", page.inner_text("#memory"))  # issue 20's compute.plan
    events = page.inner_text("#job-events")  # every progress line carries its number
    assert re.search(r"Step 12/12: training loss \d+\.\d{4}", events)
    assert re.search(r"validation loss before training \d+\.\d{4}", events)
    # Sample generations hold validation text: a trainer sees that they exist, a data owner reads them.
    assert "validation prompts answered before and after training" in page.inner_text("#samples-note")
    switch_role(page, "data-owner @ acme")
    page.goto(f"/jobs/{job_id}")
    samples = page.locator("#samples")
    assert samples.locator("tbody tr").count() >= 1 and "What colour is box" in samples.inner_text()
    assert "Box " in samples.locator("tbody tr").first.locator("td").nth(1).inner_text()  # the reference answer
    shot(page, "04c-job-sample-generations")
    switch_role(page, "trainer @ acme")

    page.goto("/jobs")  # the list: status, progress, elapsed time (and time left while running)
    cells = [c.strip() for c in page.locator("#jobs tbody tr").first.locator("td").all_inner_texts()]
    assert cells[0] == job_id and cells[3] == "succeeded"
    assert re.fullmatch(r"(\d+)/\1", cells[4]) and re.fullmatch(r"\d+ (s|min)", cells[5]) and cells[6] == ""
    shot(page, "04b-jobs-list")

    page.goto("/models")
    assert model in page.inner_text("main") and "verified" in page.inner_text("main")
    # the base model's card: context, licence (the tiny model's source states none) and what "auto" jobs would need
    card = page.locator("#base-models tbody tr").filter(has_text="tiny-llama").inner_text()
    assert re.search(r"[\d,]+ tokens", card) and "not stated" in card
    assert re.search(r"LoRA: [\d.]+ GiB", card) and re.search(r"QLoRA: [\d.]+ GiB", card)
    assert "Start with LoRA: it fits" in card
    shot(page, "05-models")

    switch_role(page, "consumer @ acme")
    page.goto("/playground")
    page.get_by_label("Model").select_option(model)
    assert page.get_by_label("Max tokens").input_value() == "256"  # long enough not to cut answers off
    page.get_by_label("System prompt").fill("You answer questions about boxes.")
    requests = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/playground/chat") else None)
    page.get_by_label("Message").fill("What colour is box 3?")
    page.get_by_role("button", name="Send").click()
    page.wait_for_selector("#chat-log .msg[data-done='1']", timeout=ms(60))
    answer = page.locator("#chat-log .msg").nth(1).inner_text()
    assert answer.startswith(f"assistant ({model}):") and "error" not in answer.lower()  # each answer names its model
    assert page.get_by_role("button", name="Send").is_enabled() and page.inner_text("#chat-status") == ""
    assert requests[0]["messages"] == [{"role": "system", "content": "You answer questions about boxes."},
                                       {"role": "user", "content": "What colour is box 3?"}]
    shot(page, "06-playground")
    # Side by side: the fine-tune starts compared with its base; each keeps its own conversation.
    page.goto(f"/playground?model={model}")
    assert page.get_by_label("Compare with").input_value() == "tiny-llama"
    requests.clear()
    page.get_by_label("Message").fill("And box 4?")
    page.get_by_role("button", name="Send").click()
    page.locator("#chat-log .exchange.grid2 .msg[data-done='1']").nth(1).wait_for(timeout=ms(120))
    pair = page.locator("#chat-log .exchange.grid2 .msg")
    assert pair.nth(0).inner_text().startswith(f"assistant ({model}):")
    assert pair.nth(1).inner_text().startswith("assistant (tiny-llama):")
    assert [r["model"] for r in requests] == [model, "tiny-llama"]
    shot(page, "06b-playground-side-by-side")
    # Stop: an answer still on its way is abandoned, marked, and Send works again. The request is held in the
    # browser until Stop is pressed, so the tiny model cannot finish first.
    page.get_by_label("Compare with").select_option("")
    held = []
    page.route("**/playground/chat", lambda route: held.append(route))
    page.get_by_label("Message").fill("Tell me everything about boxes.")
    page.get_by_role("button", name="Send").click()
    assert page.inner_text("#chat-status") == "generating…" and page.get_by_role("button", name="Send").is_disabled()
    page.get_by_role("button", name="Stop").click()
    page.locator("#chat-log .exchange").last.locator(".msg[data-done='1']").wait_for(timeout=ms(30))
    assert page.locator("#chat-log .exchange").last.inner_text().endswith("(stopped)") and len(held) == 1
    assert page.get_by_role("button", name="Send").is_enabled() and page.get_by_role("button", name="Stop").is_disabled()
    page.unroute("**/playground/chat")
    page.get_by_role("button", name="Clear the conversation").click()
    assert page.locator("#chat-log .msg").count() == 0
    context.close()

    context, page = login(browser, portal_server, "audrey")
    page.goto("/audit")
    text = page.inner_text("#events")
    for action in ("file.upload", "job.create", "job.succeed", "adapter.publish", "inference.chat", "portal.login"):
        assert action in text, action
    assert page.inner_text("#chain-status") == "verified"
    shot(page, "07-audit")
    page.goto(f"/audit?action=job.create")
    assert job_id in page.inner_text("#events")
    context.close()


def test_a_file_with_several_bad_lines_shows_them_all_in_plain_words(portal_server, browser, tmp_path):
    context, page = login(browser, portal_server, "olivia")
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [json.dumps(good), '{"messages": [', json.dumps({"messages": [{"role": "user", "content": "q"}]}),
             json.dumps(good), json.dumps({"prompt": "p"})]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    page.set_input_files("#file", str(data))
    page.get_by_role("button", name="Upload and scan").click()
    result = page.locator("#upload-result")
    result.locator("li").first.wait_for()
    assert result.inner_text().startswith("3 lines are not valid records:")
    items = result.locator("li").all_inner_texts()
    assert len(items) == 3 and [i.split(" ", 2)[1].rstrip(":") for i in items] == ["2", "3", "5"], items
    assert "needs an `assistant` message" in items[1]
    assert "[" not in result.inner_text()  # no internal parameter suffixes
    shot(page, "01b-upload-bad-lines")
    # Nothing of it was kept, but its owner finds it listed with the reason.
    page.goto("/datasets")
    row = page.locator("#rejected tbody tr").first
    assert "bad.jsonl" in row.inner_text() and "3 lines are not valid records" in row.inner_text()
    shot(page, "01c-refused-uploads")
    context.close()


def test_unknown_pages_get_an_html_404_logout_asks_first_and_there_is_a_favicon(portal_server, browser):
    context, page = login(browser, portal_server, "olivia")
    resp = page.goto("/no/such/page")
    assert resp.status == 404 and page.get_by_role("heading", name="Not found").is_visible()
    assert "There is no page at this address." in page.inner_text("main")
    shot(page, "09-not-found")
    assert page.locator("link[rel=icon]").get_attribute("href") == "/static/favicon.svg"
    assert page.request.get("/static/favicon.svg").headers["content-type"].startswith("image/svg+xml")
    api = page.request.get("/v1/no-such-endpoint")  # the APIs keep answering JSON
    assert api.status == 404 and api.json()["error"]["code"] == "not_found"
    page.goto("/datasets")
    seen: list[str] = []
    page.once("dialog", lambda d: (seen.append(d.message), d.dismiss()))
    page.get_by_role("button", name="Log out").click()
    assert seen == ["Log out of the appliance?"] and "/datasets" in page.url  # dismissed: still logged in
    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        page.get_by_role("button", name="Log out").click()
    page.goto("/datasets")
    assert "/login" in page.url
    context.close()


def test_other_projects_cannot_see_or_reach_anything(portal_server, browser):
    context, page = login(browser, portal_server, "gus")
    assert "boxes.jsonl" not in page.inner_text("main")
    # Find olivia's file id through the server and try to reach it directly.
    server_home = portal_server.home
    owner_token = run_cli(server_home, "tokens", "create", "--user", "olivia", "--role", "data-owner",
                          "--project", "acme").stdout.strip()
    files = httpx.get(portal_server.base_url + "/v1/files", headers={"Authorization": f"Bearer {owner_token}"}).json()
    for f in files["data"]:
        response = page.goto(f"/datasets/{f['id']}")
        assert response.status == 404
    jobs_token = run_cli(server_home, "tokens", "create", "--user", "olivia", "--role", "trainer",
                         "--project", "acme").stdout.strip()
    jobs = httpx.get(portal_server.base_url + "/v1/fine_tuning/jobs",
                     headers={"Authorization": f"Bearer {jobs_token}"}).json()["data"]
    for j in jobs:
        assert page.goto(f"/jobs/{j['id']}").status in (403, 404)
    shot(page, "08-other-project")
    context.close()


def test_form_post_without_csrf_token_is_refused(portal_server, browser):
    context, page = login(browser, portal_server, "olivia")
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    client = httpx.Client(base_url=portal_server.base_url, cookies=cookies)
    refused = client.post("/role", data={"binding": "1"}, headers={"Accept": "text/html"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    upload = client.post("/datasets/upload", files={"file": ("x.jsonl", b'{"text": "x"}\n')},
                         data={"purpose": "fine-tune"})
    assert upload.status_code == 403
    # The same request with the page's token goes through.
    page.goto("/datasets")
    token = page.locator("#upload-form").get_attribute("data-csrf")
    ok = client.post("/role", data={"binding": "1", "csrf_token": token}, follow_redirects=False)
    assert ok.status_code in (303, 400)  # accepted by the CSRF check (binding may not be the user's)
    context.close()


def test_review_step_marks_codenames_and_rescans(portal_server, browser, tmp_path):
    """Between upload and training: values grouped, revealed on request (audited), marked, file re-scanned."""
    context, page = login(browser, portal_server, "olivia")
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in [
        ("Who runs the payments rewrite?", "Jonas owns the payments rewrite until March."),
        ("What replaced the billing cron?", "Jonas replaced the billing cron last quarter."),
        ("Who approved the refund?", "Maria Lopez approved the refund on Tuesday."),
    ]]
    data = tmp_path / "codenames.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    page.goto("/datasets")
    page.set_input_files("#file", str(data))
    page.get_by_role("button", name="Upload and scan").click()
    page.wait_for_url(re.compile(r"/datasets/file-"))
    file_id = page.url.rsplit("/", 1)[1]
    assert page.get_by_role("heading", name="Review before training").is_visible()
    rows = page.locator("#review-groups tbody tr")
    assert rows.count() == 2 and "Jonas" not in page.content()  # groups by id until revealed
    page.locator("#reveal-values").click()
    page.wait_for_url(re.compile(r"reveal=1"))
    table = page.inner_text("#review-groups")
    assert "Jonas" in table and "Maria Lopez" in table and "[[Jonas]] owns the payments rewrite" in table
    shot(page, "09-review")
    page.get_by_label("Mark Jonas as not personal data").check()
    page.get_by_role("button", name="Add the checked values to the glossary and re-scan").click()
    page.wait_for_url(re.compile(r"revision=2"))
    assert "1 value added to the project's glossary" in page.inner_text("main")
    preview = " ".join(page.locator("pre").all_inner_texts())
    assert "Jonas owns the payments rewrite" in preview and "Maria Lopez" not in preview and "<PERSON>" in preview
    assert "in glossary" in page.inner_text("#review-groups")
    shot(page, "10-reviewed")
    context.close()

    context, page = login(browser, portal_server, "audrey")
    page.goto("/audit")
    events = page.inner_text("#events")
    assert "file.scan_reveal" in events and "glossary.add" in events and "file.rescan" in events
    context.close()


def _sideways(page) -> int:
    """How far the page scrolls sideways, in CSS pixels (0: it fits the screen's width)."""
    return page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")


def test_every_page_fits_a_375_px_phone_screen(portal_server, browser):
    """At 375 px no page scrolls sideways: wide tables scroll inside their own container."""
    wide: dict[str, int] = {}
    for user, role in (("olivia", "data-owner @ acme"), ("olivia", "trainer @ acme"), ("audrey", None)):
        context = browser.new_context(base_url=portal_server.base_url, viewport={"width": 375, "height": 740})
        context.set_default_timeout(ms(30))
        page = context.new_page()
        page.goto("/login")
        page.get_by_label("Username").fill(user)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_load_state("networkidle")
        if role and role not in page.inner_text("header"):
            switch_role(page, role)
        paths = ["/", "/login?x=1", "/no/such/page"]
        if user == "olivia":
            page.goto("/datasets")
            first = page.locator("a[href^='/datasets/file-']").first
            paths += ["/datasets", first.get_attribute("href") if first.count() else "/datasets", "/models",
                      "/playground", "/jobs", "/jobs/new"]
            page.goto("/jobs")
            job = page.locator("a[href^='/jobs/ftjob-']").first
            if job.count():
                paths.append(job.get_attribute("href"))
        else:
            paths += ["/audit", "/audit?action=job.create", "/models", "/audit/report",
                      "/audit/report?from=2026-01-01&to=2100-01-01"]
        for path in paths:
            page.goto(path)
            page.wait_for_load_state("networkidle")
            if (over := _sideways(page)) > 0:
                wide[f"{user} {path}"] = over
        shot(page, f"10-phone-{user}")
        context.close()
    assert not wide, f"pages wider than a 375 px screen (px of sideways scroll): {wide}"


def test_every_finding_and_every_record_with_findings_is_reachable_masked(portal_server, browser, tmp_path):
    """Findings page by page, each with the stored text around it (every finding masked as its type), and the
    stored records with findings one click away: nothing is out of reach, no value is shown."""
    context, page = login(browser, portal_server, "olivia")
    records = []
    for i in range(130):
        reply = f"Ticket {i} is closed." + (f" Reach me at agent{i}@acme-corp.example or 555-0{i:03d}." if i >= 5 else "")
        records.append({"messages": [{"role": "user", "content": f"Status of ticket {i}?"},
                                     {"role": "assistant", "content": reply}]})
    data = tmp_path / "tickets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    page.goto("/datasets")
    page.set_input_files("#file", str(data))
    page.get_by_role("button", name="Upload and scan").click()
    page.wait_for_url(re.compile(r"/datasets/file-"))
    table = page.locator("#findings-table")
    assert table.locator("tbody tr").count() == 100  # page 1 of the findings
    first = table.locator("tbody tr").first.inner_text()
    assert "Ticket 5 is closed. Reach me at ⟦EMAIL_ADDRESS⟧" in first
    assert "Line 1" in page.inner_text("#preview-records") and "Line 6" not in page.inner_text("#preview-records")
    page.locator("#next-findings").click()
    page.wait_for_url(re.compile(r"findings_page=2"))
    nav = page.inner_text("#findings-pages")
    assert "page 2 of 3" in nav and "Findings 101–200 of 250" in nav  # an e-mail and a phone number per record
    second = page.inner_text("#findings-table")
    assert "Ticket 60 is closed. Reach me at ⟦EMAIL_ADDRESS⟧ or <PHONE_NUMBER>" in second
    page.locator("#show-records-with-findings").click()
    page.wait_for_url(re.compile(r"records=findings"))
    shown = page.inner_text("#preview-records")
    assert "Line 56" in shown and "Line 105" in shown and "Line 130" not in shown and "Line 1\n" not in shown
    assert "<EMAIL_ADDRESS>" in shown
    assert "records with findings" in page.inner_text("#preview-filter")
    content = page.content()
    assert not any(f"agent{i}@acme-corp.example" in content for i in range(130))  # values never reach the page
    shot(page, "14-findings-page-2-with-context")
    context.close()


def test_auditor_generates_the_report_in_the_portal_as_a_page_and_a_pdf(portal_server, browser):
    """No API token: the session's report, linked from the auditor's home, readable as a page with sections and
    tables, downloadable as a PDF document; a bad period is a message naming `from`/`to`, as the CLI does."""
    import io

    from pypdf import PdfReader

    context, page = login(browser, portal_server, "audrey")
    page.goto("/")
    page.locator("#home-report").click()
    page.wait_for_url(re.compile(r"/audit/report$"))
    page.get_by_role("button", name="Generate").click()
    page.wait_for_url(re.compile(r"/audit/report\?from="))
    report = page.locator("#report")
    assert "Hash chain: verified" in report.inner_text()
    for title in ("Datasets", "Rejected uploads", "Models and their lineage", "Access denials", "Deletions"):
        assert report.get_by_role("heading", name=re.compile(f"^{title}")).count() == 1, title
    assert "{" not in report.locator("table").first.inner_text()  # readable values, not JSON in cells
    shot(page, "15-audit-report")
    with page.expect_download() as download:
        page.locator("#report-downloads").get_by_role("link", name="PDF").click()
    pdf = download.value.path().read_bytes()
    text = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)
    assert pdf.startswith(b"%PDF") and "Appliance audit report" in text and "Hash chain" in text
    assert "Access denials" in text and "Datasets" in text
    page.goto("/audit/report?from=2026-12-31&to=2026-01-01")
    assert "`to` must be after `from`" in page.inner_text("main")
    page.goto("/audit/report?from=yesterday&to=2026-01-01")
    assert "`from` must be a date or time" in page.inner_text("main")
    context.close()


def test_quality_report_beside_the_scan_with_duplicates_revealed_and_leakage(portal_server, browser, tmp_path):
    """The quality report at upload: tokens with the imported model's tokenizer, advice, duplicates revealed on
    request (audited), and the overlap with a validation file."""
    context, page = login(browser, portal_server, "olivia")

    def upload(name: str, pairs: list[tuple[str, str]], max_seq_length: str = "") -> str:
        data = tmp_path / name
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}]}) + "\n"
                                for q, a in pairs))
        page.goto("/datasets")
        page.get_by_label("count tokens with the tokenizer of").select_option("tiny-llama")
        page.get_by_label("and count the records over").fill(max_seq_length)
        page.set_input_files("#file", str(data))
        page.get_by_role("button", name="Upload and scan").click()
        page.wait_for_url(re.compile(r"/datasets/file-"))
        return page.url.rsplit("/", 1)[1]

    valid = upload("valid.jsonl", [("How long does shipping to the islands take?", "About five working days."),
                                   ("Is there a discount for schools this autumn?", "Yes, ten percent.")])
    train = upload("train.jsonl", [("How long does shipping to the islands take?", "About five working days."),
                                   ("Can I change the delivery address after paying?", "Yes, until it ships."),
                                   ("Can I change the delivery address after paying?", "Yes, until it ships."),
                                   ("What colours does the winter jacket come in?", "Navy and olive.")],
                   max_seq_length="12")
    assert page.get_by_role("heading", name="Quality report").is_visible()
    assert "Over max_seq_length 12" in page.inner_text("main")  # the length limit chosen in the form
    assert "tokens with the tokenizer of tiny-llama" in page.inner_text("#quality-counts")
    assert "1 record repeats an earlier one" in page.inner_text("#quality-advice")
    table = page.inner_text("#quality-duplicates")
    assert "2, 3" in table and "delivery address" not in table  # lines only, until revealed
    page.locator("#reveal-duplicates").click()
    page.wait_for_url(re.compile(r"quality_reveal=1"))
    assert "delivery address" in page.inner_text("#quality-duplicates")
    shot(page, "11-quality")
    page.get_by_label("Compare with").select_option(value=valid)
    page.get_by_role("button", name="Check for overlap").click()
    page.wait_for_url(re.compile(rf"compare={valid}"))
    result = page.inner_text("#leakage-result")
    assert result.startswith("1 exact and 0 near copies") and "1 → 1" in result, result
    assert file_id_in(page.url) == train
    context.close()

    context, page = login(browser, portal_server, "audrey")
    page.goto("/audit")
    assert "file.quality_reveal" in page.inner_text("#events")
    context.close()


def file_id_in(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]
