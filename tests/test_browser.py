"""The chat page at / in a real headless Chromium (Debian's, driven by playwright; nothing downloaded):
type a prompt, see the answer stream in, and check it equals what the API gives for the same request."""
from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.helpers import serving, split

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (as root, tests/system-packages.sh installs "
                                       "Debian's `chromium`; or run apt-get install chromium)")

PROMPT = "Tell me about pipelines"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    parts = split(tiny_model_dir, 2, tmp_path_factory.mktemp("parts2"))
    with serving(parts, 2, tmp_path_factory.mktemp("log")) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def api_chat(server, messages, max_tokens, temperature=0) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": messages, "max_tokens": max_tokens, "temperature": temperature})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def open_page(page, server, temperature="0", max_tokens=str(MAX_TOKENS)):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('ok')")
    page.click("#settings summary")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


# Every text the newest answer shows, in order: proof that it grew piece by piece.
RECORD_SNAPSHOTS = """() => {
  window.snapshots = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant .text');
    if (all.length) window.snapshots.push(all[all.length - 1].textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_typed_prompt_streams_the_same_answer_as_the_api(page, server):
    open_page(page, server)
    page.evaluate(RECORD_SNAPSHOTS)
    page.fill("#prompt", PROMPT)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-done='true']")

    shown = page.text_content(".msg.assistant .text")
    expected = api_chat(server, [{"role": "user", "content": PROMPT}], MAX_TOKENS)
    assert expected and shown == expected
    assert page.text_content(".msg.user .text") == PROMPT
    assert page.input_value("#prompt") == ""
    snapshots = [s for s in page.evaluate("window.snapshots") if s]
    assert all(expected.startswith(s) for s in snapshots)
    partial = {s for s in snapshots if s != expected}
    assert len(partial) >= 2, f"the answer did not arrive token by token: {snapshots}"
    assert "tokens" in page.text_content(".msg.assistant .meta")
    assert page.is_hidden("#notice")          # the tiny test model has real (not random) weights


def test_second_turn_sends_the_conversation_and_enter_sends(page, server):
    open_page(page, server, max_tokens="8")
    page.fill("#prompt", "first question")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-done='true']")
    first = page.text_content(".msg.assistant .text")
    with page.expect_request("**/v1/chat/completions") as req:
        page.fill("#prompt", "second question")
        page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='true']")
    sent = json.loads(req.value.post_data)
    assert sent["stream"] is True and sent["max_tokens"] == 8 and sent["temperature"] == 0
    assert sent["messages"] == [{"role": "user", "content": "first question"},
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": "second question"}]
    assert page.text_content(".msg.assistant:nth-of-type(4) .text") == api_chat(server, sent["messages"], 8)
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_api_key_is_kept_in_local_storage_and_sent_as_bearer(page, server):
    open_page(page, server, max_tokens="4")
    page.fill("#api-key", "sk-local-123")
    page.reload()
    page.click("#settings summary")
    assert page.input_value("#api-key") == "sk-local-123"
    assert page.input_value("#max-tokens") == "4"       # the controls survive a reload too
    with page.expect_request("**/v1/chat/completions") as req:
        page.fill("#prompt", "hi")
        page.click("#send")
    assert req.value.headers["authorization"] == "Bearer sk-local-123"
    page.wait_for_selector(".msg.assistant[data-done='true']")


def test_a_server_error_is_shown_not_swallowed(page, server):
    open_page(page, server, max_tokens="5")
    page.fill("#prompt", "hello " * 200)                 # far over the 128-token context
    page.click("#send")
    error = page.wait_for_selector(".msg.error")
    assert "context" in error.text_content()
    assert page.is_enabled("#send")


def test_random_weights_note_follows_health(page, server):
    def random_weights(route):
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "random_weights": True})
    page.route("**/health", random_weights)
    page.goto(server.url + "/")
    page.wait_for_selector("#notice", state="visible")
    assert "random weights" in page.text_content("#notice")


def test_page_fits_a_phone(browser, server):
    context = browser.new_context(viewport={"width": 360, "height": 740}, device_scale_factor=2,
                                  is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('ok')")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        box = page.locator("#send").bounding_box()
        assert box and box["x"] + box["width"] <= 360 and box["y"] + box["height"] <= 740
        page.fill("#prompt", "short")
        page.tap("#send")
        page.wait_for_selector(".msg.assistant[data-done='true']")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        context.close()
