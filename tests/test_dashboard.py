"""The admin dashboard in a real headless Chromium (Debian's chromium, driven by selenium).

One browser serves the whole module (its cold start is the slow part); each
test runs its own ``trio-gw serve`` process. Waits are selenium's
``WebDriverWait`` on what the page shows, never sleeps; the tests' clients are
real WebSocket clients, so a close clicked in the page is seen on the wire.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

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
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CONFIG = (
    f'[auth]\njwt_algorithm = "HS256"\njwt_secret = "{HS_SECRET}"\n[admin]\napi_key = "{API_KEY}"\n'
)
run = trio.to_thread.run_sync


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


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    browser = open_browser(tmp_path_factory.mktemp("profile"))
    try:
        yield browser
    finally:
        browser.quit()


def until(driver: Any, condition: Any, message: str) -> Any:
    return WebDriverWait(driver, TIMEOUT).until(condition, message)


def text_becomes(driver: Any, element_id: str, expected: str) -> None:
    until(
        driver,
        lambda d: d.find_element(By.ID, element_id).text == expected,
        f"#{element_id} never became {expected!r}",
    )


def attribute_becomes(driver: Any, css: str, name: str, expected: str) -> None:
    until(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, css).get_attribute(name) == expected,
        f"{css}[{name}] never became {expected!r}",
    )


def load_dashboard(driver: Any, url: str, connections: int = 0) -> None:
    driver.get(url)
    key = driver.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(API_KEY)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    text_becomes(driver, "connections", str(connections))


def sessions_table(driver: Any) -> str:
    return str(driver.find_element(By.ID, "sessions").text)


def table_shows(driver: Any, present: set[str], absent: set[str]) -> None:
    def shown(d: Any) -> bool:
        table = sessions_table(d)
        return all(s in table for s in present) and not any(s in table for s in absent)

    until(driver, shown, f"the table never showed {present} without {absent}")


def click(driver: Any, css: str) -> None:
    driver.find_element(By.CSS_SELECTOR, css).click()


def answer_confirm(driver: Any, accept: bool) -> str:
    """Wait for the page's confirm() dialog, answer it; returns its question."""
    alert = until(driver, expected_conditions.alert_is_present(), "no confirm() dialog")
    question = str(alert.text)
    if accept:
        alert.accept()
    else:
        alert.dismiss()
    return question


def chart_points(driver: Any, series: str) -> list[tuple[float, float]]:
    points = driver.find_element(By.CSS_SELECTOR, f"#chart-{series} polyline").get_attribute(
        "points"
    )
    return [(float(x), float(y)) for x, y in (p.split(",") for p in points.split())]


def send_from_form(driver: Any, user_id: str, message: str) -> str:
    user = driver.find_element(By.ID, "send-user")
    user.clear()
    user.send_keys(user_id)
    box = driver.find_element(By.ID, "send-message")
    box.clear()
    box.send_keys(message)
    driver.execute_script("document.getElementById('send-result').textContent = ''")
    driver.find_element(By.ID, "send-button").click()
    until(driver, lambda d: d.find_element(By.ID, "send-result").text != "", "no result shown")
    return str(driver.find_element(By.ID, "send-result").text)


async def test_dashboard_shows_connections_charts_and_sends(tmp_path: Path, driver: Any) -> None:
    config = write_config(tmp_path, CONFIG)
    with trio.fail_after(TIMEOUT * 3):  # a cold Chromium start is slow on a loaded machine
        async with gateway_process("--config", str(config)) as gateway:
            await run(load_dashboard, driver, gateway.admin_url)
            # The page's Content-Security-Policy lets its inline style apply
            # too (its script evidently runs: the counts show).
            border = await run(
                driver.execute_script,
                "return getComputedStyle(document.querySelector('.card')).borderTopStyle",
            )
            assert border == "solid"
            await run(attribute_becomes, driver, "#chart-connections", "data-latest", "0")
            async with (
                client(gateway.ws_url, token(HS_SECRET, "HS256", sub="alice")) as (ws, hello),
                client(gateway.ws_url, token(HS_SECRET, "HS256", sub="alice")),
            ):
                await run(text_becomes, driver, "connections", "2")
                await run(text_becomes, driver, "users", "1")
                # The charts follow: their latest points are the server's newest sample.
                await run(attribute_becomes, driver, "#chart-connections", "data-latest", "2")
                await run(attribute_becomes, driver, "#chart-users", "data-latest", "1")
                caption = await run(
                    lambda: driver.find_element(By.CSS_SELECTOR, "#chart-connections b").text
                )
                assert caption == "2"
                samples = int(
                    await run(driver.find_element(By.ID, "charts").get_attribute, "data-samples")
                )
                points = await run(chart_points, driver, "connections")
                assert len(points) == samples >= 2
                assert [x for x, _ in points] == sorted(x for x, _ in points)
                # The newest point is at the right edge and at the top (2 is the maximum).
                assert points[-1] == (300.0, 2.0)
                assert hello["session_id"] in await run(sessions_table, driver)
                result = await run(
                    send_from_form, driver, "alice", '{"hello": "from the dashboard"}'
                )
                assert result == "sent to 2 session(s)"
                assert await receive_json(ws) == {"hello": "from the dashboard"}
            await run(text_becomes, driver, "connections", "0")
            await run(attribute_becomes, driver, "#chart-connections", "data-latest", "0")


