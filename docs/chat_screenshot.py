"""Remake ``docs/chat-ui.png``: a real conversation on a running ``gptlab chat`` page, in headless Chromium.

    gptlab fetch-model smollm2-135m-instruct
    gptlab serve --model smollm2=$(python -c 'from gptlab.formats.wheels import model_dir; print(model_dir("smollm2-135m-instruct"))') &
    gptlab chat --no-browser &
    python docs/chat_screenshot.py --page http://127.0.0.1:8501/ --out docs/chat-ui.png

Needs Selenium (the ``dev`` extra) and Debian's ``chromium`` + ``chromium-driver``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

FLAGS = (
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
    "--hide-scrollbars",
)
MESSAGES = (
    "What is a large language model? Answer in two sentences.",
    "Give me one everyday example of using one.",
)


def _status(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.ID, "status").text


def _wait(what: str, probe, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except Exception:  # Gradio re-renders elements while a reply streams in
            pass
        time.sleep(0.2)
    raise SystemExit(f"chat_screenshot: timed out waiting for {what}")


def _set_number(driver: webdriver.Chrome, elem_id: str, value: float) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type='number']")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", default="http://127.0.0.1:8501/")
    parser.add_argument("--out", default="docs/chat-ui.png")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy, the same picture every run"
    )
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (*FLAGS, "--window-size=1280,1000", f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(args.page)
        _wait("the model list", lambda: "Connected" in _status(driver), 60)
        _set_number(driver, "temperature", args.temperature)
        _set_number(driver, "num_predict", args.max_tokens)
        for turn, text in enumerate(MESSAGES, 1):
            box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
            box.send_keys(text, Keys.ENTER)
            _wait(f"reply {turn}", lambda t=turn: f"answered (turn {t})" in _status(driver), 600)
        time.sleep(1)  # let the last render settle
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
    print(f"chat_screenshot: wrote {args.out}")


if __name__ == "__main__":
    main()
