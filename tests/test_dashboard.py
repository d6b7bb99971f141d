"""The admin dashboard in a real headless Chromium (Debian's chromium, driven by selenium)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from ._gateway_support import API_KEY, HS_SECRET, gateway_process, token, write_config
from .conftest import TIMEOUT, client, receive_json

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# .ci/run installs the browser and sets this, so that CI can never skip the test.
REQUIRED = os.environ.get("TRIO_GW_REQUIRE_BROWSER") == "1"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if REQUIRED:
        raise RuntimeError(f"TRIO_GW_REQUIRE_BROWSER=1 but {CHROMIUM} or {CHROMEDRIVER} is missing")
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def open_browser(profile: Path) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # Without these Chromium keeps trying to reach Google, which this network refuses.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def text_becomes(driver: Any, element_id: str, expected: str) -> None:
    WebDriverWait(driver, TIMEOUT).until(
        lambda d: d.find_element(By.ID, element_id).text == expected,
        f"#{element_id} never became {expected!r}",
    )


def load_dashboard(driver: Any, url: str) -> None:
    driver.get(url)
    key = driver.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    text_becomes(driver, "connections", "0")


def sessions_table(driver: Any) -> str:
    return str(driver.find_element(By.ID, "sessions").text)


def send_from_form(driver: Any, user_id: str, message: str) -> str:
    driver.find_element(By.ID, "send-user").send_keys(user_id)
    box = driver.find_element(By.ID, "send-message")
    box.clear()
    box.send_keys(message)
    driver.find_element(By.ID, "send-button").click()
    WebDriverWait(driver, TIMEOUT).until(
        lambda d: d.find_element(By.ID, "send-result").text != "", "no result shown"
    )
    return str(driver.find_element(By.ID, "send-result").text)


async def test_dashboard_shows_connections_and_sends(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        f'[auth]\njwt_algorithm = "HS256"\njwt_secret = "{HS_SECRET}"\n'
        f'[admin]\napi_key = "{API_KEY}"\n',
    )
    run = trio.to_thread.run_sync
    with trio.fail_after(TIMEOUT * 3):  # a cold Chromium start is slow on a loaded machine
        async with gateway_process("--config", str(config)) as gateway:
            driver = await run(open_browser, tmp_path / "profile")
            try:
                await run(load_dashboard, driver, gateway.admin_url)
                # The page's Content-Security-Policy lets its inline style apply
                # too (its script evidently runs: the counts show).
                border = await run(
                    driver.execute_script,
                    "return getComputedStyle(document.querySelector('.card')).borderTopStyle",
                )
                assert border == "solid"
                async with client(gateway.ws_url, token(HS_SECRET, "HS256", sub="alice")) as (
                    ws,
                    hello,
                ):
                    await run(text_becomes, driver, "connections", "1")
                    await run(text_becomes, driver, "users", "1")
                    assert hello["session_id"] in await run(sessions_table, driver)
                    result = await run(
                        send_from_form, driver, "alice", '{"hello": "from the dashboard"}'
                    )
                    assert result == "sent to 1 session(s)"
                    assert await receive_json(ws) == {"hello": "from the dashboard"}
                await run(text_becomes, driver, "connections", "0")
            finally:
                await run(driver.quit)
