"""The chat page in a real browser: Debian's headless Chromium driven by
Selenium through Debian's chromedriver, against a real broker, null workers
and ``zserve gateway`` on loopback.

Served models (null engine, token i is ``t{i} ``):

* ``paced``: 30 ms per token, so an answer visibly grows in steps.
* ``paced2``: 20 ms per token, the second side of the side-by-side view.
* ``slow``: capacity 1, 50 ms per token: Stop must free its one slot.

``.ci/run`` installs ``chromium`` and ``chromium-driver`` when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST_HB
from tests.gateway.conftest import start_gateway
from zserve.launcher import Proc, start_broker, start_worker, wait_for, wait_models, zserve_cmd

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "sk-page-1"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    msg = "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    if os.environ.get("CI"):
        raise RuntimeError(msg)  # in CI a missing browser is a failure, not a skip
    pytest.skip(msg, allow_module_level=True)


class Page:
    """The stack behind the page: broker, workers, an open gateway and one
    that wants an API key."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.frontend = ""
        self.root = ""
        self.keyed_root = ""

    def status(self) -> dict[str, Any]:
        """What ``zserve status --json`` prints, as a person would run it."""
        out = subprocess.run(
            zserve_cmd("status", "--broker", self.frontend, "--json"),
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return json.loads(out.stdout)

    def in_flight(self, model: str) -> int:
        return sum(w["in_flight"] for w in self.status()["workers"] if model in w["models"])


@pytest.fixture(scope="module")
def stack() -> Iterator[Page]:
    page = Page()
    broker, page.frontend, be = start_broker(*FAST_HB)
    page.procs.append(broker)
    try:
        for args in (
            ["--model", "paced", "--capacity", "4", "--token-delay", "0.03"],
            ["--model", "paced2", "--capacity", "4", "--token-delay", "0.02"],
            ["--model", "slow", "--capacity", "1", "--token-delay", "0.05"],
        ):
            page.procs.append(start_worker(be, "--engine", "null", *args, *FAST_HB))
        gw, page.root = start_gateway(page.frontend, *FAST_HB)
        page.procs.append(gw)
        keyed, page.keyed_root = start_gateway(page.frontend, "--api-keys", KEY, *FAST_HB)
        page.procs.append(keyed)
        wait_models(page.frontend, ["paced", "paced2", "slow"], 30)
        yield page
    finally:
        for pr in reversed(page.procs):
            pr.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,860",
    ):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------ helpers


def by_id(d: WebDriver, id_: str) -> Any:
    return d.find_element(By.ID, id_)


def fill(d: WebDriver, id_: str, text: str) -> None:
    el = by_id(d, id_)
    el.clear()
    el.send_keys(text)


def open_page(d: WebDriver, root: str, models: str = "paced,paced2,slow") -> None:
    d.get(root + "/")
    wait_for(lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-models") == models,
             20, f"the model list {models}")  # fmt: skip


def last_answer(d: WebDriver, log: str = "log") -> Any:
    msgs = d.find_elements(By.CSS_SELECTOR, f"#{log} .msg.assistant")
    return msgs[-1] if msgs else None


def answer_text(d: WebDriver, log: str = "log") -> str:
    a = last_answer(d, log)
    return a.find_element(By.CSS_SELECTOR, ".text").text.strip() if a is not None else ""


def done(d: WebDriver, log: str = "log") -> str | None:
    a = last_answer(d, log)
    if a is None:
        return None
    if "error" in (a.get_attribute("class") or ""):
        return "error"
    return a.get_attribute("data-done")


def send(d: WebDriver, model: str | None, text: str, max_tokens: int) -> None:
    if model is not None:
        fill(d, "model", model)
    fill(d, "max-tokens", str(max_tokens))
    fill(d, "prompt", text)
    by_id(d, "send").click()


def tokens(n: int) -> str:
    return "".join(f"t{i} " for i in range(n)).strip()


# -------------------------------------------------------------------- tests


