"""The page of ``splitstems serve`` in Debian's Chromium, driven by Playwright.

Set ``SPLITSTEMS_WEB_SCREENSHOTS=<folder>`` to save the screenshots of docs/web.md
(web-empty.png, web-working.png, web-done.png) while the tests run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fidelity import MIN_SDR_DB, sdr
from webserver import SONGS, Server, song, start_server

from splitstems import audio

SHOTS = os.environ.get("SPLITSTEMS_WEB_SCREENSHOTS")


@pytest.fixture()
def page(browser, server: Server) -> Iterator[tuple[object, list[str]]]:
    """A fresh page on the server, and the console errors and page errors it logs."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1000, "height": 640})
    tab = context.new_page()
    problems: list[str] = []

    def console(message) -> None:  # noqa: ANN001
        if message.type == "error":
            url = message.location.get("url", "") if message.location else ""
            problems.append(f"{message.type}: {message.text}" + (f" [{url}]" if url else ""))

    tab.on("console", console)
    tab.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    tab.goto(server.url + "/")
    tab.wait_for_selector(
        "#model option[value='spleeter:4stems']", state="attached"
    )  # config loaded
    yield tab, problems
    context.close()


def _wait_until(page, expression: str, timeout: float = 60.0) -> None:
    """Poll a JS expression (the page's CSP forbids Playwright's wait_for_function)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {timeout} s: {expression}"
        time.sleep(0.1)


def _shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"web-{name}.png"))


def test_song_separates_plays_mutes_and_downloads_as_the_cli_does(
    page, shared_dir: Path, model_env: dict[str, str], tmp_path: Path
) -> None:
    tab, problems = page
    _shot(tab, "empty")
    source = song(shared_dir)
    tab.set_input_files("input[type=file]", str(source))  # choosing starts it
    tab.wait_for_selector('a[data-download="vocals"][href]', timeout=120_000)
    assert tab.locator("audio[data-stem]").count() == 2
    assert tab.locator("audio[data-stem='accompaniment']").count() == 1

    # play: the player's time advances, all stems together; the slider does not move
    # when Play becomes Pause (a wider label)
    seek_x = tab.locator(".seek").bounding_box()["x"]
    tab.get_by_role("button", name="Play").click()
    _wait_until(tab, "document.querySelector('audio[data-stem=vocals]').currentTime > 1.3", 20)
    times = tab.evaluate("[...document.querySelectorAll('audio')].map(a => a.currentTime)")
    assert max(times) - min(times) < 0.3, times
    _wait_until(tab, "document.querySelector('.time').textContent !== '0:00 / 0:06'", 5)
    assert tab.locator(".seek").bounding_box()["x"] == seek_x

    # mute the vocals, from the keyboard
    mute = tab.get_by_role("button", name="Mute vocals")
    mute.focus()
    tab.keyboard.press("Space")
    assert mute.get_attribute("aria-pressed") == "true"
    assert tab.evaluate("document.querySelector('audio[data-stem=vocals]').muted") is True
    assert tab.evaluate("document.querySelector('audio[data-stem=accompaniment]').muted") is False
    assert "vocals=0" in tab.locator("a[data-download-mix]").get_attribute("href")
    _shot(tab, "done")

    # seek by keyboard: arrows move 5 s, Home goes to the start
    tab.get_by_role("button", name="Pause").click()
    position = tab.get_by_role("slider", name="Position")
    position.focus()
    tab.keyboard.press("Home")
    tab.keyboard.press("ArrowRight")
    at = tab.evaluate("[...document.querySelectorAll('audio')].map(a => a.currentTime)")
    assert all(abs(t - 5.0) < 0.01 for t in at), at
    assert position.get_attribute("aria-valuetext") == "0:05 of 0:06"
    tab.keyboard.press("ArrowLeft")
    assert tab.evaluate("document.querySelector('audio[data-stem=vocals]').currentTime") == 0

    # download a stem; it is what `splitstems separate` writes
    with tab.expect_download() as download:
        tab.click('a[data-download="vocals"]')
    download.value.save_as(tmp_path / "web-vocals.wav")
    assert download.value.suggested_filename == "BKS - Too Much.stem-vocals.wav"
    subprocess.run(
        [sys.executable, "-m", "splitstems", "separate", str(source), "-o", str(tmp_path / "cli")],
        env={**os.environ, **model_env},
        check=True,
        capture_output=True,
        timeout=300,
    )
    cli = audio.load(tmp_path / "cli" / "BKS - Too Much.stem" / "vocals.wav")
    web = audio.load(tmp_path / "web-vocals.wav")
    assert cli.shape == web.shape
    assert sdr(cli, web) >= MIN_SDR_DB  # 50 dB
    assert problems == []


def test_non_audio_file_gives_an_alert_naming_it(page) -> None:
    tab, problems = page
    tab.set_input_files(
        "input[type=file]",
        files=[{"name": "shopping list.mp3", "mimeType": "audio/mpeg", "buffer": b"eggs\n" * 99}],
    )
    alert = tab.get_by_role("alert")
    alert.wait_for(timeout=30_000)
    assert alert.inner_text().startswith("shopping list.mp3: not an audio file")
    # the refused upload's 415 is the one line Chromium logs
    assert len(problems) == 1 and "415" in problems[0], problems


NAMES = "[...document.querySelectorAll('.job-name')].map(h => h.textContent)"


def test_three_files_at_once_all_finish(page, server: Server, shared_dir: Path) -> None:
    tab, problems = page
    before = len(server.json("/api/jobs")["jobs"])
    # odd names: a backslash is an ordinary character on Linux and macOS, <b> is text
    files = [
        {
            "name": f'{SONGS[k]} \\ live "é" <b>.mp4',
            "mimeType": "video/mp4",
            "buffer": song(shared_dir, k).read_bytes(),
        }
        for k in range(3)
    ]
    tab.set_input_files("input[type=file]", files)
    _wait_until(tab, f"document.querySelectorAll('.job[data-job]').length === {before + 3}")
    _shot(tab, "working")
    _wait_until(tab, f"document.querySelectorAll('.job.done').length === {before + 3}", timeout=180)
    assert tab.locator("audio[data-stem=vocals]").count() == before + 3
    names = tab.evaluate(NAMES)
    assert names[:3] == [f'{SONGS[k]} \\ live "é" <b>.mp4' for k in (2, 1, 0)], names
    tab.reload()
    _wait_until(tab, f"document.querySelectorAll('.job.done').length === {before + 3}")
    assert sorted(tab.evaluate(NAMES)) == sorted(names)  # the same names after a reload
    assert problems == []


def test_page_fits_a_phone_screen(browser, server: Server, shared_dir: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 800})
    tab = context.new_page()
    tab.goto(server.url + "/")
    tab.wait_for_selector("#model option[value='spleeter:4stems']", state="attached")
    if not server.json("/api/jobs")["jobs"]:  # alone: a song of its own (else the others')
        tab.set_input_files("input[type=file]", str(song(shared_dir)))
    tab.wait_for_selector('a[data-download="vocals"][href]', timeout=120_000)  # a player too
    assert tab.evaluate("document.documentElement.scrollWidth") <= 390
    context.close()


def test_a_song_removed_elsewhere_is_marked_and_remove_keeps_the_focus(
    page, server: Server
) -> None:
    tab, problems = page
    _wait_until(tab, "document.querySelectorAll('.job.done').length >= 3")  # the songs so far
    cards = tab.locator(".job.done")
    ids = [cards.nth(k).get_attribute("data-job") for k in range(cards.count())]
    # removed on the server (expiry, another tab, a script): the page marks it when it looks
    status = server.json(f"/api/jobs/{ids[0]}", method="DELETE")
    assert status is None  # 204
    tab.evaluate("window.dispatchEvent(new Event('focus'))")
    gone = tab.locator(f".job[data-job='{ids[0]}']")
    gone.locator(".job-state", has_text="expired").wait_for(timeout=10_000)
    assert gone.get_attribute("class").split() == ["job", "done", "gone"]
    assert gone.get_by_role("button", name="Play").is_disabled()
    assert gone.locator("a[data-download='vocals']").get_attribute("href") is None
    assert tab.locator(f".job[data-job='{ids[1]}'] .play").is_enabled()  # the others are not
    # Remove by keyboard: the focus goes to the next song, then (last one) the file chooser
    for k in range(len(ids)):
        tab.locator(f".job[data-job='{ids[k]}'] .job-remove").focus()
        tab.keyboard.press("Enter")
        if k < len(ids) - 1:
            focused = "document.activeElement.closest('.job')?.dataset.job"
            assert tab.evaluate(focused) == ids[k + 1]
    assert tab.evaluate("document.activeElement.id") == "files"
    assert tab.locator("#empty").is_visible()
    # the removed song's own URLs may answer 404 (how the page can learn it is gone): only those
    gone_404 = [p for p in problems if "status of 404" in p and f"/{ids[0]}" in p]
    assert [p for p in problems if p not in gone_404] == []


def test_a_model_the_server_cannot_load_is_reported_and_marked(
    page, server: Server, tmp_path: Path
) -> None:
    tab, problems = page
    one_second = tmp_path / "one second.wav"
    audio.save(one_second, np.zeros((44100, 2), np.float32), sample_rate=44100)
    tab.select_option("#model", "spleeter:4stems")  # not on this offline server
    tab.set_input_files("input[type=file]", str(one_second))
    alert = tab.get_by_role("alert")
    alert.wait_for(timeout=60_000)
    message = "one second.wav: the model spleeter:4stems is not available on this server"
    assert alert.inner_text().startswith(message)  # no URL, no --model-dir: that is for the log
    assert "SPLITSTEMS_MODEL_DIR" in server.log.read_text()
    option = tab.locator("#model option[value='spleeter:4stems']")
    _wait_until(tab, "document.querySelector('#model option[value=\"spleeter:4stems\"]').disabled")
    assert option.inner_text() == "spleeter:4stems (not available on this server)"
    # dismissed, it stays dismissed after a reload; the song's card keeps the message
    alert.get_by_role("button", name="Dismiss").click()
    tab.reload()
    tab.wait_for_selector(".job.failed .job-error")
    assert tab.locator(".job.failed .job-error").first.inner_text() == message
    assert tab.get_by_role("alert").count() == 0
    assert problems == []


def test_upload_over_the_limit_is_refused_with_a_clear_message(
    browser, model_env: dict[str, str], tmp_path: Path, shared_dir: Path
) -> None:
    small = start_server(model_env, tmp_path, "--max-upload", "64K")
    try:
        context = browser.new_context()
        tab = context.new_page()
        tab.goto(small.url + "/")
        tab.wait_for_selector("#model option[value='spleeter:4stems']", state="attached")
        assert "up to 64.0 KB" in tab.locator("#limit-hint").inner_text()
        tab.set_input_files("input[type=file]", str(song(shared_dir)))
        alert = tab.get_by_role("alert")
        alert.wait_for(timeout=30_000)
        assert alert.inner_text().startswith(
            "BKS - Too Much.stem.mp4: 1.1 MB is over this server's upload limit of 64.0 KB"
        ), alert.inner_text()
        assert tab.locator(".job").count() == 0
        assert small.json("/api/jobs")["jobs"] == []
        # a refused upload leaves the empty list's hint in place
        tab.set_input_files(
            "input[type=file]",
            files=[{"name": "notes.mp3", "mimeType": "audio/mpeg", "buffer": b"la\n" * 50}],
        )
        tab.get_by_role("alert").nth(1).wait_for(timeout=30_000)
        assert tab.locator("#empty").is_visible()
        # the server stops: the page says so
        small.stop()
        tab.evaluate("window.dispatchEvent(new Event('focus'))")
        notice = tab.locator("#server-gone")
        notice.wait_for(timeout=10_000)
        assert notice.get_attribute("role") == "alert"
        assert "server has stopped" in notice.inner_text()
        context.close()
    finally:
        small.stop()


def test_traversal_urls_in_the_browser_are_404(page, server: Server) -> None:
    tab, _ = page
    for path in ("/static/%2e%2e/app.py", "/static/..%2fjobs.py", "/api/jobs/%2e%2e%2f%2e%2e"):
        response = tab.goto(server.url + path)
        assert response.status == 404, path
        assert "import" not in tab.content()
