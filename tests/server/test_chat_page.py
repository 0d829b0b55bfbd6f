"""The chat page in a real (headless) browser: a streamed answer appears, and model text is never HTML.

Needs Debian's chromium (`apt-get install -y chromium`) and the playwright package; skipped without them."""

from __future__ import annotations

import os

import pytest

CHROMIUM = "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the test extra)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found: apt-get update && apt-get install -y chromium", allow_module_level=True)

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs
    yield page
    context.close()


def test_question_gets_a_streamed_answer(server, page):
    page.goto(server.base_url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    page.fill("#max-tokens", "24")
    page.fill("#temperature", "0")
    page.fill("#input", "What is the capital of France?")
    page.click("#send")
    reply = page.locator(".msg.assistant").last
    page.wait_for_function("document.querySelector('.msg.assistant .stats').textContent.includes('tokens/s')",
                           timeout=30_000)
    assert "Paris" in reply.locator(".content").inner_text()
    assert page.locator(".msg.user").inner_text() == "What is the capital of France?"
    assert page.is_disabled("#stop") and not page.is_disabled("#send")
    # the second turn sends the whole conversation
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#input", "And of Germany?")
        page.press("#input", "Enter")
    assert [m["role"] for m in request.value.post_data_json["messages"]] == ["user", "assistant", "user"]
    page.wait_for_function("document.querySelectorAll('.msg.assistant .stats')[1].textContent !== ''",
                           timeout=30_000)
    assert not page.dialogs


def _fake_stream(route, text: str) -> None:
    import json

    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)


def test_model_html_is_shown_as_text(server, page):
    text = f"Look: {XSS} and **bold** with `<script>alert(2)</script>`\n\n- one\n- two\n\n```\n<b>x</b>\n```"
    page.route("**/v1/chat/completions", lambda route: _fake_stream(route, text))
    page.goto(server.base_url + "/")
    page.fill("#input", "hello <b>there</b>")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .stats').textContent.includes('5 tokens')")
    content = page.locator(".msg.assistant .content")
    assert XSS in content.inner_text() and "<script>alert(2)</script>" in content.inner_text()
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert content.locator("strong").inner_text() == "bold"
    assert content.locator("li").all_inner_texts() == ["one", "two"]
    assert content.locator("pre code").inner_text() == "<b>x</b>"
    assert page.locator(".msg.user").inner_text() == "hello <b>there</b>"
    rendered = page.evaluate("t => renderMarkdown(t)", XSS)
    assert "<img" not in rendered and "&lt;img" in rendered
    assert not page.dialogs


def _never_ending(route) -> None:
    import json

    body = json.loads(route.request.post_data)
    route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))  # so it cannot end before Stop


def test_stop_button_aborts_the_reply(server, page):
    page.route("**/v1/chat/completions", _never_ending)
    page.goto(server.base_url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    page.fill("#max-tokens", "2000")
    page.fill("#input", "Write a very long story.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .content').textContent.length > 0")
    page.click("#stop")
    page.wait_for_function("document.querySelector('.msg.assistant .stats').textContent.startsWith('stopped')")
    server.wait_idle(timeout=10)  # the server saw the disconnect and freed the request's blocks