def test_page_is_served_and_self_contained(stack: Page, browser: WebDriver) -> None:
    open_page(browser, stack.root)
    assert browser.title == "zserve chat"
    # Nothing outside the gateway: every script and stylesheet is same-origin.
    for el in browser.find_elements(By.CSS_SELECTOR, "script[src], link[href]"):
        src = el.get_attribute("src") or el.get_attribute("href") or ""
        assert src.startswith(stack.root + "/") or src.startswith("data:"), src
    options = browser.find_elements(By.CSS_SELECTOR, "#models option")
    names = [o.get_attribute("value") for o in options]
    assert names == ["paced", "paced2", "slow"]


def test_answer_streams_in_with_timing(stack: Page, browser: WebDriver, tmp_path: Path) -> None:
    open_page(browser, stack.root)
    fill(browser, "system", "You are terse.")
    send(browser, "paced", "Hello there", 40)
    seen: list[str] = []

    def finished() -> bool:
        text = answer_text(browser)
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return done(browser) is not None

    wait_for(finished, 30, "the answer to finish")
    finished()  # the text may have been read just before the last render
    assert done(browser) == "done"
    assert seen[-1] == tokens(40)
    assert len(seen) >= 3, f"the answer did not grow in steps: {seen}"
    for shorter, longer in zip(seen, seen[1:], strict=False):
        assert longer.startswith(shorter)  # it grew; nothing was rewritten
    stats = last_answer(browser).find_element(By.CSS_SELECTOR, ".stats").text
    assert "first token" in stats and "tok/s" in stats and "40 tokens" in stats, stats
    # The user's turn and the answer are both in the log; the next turn follows on.
    send(browser, None, "And again", 3)
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#log .msg")) == 4
             and done(browser) == "done", 30, "the second turn")  # fmt: skip
    assert answer_text(browser) == tokens(3)
    shot = tmp_path / "chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_stop_aborts_and_frees_the_worker_slot(stack: Page, browser: WebDriver) -> None:
    open_page(browser, stack.root)
    send(browser, "slow", "Tell me a long story", 2000)
    wait_for(lambda: len(answer_text(browser).split()) >= 3, 30, "the long answer to start")
    assert stack.in_flight("slow") == 1
    assert by_id(browser, "send").get_attribute("disabled") is not None  # one turn at a time
    by_id(browser, "stop").click()
    wait_for(lambda: done(browser) == "stopped", 15, "the answer to stop")
    wait_for(lambda: stack.in_flight("slow") == 0, 15, "the slow worker's slot to free")
    n = len(answer_text(browser).split())
    assert 3 <= n < 2000
    assert "stopped" in last_answer(browser).find_element(By.CSS_SELECTOR, ".stats").text
    # The slot is free: the next request on the capacity-1 worker gets an answer.
    send(browser, "slow", "Short one", 2)
    wait_for(lambda: done(browser) == "done", 30, "an answer after the stop")
    assert answer_text(browser) == tokens(2)


def test_unknown_model_shows_the_error(stack: Page, browser: WebDriver) -> None:
    open_page(browser, stack.root)
    send(browser, "no-such-model", "Hello", 4)
    wait_for(lambda: done(browser) == "error", 15, "the error")
    text = answer_text(browser)
    assert "model_not_found" in text and "no-such-model" in text, text
    assert by_id(browser, "send").get_attribute("disabled") is None  # the page recovered


