"""``gptlab chat``: the chat page, driven end to end in a real headless Chromium (Selenium + chromedriver).

A tiny random chat-template model is served by ``gptlab serve``'s server; ``gptlab chat --no-browser`` runs as
a subprocess; the browser picks the model, sends two turns, and the replies it shows must be the ones
``/api/chat`` gives directly for the same conversation and options (greedy), the second including the first
turn as history. A page whose server is down must say so in words. The page must not reach off this machine.

The browser tests skip only where no Chromium exists (``./run.sh setup`` installs Debian's ``chromium`` and
``chromium-driver``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import ollama
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from stage_fixtures import tiny_chat_checkpoint

from gptlab.chatui.backend import Backend, Options, ServerError
from gptlab.cli import main
from gptlab.serve.app import make_server

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver binary: ./run.sh setup installs Debian's chromium and chromium-driver",
)
# Flags that keep a headless Chromium quiet on a machine without internet (no sync, updates, prefetching).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers' /dev/shm is often too small for Chromium
    "--no-proxy-server",  # the page and its server are on loopback
    "--window-size=1280,900",
)
GREEDY = Options(temperature=0.0, top_k=40, num_predict=12)
# Prompts to pick from: the comparison needs replies whose text the page's Markdown shows as it is.
PROMPTS = ["Hello", "Hi", "Good morning", "Name a color", "Tell me a joke", "Why?", "Say yes", "How are you?"]
MARKUP = set("<>&[]()`$\\*_~#|!-+=")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible(text: str) -> str:
    """The letters and digits of ``text``: what survives HTML whitespace folding and dropped control bytes."""
    return "".join(ch for ch in text if ch.isalnum())


def shown_as_is(reply: str) -> bool:
    return len(visible(reply)) >= 2 and not MARKUP & set(reply)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``gptlab serve``'s server with a tiny chat-template model ``tiny``; yields its URL."""
    root = tmp_path_factory.mktemp("chat-serve")
    tiny_chat_checkpoint(root / "tiny")
    server = make_server({"tiny": root / "tiny"}).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def _start_chat(server_url: str, cwd: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_PROXY": "127.0.0.1,localhost"}
    cmd = [
        sys.executable,
        "-m",
        "gptlab.cli",
        "chat",
        "--server",
        server_url,
        "--port",
        str(port),
        "--no-browser",
    ]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gptlab chat exited {proc.returncode}: {proc.stdout.read()}")
        try:
            with opener.open(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("gptlab chat did not answer within 60 s")


@pytest.fixture
def chat_page(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Starts ``gptlab chat --no-browser`` for a server URL (in tmp_path: Gradio may write a .gradio/ there)."""
    procs: list[subprocess.Popen] = []

    def start(server_url: str) -> str:
        proc, url = _start_chat(server_url, tmp_path)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module's page tests (each test loads its own page in it)."""
    env = pytest.MonkeyPatch()
    env.setenv("NO_PROXY", "127.0.0.1,localhost")  # Selenium talks to chromedriver over loopback
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to list the page's requests
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        env.undo()


def wait_for(what: str, probe: Callable[[], object], timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (StaleElementReferenceException, WebDriverException):
            last = None  # Gradio re-renders elements while a reply streams in
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last seen: {last!r})")


def status(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.ID, "status").text


def bot_messages(driver: webdriver.Chrome) -> list[str]:
    return [
        e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot'] .message-content")
    ]


def direct(client: ollama.Client, messages: list[dict[str, str]]) -> str:
    reply = client.chat(model="tiny", messages=messages, options=GREEDY.as_dict(), stream=False)
    return reply.message.content


def pick_conversation(client: ollama.Client) -> tuple[str, str, str, str]:
    """Two user turns whose direct replies the page shows as they are, the second depending on the first."""
    for first in PROMPTS:
        reply1 = direct(client, [{"role": "user", "content": first}])
        if not shown_as_is(reply1):
            continue
        for second in PROMPTS:
            history = [{"role": "user", "content": first}, {"role": "assistant", "content": reply1}]
            reply2 = direct(client, [*history, {"role": "user", "content": second}])
            alone = direct(client, [{"role": "user", "content": second}])
            if shown_as_is(reply2) and visible(reply2) != visible(alone):
                return first, reply1, second, reply2
    raise AssertionError("no prompt pair gives replies free of Markdown characters: extend PROMPTS")


def external_requests(driver: webdriver.Chrome) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = message["params"].get("request", message["params"])["url"]
            if url.startswith(("http:", "https:", "ws:", "wss:")) and not url.startswith(
                ("http://127.0.0.1", "ws://127.0.0.1")
            ):
                urls.append(url)
    return urls


def send(driver: webdriver.Chrome, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


@needs_browser
@pytest.mark.slow
def test_chat_page_streams_replies_with_history(api: str, chat_page, browser: webdriver.Chrome) -> None:
    client = ollama.Client(host=api, trust_env=False)
    first, reply1, second, reply2 = pick_conversation(client)
    browser.get(chat_page(api))
    wait_for("the model list", lambda: "tiny:latest" in status(browser))

    # Pick the model from the dropdown (the page preselects the first; choose it as a user would).
    picker = browser.find_element(By.CSS_SELECTOR, "#model input")
    picker.click()
    option = wait_for("the model option", lambda: browser.find_element(By.CSS_SELECTOR, "[role='option']"))
    assert "tiny:latest" in option.text
    option.click()
    assert picker.get_attribute("value") == "tiny:latest"

    # The controls: greedy, and the same top-k / max tokens as the direct requests.
    for elem_id, value in (("temperature", 0), ("top_k", GREEDY.top_k), ("num_predict", GREEDY.num_predict)):
        field = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type='number']")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value), Keys.TAB)
        wait_for(f"{elem_id}={value}", lambda f=field, v=value: float(f.get_attribute("value")) == v)

    send(browser, first)
    wait_for("the first reply", lambda: "answered (turn 1)" in status(browser))
    assert [visible(t) for t in bot_messages(browser)] == [visible(reply1)]

    send(browser, second)
    wait_for("the second reply", lambda: "answered (turn 2)" in status(browser))
    shown = bot_messages(browser)
    assert [visible(t) for t in shown] == [visible(reply1), visible(reply2)]
    assert external_requests(browser) == []  # offline: no fonts, analytics or CDNs

    # Clear empties the page and the history: the next turn is answered as a first turn again.
    browser.find_element(By.CSS_SELECTOR, "#clear").click()
    wait_for("an empty conversation", lambda: not bot_messages(browser))
    send(browser, first)
    wait_for("a fresh first reply", lambda: "answered (turn 1)" in status(browser))
    assert [visible(t) for t in bot_messages(browser)] == [visible(reply1)]


@needs_browser
def test_chat_page_says_when_the_server_is_down(chat_page, browser: webdriver.Chrome) -> None:
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    browser.get(chat_page(down))
    text = wait_for("the error", lambda: "Cannot reach" in status(browser) and status(browser))
    assert f"Cannot reach the model server at {down}" in text and "gptlab serve" in text
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text


def test_backend_lists_models_and_streams(api: str) -> None:
    backend = Backend(api)
    assert backend.models() == ["tiny:latest"]
    messages = [{"role": "user", "content": "Hello"}]
    pieces = list(backend.chat("tiny", messages, GREEDY))
    assert len(pieces) > 1  # streamed, piece by piece
    assert "".join(pieces) == direct(ollama.Client(host=api, trust_env=False), messages)


def test_backend_errors_are_messages(api: str) -> None:
    with pytest.raises(ServerError, match=r"has no model 'missing'.*Refresh"):
        list(Backend(api).chat("missing", [{"role": "user", "content": "Hi"}], GREEDY))
    down = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ServerError, match=f"Cannot reach the model server at {down}"):
        Backend(down).models()
    with pytest.raises(ValueError, match="expected a URL"):
        Backend("ftp://example.org")


def test_backend_names_in_stream_errors_and_timeouts() -> None:
    """An error inside the stream (HTTP status -1 in the ollama client) and a slow server are not 'unreachable'."""
    import httpx
    import ollama

    backend = Backend("http://127.0.0.1:9")
    stopped = backend._error(ollama.ResponseError("the server is shutting down", -1), "m")
    assert str(stopped) == "The server at http://127.0.0.1:9 stopped the reply: the server is shutting down"
    slow = backend._error(httpx.ReadTimeout("timed out"), "m")
    assert "did not answer in time (ReadTimeout)" in str(slow) and "Cannot reach" not in str(slow)


def test_cli_chat_bad_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--server", "ftp://example.org", "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("gptlab chat: error: --server 'ftp://example.org'")


def test_cli_chat_without_the_chat_extra_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # importing it raises ImportError, as when not installed
    monkeypatch.delitem(sys.modules, "gptlab.chatui.app", raising=False)
    assert main(["chat", "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "gptlab chat: error: gptlab chat needs the chat extra (gradio is missing): pip install 'gptlab[chat]'\n"
    )