async def test_dashboard_filters_and_closes_sessions_and_users(tmp_path: Path, driver: Any) -> None:
    config = write_config(tmp_path, CONFIG)
    with trio.fail_after(TIMEOUT * 3):
        async with (
            gateway_process("--config", str(config)) as gateway,
            client(gateway.ws_url, token(HS_SECRET, "HS256", sub="alice")) as (alice, a_hello),
            client(gateway.ws_url, token(HS_SECRET, "HS256", sub="bob")) as (bob, b_hello),
        ):
            a_id, b_id = a_hello["session_id"], b_hello["session_id"]
            await run(load_dashboard, driver, gateway.admin_url, 2)
            await run(table_shows, driver, {a_id, b_id}, set())
            # The history holds a sample with both connected (checked after a reload below).
            await run(attribute_becomes, driver, "#chart-connections", "data-latest", "2")

            # A user's own view: click the user id (GET /api/users/{user_id}/sessions).
            await run(click, driver, f'tr[data-session-id="{b_id}"] .user-link')
            await run(table_shows, driver, {b_id}, {a_id})
            await run(text_becomes, driver, "sessions-total", "of user bob (1)")
            await run(click, driver, "#show-all")
            await run(table_shows, driver, {a_id, b_id}, set())
            # Typing a user id filters the same way; an unknown one shows nothing.
            box = await run(driver.find_element, By.ID, "user-filter")
            await run(box.send_keys, "alice")
            await run(table_shows, driver, {a_id}, {b_id})
            await run(box.send_keys, "x")
            await run(text_becomes, driver, "sessions-total", "of user alicex (0)")
            await run(click, driver, "#show-all")
            await run(table_shows, driver, {a_id, b_id}, set())

            # Close bob's session from its row: refusing the confirmation closes nothing...
            close_bob = f'tr[data-session-id="{b_id}"] .close-session'
            await run(click, driver, close_bob)
            question = await run(answer_confirm, driver, False)
            assert b_id in question and "bob" in question
            sent = await run(send_from_form, driver, "bob", '"still open"')
            assert sent == "sent to 1 session(s)"
            assert await bob.get_message() == "still open"
            # ...and accepting it closes it, with 1000.
            await run(click, driver, close_bob)
            await run(answer_confirm, driver, True)
            with pytest.raises(ConnectionClosed) as closed:
                await bob.get_message()
            assert closed.value.reason.code == 1000
            await run(text_becomes, driver, "action-result", "closed 1 session(s)")
            await run(table_shows, driver, {a_id}, {b_id})

            # Close a user: every session of alice, from her own view.
            async with client(gateway.ws_url, token(HS_SECRET, "HS256", sub="alice")) as (
                alice2,
                a2_hello,
            ):
                await run(click, driver, f'tr[data-session-id="{a_id}"] .user-link')
                await run(table_shows, driver, {a_id, a2_hello["session_id"]}, set())
                await run(click, driver, "#close-user")
                assert "alice" in await run(answer_confirm, driver, True)
                for ws in (alice, alice2):
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == 1000
                await run(text_becomes, driver, "action-result", "closed 2 session(s)")
                await run(text_becomes, driver, "sessions-total", "of user alice (0)")
            await run(attribute_becomes, driver, "#chart-connections", "data-latest", "0")

            # A page opened now shows the history from before it was opened, at once:
            # from the gateway's first sample, with its peak of 2 connections.
            await run(driver.refresh)
            await run(attribute_becomes, driver, "#charts", "data-first-seq", "1")
            peak = await run(
                lambda: driver.find_element(By.CSS_SELECTOR, "#chart-connections .axis").text
            )
            assert "max 2" in peak
