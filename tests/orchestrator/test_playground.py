"""The web playground (/playground) in a real headless Chromium, driven with Playwright, against the real
local stack (Redis, S3, the three model servers, a Celery worker, a gateway with a token): a text-to-image
and an understanding through the page, with live progress and the streamed answer, and a cancelled job.

Needs the system's Chromium (scripts/setup.sh installs it where it can) and the `playwright` module; the
tests skip, saying which is missing, when either is not there."""

from __future__ import annotations

import base64
import shutil
import time

import pytest

from orchestra import Orchestrator, settings_for
from service_helpers import noise_image, png_bytes

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the `test` extra installs it
    sync_playwright = None

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="the playwright module is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium; scripts/setup.sh does "
                                                "it as root)"),
]

TOKEN = "playground-secret"
WAIT_MS = 120_000  # a job on the CPU stack, first calls included

# Installed in the page: records what the user saw change, so a test can tell live updates from the end state.
RECORDER = """() => {
  const seen = window.seen = {progress: [], answer: [], think: []};
  const bar = document.getElementById("progress"), label = document.getElementById("progress-label");
  new MutationObserver(() => seen.progress.push([label.textContent, +bar.getAttribute("value"),
                                                 +bar.getAttribute("max")])).observe(bar, {attributes: true});
  for (const [key, id] of [["answer", "answer"], ["think", "think-text"]]) {
    const el = document.getElementById(id);
    new MutationObserver(() => seen[key].push(el.textContent))
      .observe(el, {childList: true, characterData: true, subtree: true});
  }
}"""


@pytest.fixture(scope="module")
def stack(redis_server, vit_server, vae_server, llm_server, store):
    o = Orchestrator(settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}"), store,
                     auth_token=TOKEN)
    yield o
    o.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        # Playwright's own browser builds are not used: the system Chromium, headless.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, stack):
    context = browser.new_context(viewport={"width": 1280, "height": 860})  # fresh localStorage per test
    pg = context.new_page()
    pg.goto(f"{stack.http.base_url}/playground")
    yield pg
    context.close()


def api(stack, path: str):
    return stack.http.get(path, headers={"authorization": f"Bearer {TOKEN}"})


def enter_token(page, token: str = TOKEN) -> None:
    page.fill("#token", token)
    page.evaluate(RECORDER)


def wait_for_end(page, state: str) -> str:
    """Waits for the job's end as the page shows it; returns the job's id."""
    expect(page.locator("#status")).to_contain_text(f": {state}", timeout=WAIT_MS)
    expect(page.locator("#run")).to_be_enabled()
    return page.locator("#output").get_attribute("data-job-id")


def test_the_page_is_public_and_every_api_call_needs_the_token(page, stack):
    assert page.url.endswith("/playground/")  # the redirect to the page's folder
    assert stack.http.get("/v1/jobs/x").status_code == 401  # while the API itself is guarded
    page.click("#tabs [data-tab=generate]")
    enter_token(page, "wrong")
    page.click("#run")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_have_text("401 UNAUTHENTICATED: missing or invalid bearer token")
    enter_token(page)
    page.reload()  # the token is kept in the browser
    assert page.input_value("#token") == TOKEN
    # The reference defaults, per tab.
    page.click("#tabs [data-tab=generate]")
    assert [page.input_value(f"#{f}") for f in ("width", "cfg_text_scale", "cfg_img_scale", "cfg_interval_lo",
                                                 "timestep_shift", "num_timesteps", "cfg_renorm_type")] == \
        ["1024", "4", "1", "0.4", "3", "50", "CFG_RENORM_TYPE_GLOBAL"]
    page.fill("#num_timesteps", "7")
    page.click("#tabs [data-tab=edit]")
    assert [page.input_value(f"#{f}") for f in ("width", "cfg_img_scale", "cfg_interval_lo", "cfg_renorm_type")] == \
        ["", "2", "0", "CFG_RENORM_TYPE_TEXT_CHANNEL"]
    page.click("#tabs [data-tab=generate]")
    assert page.input_value("#num_timesteps") == "7"  # what was typed on a tab stays there


