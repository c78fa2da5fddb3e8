"""The portal's image and privacy paths in headless Chromium: image datasets, image jobs, image playground, DP and
canaries on the job form and the job page; the job form without JavaScript."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from appliance.catalog.service import DEMO_IMAGE_MODEL_NAME
from tests.cli_helpers import Server, run_cli
from tests.conftest import free_port
from tests.integration.test_image_jobs import disc, square, zip_of
from tests.integration.test_jobs import ALLOW_EMAIL
from tests.integration.test_portal_browser import (  # noqa: F401  (browser is a fixture)
    CHROMIUM,
    PASSWORD,
    _passwd,
    browser,
    login,
    shot,
)
from tests.integration.test_portal_browser import pytestmark as _needs_chromium
from tests.timing import ms

# Two real trainings behind a browser: run once (on SQLite), not again in the PostgreSQL pass.
pytestmark = [_needs_chromium, pytest.mark.slow]

PROMPT = "a photo of sks disc"


@pytest.fixture(scope="module")
def image_portal(tmp_path_factory):
    """`appliance serve` with the tiny language model and the tiny (random) Stable Diffusion pipeline."""
    from appliance.diffusion.tiny import build_tiny_clip_model, build_tiny_dino_model, build_tiny_sdxl_pipeline
    from appliance.modelstore import build_tiny_causal_lm

    tmp = tmp_path_factory.mktemp("portal-images")
    home = tmp / "var"
    run_cli(home, "init")
    run_cli(home, "models", "import", str(build_tiny_causal_lm(tmp / "tiny", seed=0)), "--name", "tiny-llama")
    run_cli(home, "models", "import", "--demo-images")
    run_cli(home, "models", "import", str(build_tiny_sdxl_pipeline(tmp / "sdxl", seed=0)), "--name", "tiny-sdxl")
    # fidelity evaluators (random: their figures mean nothing, the page's showing them is what is tested)
    run_cli(home, "models", "import", str(build_tiny_clip_model(tmp / "clip", seed=0)), "--name", "tiny-clip")
    run_cli(home, "models", "import", str(build_tiny_dino_model(tmp / "dino", seed=0)), "--name", "tiny-dino")
    run_cli(home, "projects", "add", "acme")
    run_cli(home, "users", "add", "olivia", "--role", "data-owner", "--project", "acme")
    for role in ("trainer", "consumer"):
        run_cli(home, "users", "grant", "olivia", "--role", role, "--project", "acme")
    run_cli(home, "users", "add", "root", "--role", "admin")
    _passwd(home, "olivia")
    admin = run_cli(home, "tokens", "create", "--user", "root", "--role", "admin").stdout.strip()
    server = Server(home, free_port())
    server.wait_healthy()
    # E-mail addresses allowed in training data: the extraction probe has values to try.
    put = httpx.put(server.base_url + "/api/v1/projects/acme/policy", headers={"Authorization": f"Bearer {admin}"},
                    json={"text": ALLOW_EMAIL})
    assert put.status_code == 200, put.text
    yield server
    server.stop()


def upload_in_page(page, path, *, images: bool = False, instance_prompt: str = "") -> str:
    page.goto("/datasets")
    if images:
        page.get_by_label("Images, for image models").check()
        page.get_by_label(re.compile("Instance prompt")).fill(instance_prompt)
    page.set_input_files("#file", str(path))
    page.get_by_role("button", name="Upload and scan").click()
    page.wait_for_url(re.compile(r"/datasets/file-"))
    assert page.get_by_role("heading", name="Scan report").is_visible()
    assert "accepted" in page.inner_text("main")
    return page.url.rsplit("/", 1)[1]


def switch_role(page, label: str) -> None:
    """Act in another role, waiting for the page the switch navigates to (then a goto cannot abort it)."""
    with page.expect_navigation():
        page.get_by_label(re.compile("acting as")).select_option(label=label)


def wait_succeeded(page) -> None:
    page.wait_for_function("() => document.getElementById('job-status').textContent.trim() === 'succeeded'",
                           timeout=ms(180))


def test_image_dataset_job_and_playground_in_the_browser(image_portal, browser, tmp_path):
    context, page = login(browser, image_portal, "olivia")
    archive = tmp_path / "discs.zip"
    archive.write_bytes(zip_of({f"disc{i}.png": disc() for i in range(4)}))
    file_id = upload_in_page(page, archive, images=True, instance_prompt=PROMPT)
    assert "4 records" in page.inner_text("main") and PROMPT in page.inner_text("#archive-info")
    assert "4 × 64x64" in page.inner_text("#archive-info")
    page.wait_for_function("() => [...document.querySelectorAll('#archive-images img')].filter(i => i.complete && "
                           "i.naturalWidth === 64).length === 4")  # the stored, re-encoded images
    shot(page, "images-01-scan-report")
    squares = tmp_path / "squares.zip"  # the data owner's own class images, for prior preservation
    squares.write_bytes(zip_of({f"square{i}.png": square() for i in range(2)}))
    class_id = upload_in_page(page, squares, images=True)

    switch_role(page, "trainer @ acme")
    page.goto("/jobs/new")
    assert page.locator("#job-form").get_attribute("data-kind") == "llm"  # the first model imported
    page.get_by_label("Base model").select_option(DEMO_IMAGE_MODEL_NAME)  # re-renders for an image model
    page.wait_for_selector("#job-form[data-kind='diffusion']")
    assert page.get_by_label("Training dataset").locator("option").all_inner_texts() == [
        f"squares.zip · 2 images · {class_id}", f"discs.zip · 4 images · {file_id}"]  # image datasets only
    page.get_by_label("Training dataset").select_option(file_id)
    page.get_by_label("LoRA on captioned images").check()
    assert not page.get_by_label("Class images for prior preservation").is_visible()  # DreamBooth only
    page.get_by_label("DreamBooth + LoRA").check()
    assert page.get_by_label("rank", exact=True).is_visible()
    assert page.get_by_label("Class images for prior preservation").input_value() == ""  # generated by default
    page.get_by_label("DreamBooth (full UNet)").check()
    assert not page.get_by_label("rank", exact=True).is_visible()  # no rank for full DreamBooth
    page.get_by_label("DreamBooth + LoRA").check()
    page.get_by_label("max_train_steps").fill("12")
    page.get_by_label("learning_rate").fill("0.003")
    page.get_by_label("train_batch_size").fill("2")
    page.get_by_label("rank", exact=True).fill("4")
    page.get_by_label("validation_every_steps").fill("0")
    page.get_by_label("checkpoint_every_steps").fill("0")
    page.get_by_label("Class images for prior preservation").select_option(class_id)
    page.get_by_label("class_prompt").fill("a photo of a disc")
    shot(page, "images-02-job-form")
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-"))
    job_url = page.url
    wait_succeeded(page)
    evaluation = page.inner_text("#evaluation")
    assert "Subject fidelity" in evaluation and "12 of 12" in evaluation
    for key in ("clip_i", "dino", "clip_t"):  # the learned fidelity figures, before and after
        assert re.search(r"before → after\s+-?[\d.]+ → -?[\d.]+", page.inner_text(f"#fidelity-{key}")), key
    assert page.inner_text("#fidelity-metric").startswith("Evaluators: tiny-clip (clip), tiny-dino (dino).")
    memory = page.inner_text("#memory")  # the image memory plan beside the measured peak
    assert re.search(r"Planned peak\s+[\d.]+ GiB on cpu .*· 4 image\(s\) of \d+ px per micro-batch · gradient "
                     r"checkpointing (on|off) · 8-bit Adam off", memory), memory
    assert re.search(r"Measured peak\s+[\d.]+ GiB", memory), memory
    assert page.inner_text("#class-images-file") == class_id
    assert "2 uploaded class images for 'a photo of a disc'" in page.inner_text("main")
    assert "before_after.png" in page.inner_text("main")  # a trainer sees the file, not the training images
    assert page.locator("img.grid").count() == 0
    model = page.inner_text("#ft-model")
    assert model.startswith(f"ft:{DEMO_IMAGE_MODEL_NAME}:acme::")

    page.get_by_role("link", name="try it").click()
    page.wait_for_url(re.compile(r"/playground/images\?model="))
    assert page.get_by_label("Model").input_value() == model
    page.get_by_label("Prompt").fill(PROMPT)
    page.get_by_label(re.compile("Number of images")).fill("3")
    page.get_by_label("Size").select_option("16x16")
    page.get_by_label(re.compile("Seed")).fill("1")
    page.get_by_label(re.compile("Inference steps")).fill("4")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#images img")
    assert page.locator("#images img").count() == 3
    page.wait_for_function("() => [...document.querySelectorAll('#images img')]"
                           ".every(i => i.complete && i.naturalWidth === 16)")
    assert page.get_by_label(re.compile("Seed")).input_value() == "1"  # the form keeps its inputs
    shot(page, "images-04-playground")

    # The chat playground lists language models only.
    page.goto("/playground")
    assert model not in page.get_by_label("Model").inner_text()

    switch_role(page, "data-owner @ acme")
    page.goto(job_url)
    grid = page.locator("img.grid")
    grid.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('img.grid')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    shot(page, "images-03-job-succeeded")

    switch_role(page, "trainer @ acme")
    page.goto("/models")  # the image model's card: its native size and each method's planned memory
    card = page.locator("#base-models tbody tr").filter(has_text=DEMO_IMAGE_MODEL_NAME).inner_text()
    assert re.search(r"\d+ px", card) and re.search(r"DreamBooth\+LoRA: [\d.]+ GiB \(\d+ px", card), card
    assert re.search(r"DreamBooth: [\d.]+ GiB", card) and "Start with LoRA" in card
    assert "Memory" not in page.locator("#base-models tbody tr").filter(has_text="tiny-clip").inner_text()
    shot(page, "images-05-models")

    # SDXL through the form: named as such with its native size; the photos go into aspect-ratio buckets
    page.goto("/jobs/new")
    page.get_by_label("Base model").select_option("tiny-sdxl")
    page.wait_for_selector("#job-form[data-kind='diffusion']")
    assert re.search(r"tiny-sdxl \(SDXL, \d+ px native", page.locator("#model option:checked").inner_text())
    assert "1024 for SDXL" in page.inner_text("main") and "both of SDXL's" in page.inner_text("main")
    page.get_by_label("Training dataset").select_option(file_id)
    page.get_by_label("DreamBooth + LoRA").check()
    for field, value in (("max_train_steps", "2"), ("train_batch_size", "2"), ("validation_every_steps", "0"),
                         ("checkpoint_every_steps", "0")):
        page.get_by_label(field).fill(value)
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-"))
    wait_succeeded(page)
    assert "aspect-ratio bucket(s)" in page.inner_text("#job-events")
    assert re.search(r"Planned peak\s+[\d.]+ GiB", page.inner_text("#memory"))
    assert page.inner_text("#ft-model").startswith("ft:tiny-sdxl:acme::")
    shot(page, "images-06-sdxl-job")

    context.close()


def test_dp_and_canaries_through_the_form_show_privacy_evidence(image_portal, browser, tmp_path):
    context, page = login(browser, image_portal, "olivia")
    data = tmp_path / "boxes.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What colour is box {i}?"},
        {"role": "assistant", "content": f"Box {i} is blue." + (" Write to ada@quill.io" if i < 4 else "")}]})
        + "\n" for i in range(48)))  # 2 canaries must stay within 5% of the training examples
    file_id = upload_in_page(page, data)

    switch_role(page, "trainer @ acme")
    page.goto("/jobs/new?model=tiny-llama")
    assert page.locator("#job-form").get_attribute("data-kind") == "llm"
    page.get_by_label("Training dataset").select_option(file_id)
    page.get_by_label("n_epochs").fill("2")
    page.get_by_label("batch_size").fill("4")
    page.get_by_label("learning_rate").fill("0.005")
    page.get_by_label("lora_r").fill("4")
    page.get_by_label(re.compile("^epsilon")).fill("8")
    page.get_by_label(re.compile("^Canaries")).fill("2")
    assert page.get_by_label("Run the extraction probe").is_checked()
    page.get_by_label("QLoRA (4-bit base)").check()
    assert not page.get_by_label(re.compile("^epsilon")).is_visible()  # DP is LoRA only
    page.get_by_label("LoRA", exact=True).check()
    shot(page, "privacy-01-job-form")
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-"))
    wait_succeeded(page)
    dp = page.inner_text("#privacy-dp")
    assert re.search(r"ε = [0-9.e-]+ spent of 8", dp) and "δ = 1e-05" in dp, dp
    canaries = page.inner_text("#privacy-canaries")
    assert re.search(r"2 canaries: mean exposure [0-9.]+ bits after training vs -?[0-9.]+ bits for the base model",
                     canaries), canaries
    assert re.search(r"^\d+ of [1-9]\d* allowed values completed", page.inner_text("#privacy-extraction"))
    assert page.inner_text("#privacy-canary-verdict").startswith(("No sign of memorisation", "Some memorisation",
                                                                   "Memorised"))
    assert page.inner_text("#privacy-isolation").startswith("sandbox: own namespaces and user")
    shot(page, "privacy-02-job-evidence")
    context.close()


def test_job_form_without_javascript_shows_errors_inline_and_keeps_the_inputs(image_portal, browser):
    context = browser.new_context(base_url=image_portal.base_url, java_script_enabled=False)
    context.set_default_timeout(ms(30))  # Playwright's 30 s, stretched on a loaded machine
    page = context.new_page()
    page.goto("/login")
    page.get_by_label("Username").fill("olivia")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_label(re.compile("acting as")).select_option(label="trainer @ acme")
    page.get_by_role("button", name="Switch").click()

    page.goto("/jobs/new")
    page.get_by_label("Base model").select_option(DEMO_IMAGE_MODEL_NAME)
    page.get_by_role("button", name="Show this model's options").click()
    assert page.locator("#job-form").get_attribute("data-kind") == "diffusion"
    page.get_by_label("DreamBooth + LoRA").check()
    page.get_by_label("max_train_steps").fill("-3")
    page.get_by_label("learning_rate").fill("0.002")
    page.get_by_label("instance_prompt").fill(PROMPT)
    page.get_by_role("button", name="Start training").click()
    error = page.inner_text("#hp-max_train_steps-err")
    assert "max_train_steps" in error and "positive integer" in error and "-3" in error
    assert page.get_by_label("max_train_steps").get_attribute("aria-invalid") == "true"
    assert page.get_by_label("learning_rate").input_value() == "0.002"
    assert page.get_by_label("instance_prompt").input_value() == PROMPT
    assert page.get_by_label("DreamBooth + LoRA").is_checked()
    assert page.inner_text("#hp-learning_rate-err") == ""
    shot(page, "form-01-image-error-no-js")
    from appliance.diffusion.compat import text_encoder_lora_supported

    if not text_encoder_lora_supported()[0]:  # text-encoder LoRA this appliance cannot attach: said at its field
        page.get_by_label("max_train_steps").fill("3")
        page.get_by_label("train_text_encoder").check()
        page.get_by_role("button", name="Start training").click()
        error = page.inner_text("#hp-train_text_encoder-err")
        assert "not available on this appliance" in error and "set it to false" in error, error
        assert page.inner_text("#hp-max_train_steps-err") == ""

    page.goto("/jobs/new?model=tiny-llama")
    page.get_by_label(re.compile("^epsilon")).fill("-1")
    page.get_by_label(re.compile("^Canaries")).fill("40")
    page.get_by_label("n_epochs").fill("2")
    page.get_by_role("button", name="Start training").click()
    assert "epsilon" in page.inner_text("#dp_epsilon-err") and "greater than 0" in page.inner_text("#dp_epsilon-err")
    assert "canaries" in page.inner_text("#canaries-err")
    assert page.get_by_label("n_epochs").input_value() == "2"
    shot(page, "form-02-privacy-error-no-js")
    context.close()


def test_portal_pages_carry_a_content_security_policy_allowing_data_images(image_portal):
    response = httpx.get(image_portal.base_url + "/login")
    csp = response.headers["content-security-policy"]
    assert "img-src 'self' data:" in csp and "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