def test_side_by_side_streams_both_at_once(stack: Page, browser: WebDriver) -> None:
    open_page(browser, stack.root)
    by_id(browser, "tab-side").click()
    assert by_id(browser, "view-side").is_displayed()
    assert not by_id(browser, "view-chat").is_displayed()
    fill(browser, "model-a", "paced")
    fill(browser, "model-b", "paced2")
    fill(browser, "max-tokens", "40")
    fill(browser, "prompt", "Which of you is faster?")
    by_id(browser, "send").click()
    both_streaming = False

    def finished() -> bool:
        nonlocal both_streaming
        a, b = last_answer(browser, "log-a"), last_answer(browser, "log-b")
        if a is not None and b is not None:
            live = ["streaming" in (x.get_attribute("class") or "") for x in (a, b)]
            texts = [answer_text(browser, log) for log in ("log-a", "log-b")]
            both_streaming |= all(live) and all(texts)
        return done(browser, "log-a") is not None and done(browser, "log-b") is not None

    wait_for(finished, 30, "both answers")
    assert done(browser, "log-a") == done(browser, "log-b") == "done"
    assert both_streaming, "the two answers never streamed at the same time"
    for log in ("log-a", "log-b"):
        assert answer_text(browser, log) == tokens(40)
        stats = last_answer(browser, log).find_element(By.CSS_SELECTOR, ".stats").text
        assert "first token" in stats and "tok/s" in stats, stats
    who = [last_answer(browser, log).find_element(By.CSS_SELECTOR, ".who").text
           for log in ("log-a", "log-b")]  # fmt: skip
    assert [w.lower() for w in who] == ["paced", "paced2"]


def test_api_key_is_asked_for_and_sent(stack: Page, browser: WebDriver) -> None:
    browser.get(stack.keyed_root + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(stack.keyed_root + "/")
    wait_for(lambda: by_id(browser, "keybar").is_displayed(), 15, "the key prompt")
    fill(browser, "api-key", "sk-wrong")
    by_id(browser, "key-save").click()
    wait_for(lambda: "invalid_api_key" in by_id(browser, "notice").text, 15, "the key error")
    fill(browser, "api-key", KEY)
    by_id(browser, "key-save").click()
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-models")
             == "paced,paced2,slow", 15, "the models with the key")  # fmt: skip
    assert not by_id(browser, "notice").is_displayed()
    send(browser, "paced", "Hi", 5)
    wait_for(lambda: done(browser) == "done", 30, "an answer with the key")
    assert answer_text(browser) == tokens(5)


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}


def test_json_formats_constrain_the_reply(browser: WebDriver, tiny_model_dir: Path) -> None:
    """The reply-format picker on the tiny random model (which never writes
    JSON of its own): JSON object and a JSON schema give valid JSON; a box
    that is not JSON is refused on the page, a bad schema by the gateway."""
    import jsonschema

    broker, fe, be = start_broker(*FAST_HB)
    procs = [broker]
    try:
        procs.append(start_worker(be, "--engine", "hf", "--model", str(tiny_model_dir),
                                  "--model-names", "tiny", *FAST_HB))  # fmt: skip
        gw, root = start_gateway(fe, *FAST_HB)
        procs.append(gw)
        wait_models(fe, ["tiny"], 120)
        open_page(browser, root, "tiny")
        assert not by_id(browser, "schema").is_displayed()
        browser.execute_script("document.getElementById('temperature').value = '0'")  # greedy

        def ask(fmt: str, text: str) -> tuple[str | None, str]:
            Select(by_id(browser, "format")).select_by_value(fmt)
            n = len(browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant"))
            send(browser, "tiny", text, 128)
            wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant"))
                     > n and done(browser) is not None, 120, f"the {fmt} answer")  # fmt: skip
            return done(browser), answer_text(browser)

        state, text = ask("json_object", "Say something")
        assert state == "done" and isinstance(json.loads(text), dict), text
        assert last_answer(browser).get_attribute("data-format") == "json_object"
        Select(by_id(browser, "format")).select_by_value("json_schema")
        assert by_id(browser, "schema").is_displayed()
        fill(browser, "schema", json.dumps(SCHEMA))
        state, text = ask("json_schema", "The weather as JSON")
        assert state == "done", text
        jsonschema.validate(json.loads(text), SCHEMA)
        fill(browser, "schema", "{not json")
        state, text = ask("json_schema", "Again")
        assert state == "error" and "does not hold JSON" in text, text
        fill(browser, "schema", json.dumps({"type": "no-such-type"}))
        state, text = ask("json_schema", "Again")
        assert state == "error" and "response_format" in text, text
    finally:
        for pr in reversed(procs):
            pr.stop()