def test_text_to_image_shows_progress_and_the_image(page, stack, tmp_path):
    enter_token(page)
    page.click("#tabs [data-tab=generate]")
    page.fill("#prompt", "a red boat")
    for field, value in {"width": "32", "height": "32", "num_timesteps": "3", "seed": "7"}.items():
        page.fill(f"#{field}", value)
    page.click("#run")
    job_id = wait_for_end(page, "succeeded")
    job = api(stack, f"/v1/jobs/{job_id}").json()
    assert (job["result"]["width"], job["result"]["height"], job["result"]["seed"]) == (32, 32, "7")

    denoise = [(step, total) for label, step, total in page.evaluate("window.seen.progress") if "denoise" in label]
    assert denoise and denoise[-1][0] == denoise[-1][1] == 2  # 3 timesteps = 2 model steps, all shown
    assert [s for s, _ in denoise] == sorted(s for s, _ in denoise)

    image = page.locator("#result-image")
    expect(image).to_be_visible()
    assert page.evaluate("document.getElementById('result-image').naturalWidth") == 32
    # The download link holds exactly the job's PNG.
    shown = page.evaluate("""async () => {
      const bytes = new Uint8Array(await (await fetch(document.getElementById("download").href)).arrayBuffer());
      return btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
    }""")
    assert base64.b64decode(shown) == api(stack, f"/v1/jobs/{job_id}/image").content
    assert page.get_attribute("#download", "download") == f"bagel-{job_id}.png"
    expect(page.locator("#image-info")).to_have_text("32×32, seed 7")
    expect(page.locator("#error")).to_be_hidden()

    shot = tmp_path / "playground-generate.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"playground screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_understanding_streams_the_answer_and_the_reasoning(page, stack, tmp_path):
    enter_token(page)
    page.set_input_files("#image", files=[{"name": "in.png", "mimeType": "image/png",
                                           "buffer": png_bytes(noise_image(20, 20, seed=2))}])
    page.fill("#prompt", "tell me a long story about it")
    page.fill("#max_new_tokens", "300")
    page.click("#run")
    job_id = wait_for_end(page, "succeeded")
    text = api(stack, f"/v1/jobs/{job_id}").json()["result"]["text"]
    expect(page.locator("#answer")).to_have_text(text)
    seen = page.evaluate("window.seen")
    partial = [t for t in seen["answer"] if t and t != text]
    assert partial and len(partial[0]) < len(text)  # the answer appeared while it was decoded
    assert any(label.startswith("answer ") for label, _, _ in seen["progress"])
    expect(page.locator("#think-box")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "playground-understand.png"), full_page=True)
    print(f"playground screenshot: {tmp_path / 'playground-understand.png'}")

    # Think mode: what is decoded before `</think>` streams into the reasoning box. The tiny random model
    # never closes its reasoning, so the final job calls it all the answer, and the page follows the job.
    page.evaluate(RECORDER)
    page.check("#think")
    page.fill("#max_new_tokens", "40")
    page.click("#run")
    job_id = wait_for_end(page, "succeeded")
    result = api(stack, f"/v1/jobs/{job_id}").json()["result"]
    assert "think" not in result and result["text"]
    assert any(t and result["text"].startswith(t) for t in page.evaluate("window.seen.think"))
    expect(page.locator("#think-box")).to_be_hidden()
    expect(page.locator("#answer")).to_have_text(result["text"])


def test_editing_sends_the_image_with_the_edit_defaults(page, stack):
    enter_token(page)
    page.click("#tabs [data-tab=edit]")
    page.set_input_files("#image", files=[{"name": "in.png", "mimeType": "image/png",
                                           "buffer": png_bytes(noise_image(24, 24, seed=9))}])
    page.fill("#prompt", "make it blue")
    page.fill("#num_timesteps", "3")
    page.fill("#seed", "4")
    page.click("#run")
    job_id = wait_for_end(page, "succeeded")
    result = api(stack, f"/v1/jobs/{job_id}").json()["result"]
    assert (result["width"], result["height"]) == (512, 512)  # the input's size as the VAE resizes it
    assert page.evaluate("document.getElementById('result-image').naturalWidth") == 512
    expect(page.locator("#image-info")).to_have_text("512×512, seed 4")


def test_a_long_job_is_cancelled_from_the_page(page, stack, tmp_path):
    enter_token(page)
    page.click("#tabs [data-tab=generate]")
    page.fill("#prompt", "slow")
    for field, value in {"width": "64", "height": "64", "num_timesteps": "1000", "seed": "1"}.items():
        page.fill(f"#{field}", value)
    page.click("#run")
    step = "+document.getElementById('progress').getAttribute('value')"
    page.wait_for_function(f"{step} > 0", timeout=WAIT_MS)  # denoising has started...
    first = page.evaluate(step)
    page.wait_for_function(f"{step} > {first}", timeout=WAIT_MS)  # ...and the bar moves with it
    page.click("#cancel")
    t = time.monotonic()
    job_id = wait_for_end(page, "cancelled")
    took = time.monotonic() - t
    expect(page.locator("#error")).to_have_text("Cancelled.")
    assert api(stack, f"/v1/jobs/{job_id}").json()["state"] == "JOB_STATE_CANCELLED"
    assert page.evaluate(step) < 999 and took < 30  # stopped mid-denoise, not run to the end
    expect(page.locator("#figure")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "playground-cancelled.png"), full_page=True)
    print(f"playground screenshot: {tmp_path / 'playground-cancelled.png'}")
