"""The JSON API of ``splitstems serve`` against a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fidelity import sdr
from webserver import Server, song, start_server

from splitstems import audio


def _raw(
    server: Server,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, http.client.HTTPResponse]:
    """One request with the path sent exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def _upload(server: Server, path: Path, name: str | None = None, **params: str) -> dict:
    query = urllib.parse.urlencode({"name": name or path.name, **params})
    status, body, _ = _raw(server, "POST", f"/api/jobs?{query}", body=path.read_bytes())
    assert status == 201, body
    return json.loads(body)


@pytest.fixture(scope="module")
def done_job(server: Server, shared_dir: Path) -> dict:
    job = _upload(server, song(shared_dir))
    assert job["state"] in ("queued", "running")
    return server.wait_done(job["id"])


def test_job_gives_stems_zip_and_mix_that_add_up(
    server: Server, done_job: dict, tmp_path: Path
) -> None:
    assert done_job["state"] == "done", done_job
    assert [s["name"] for s in done_job["stems"]] == ["vocals", "accompaniment"]
    assert all(len(s["peaks"]) > 100 for s in done_job["stems"])
    stems = {}
    for stem in done_job["stems"]:
        status, body, response = _raw(server, "GET", stem["url"])
        assert status == 200
        assert f"Too%20Much.stem-{stem['name']}.wav" in response.headers["content-disposition"]
        (tmp_path / f"{stem['name']}.wav").write_bytes(body)
        stems[stem["name"]] = audio.load(tmp_path / f"{stem['name']}.wav")
    assert stems["vocals"].shape == (done_job["n_samples"], 2)

    status, body, _ = _raw(server, "GET", done_job["zip"])
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert sorted(archive.namelist()) == ["accompaniment.wav", "vocals.wav"]
        assert archive.read("vocals.wav") == (tmp_path / "vocals.wav").read_bytes()

    # the song without its vocals is the accompaniment stem; vocals + accompaniment at 0.5
    status, body, _ = _raw(server, "GET", done_job["mix"] + "?vocals=0")
    assert status == 200
    (tmp_path / "karaoke.wav").write_bytes(body)
    assert sdr(stems["accompaniment"], audio.load(tmp_path / "karaoke.wav")) > 80
    status, body, _ = _raw(server, "GET", done_job["mix"] + "?vocals=0.5&accompaniment=0.5")
    (tmp_path / "half.wav").write_bytes(body)
    half = 0.5 * (stems["vocals"] + stems["accompaniment"])
    assert sdr(half, audio.load(tmp_path / "half.wav")) > 60  # 16-bit rounding of a quieter mix
    # the mix files are deleted once sent
    job_folder = next(p for p in server.tmpdir.rglob(done_job["id"]) if p.is_dir())
    time.sleep(0.5)
    assert not list(job_folder.glob("mix-*"))

    status, body, _ = _raw(server, "GET", done_job["stems"][0]["url"] + "?codec=mp3")
    assert status == 200 and body[:3] in (b"ID3", b"\xff\xfb")
    status, body, _ = _raw(server, "GET", done_job["stems"][0]["url"] + "?codec=exe")
    assert status == 400 and b"codec must be one of" in body
    status, body, _ = _raw(server, "GET", done_job["mix"] + "?vocals=9")
    assert status == 400 and b"gain of vocals" in body


def test_events_stream_reports_the_finished_job(server: Server, done_job: dict) -> None:
    status, body, response = _raw(server, "GET", f"/api/jobs/{done_job['id']}/events")
    assert status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line]
    assert events[-1]["state"] == "done"


def test_non_audio_upload_is_refused_naming_the_file(server: Server) -> None:
    before = server.leftovers()
    query = urllib.parse.urlencode({"name": "notes.mp3"})
    status, body, _ = _raw(server, "POST", f"/api/jobs?{query}", body=b"just some text\n" * 100)
    assert status == 415
    error = json.loads(body)["error"]
    assert error.startswith("notes.mp3: not an audio file"), error
    assert str(server.tmpdir) not in error
    assert server.leftovers() == before


def test_upload_names_keep_backslashes_and_lose_folders(server: Server) -> None:
    # "\\" is an ordinary character in Linux and macOS file names: the name is kept whole
    for sent, shown in [
        ('odd é "q" <s>alert(1)<\\s>.mp3', 'odd é "q" <s>alert(1)<\\s>.mp3'),
        ("music/albums/x.mp3", "x.mp3"),
    ]:
        query = urllib.parse.urlencode({"name": sent})
        status, body, _ = _raw(server, "POST", f"/api/jobs?{query}", body=b"text\n" * 100)
        assert status == 415
        assert json.loads(body)["error"].startswith(f"{shown}: not an audio file"), body


def test_errors_of_the_http_layer_are_json_too(server: Server) -> None:
    status, body, response = _raw(server, "PUT", "/api/jobs", body=b"x")
    assert status == 405
    assert json.loads(body) == {"error": "method not allowed"}
    assert "GET" in response.headers["allow"]
    status, body, _ = _raw(server, "DELETE", "/static/app.js")
    assert status == 405 and json.loads(body) == {"error": "method not allowed"}


@pytest.mark.parametrize(
    "host", ["[::1]", "localhost", "127.0.0.1", "[::1]:{port}", "127.0.0.1:{port}"]
)
def test_loopback_host_headers_are_accepted_with_or_without_a_port(
    server: Server, host: str
) -> None:
    status, body, _ = _raw(
        server, "GET", "/api/config", headers={"Host": host.format(port=server.port)}
    )
    assert status == 200, body


@pytest.mark.parametrize("host", ["evil.test", "evil.test:80", "[::2]:80", "127.0.0.1.evil.test"])
def test_other_host_headers_are_refused(server: Server, host: str) -> None:
    status, body, _ = _raw(server, "GET", "/api/config", headers={"Host": host})
    assert status == 400, body
    assert json.loads(body)["error"].endswith("is not this server's (it listens on loopback only)")


def test_unknown_model_and_empty_body_are_refused(server: Server) -> None:
    status, body, _ = _raw(server, "POST", "/api/jobs?name=a.wav&model=../../x", body=b"RIFF")
    assert status == 400 and b"a.wav: unknown model" in body
    status, body, _ = _raw(server, "POST", "/api/jobs?name=b.wav", body=b"")
    assert status == 400 and json.loads(body)["error"] == "b.wav: empty file"


def test_upload_over_the_limit_is_refused_before_and_while_streaming(
    model_env: dict[str, str], tmp_path: Path, shared_dir: Path
) -> None:
    small = start_server(model_env, tmp_path, "--max-upload", "64K")
    try:
        # announced size over the limit: refused from the headers, the body is never read
        conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=30)
        conn.putrequest("POST", "/api/jobs?name=huge.wav")
        conn.putheader("Content-Length", str(10 * 1024**3))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"] == (
            "huge.wav: 10.0 GB is over this server's upload limit of 64.0 KB "
            "(splitstems serve --max-upload)"
        )
        conn.close()
        # no size announced (chunked): cut off at the limit
        data = song(shared_dir).read_bytes()
        assert len(data) > 64 * 1024
        conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=30)
        parts = (data[i : i + 16384] for i in range(0, 256 * 1024, 16384))
        conn.request("POST", "/api/jobs?name=song.mp4", body=parts, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        assert (
            "song.mp4: it is over this server's upload limit of 64.0 KB"
            in (json.loads(response.read())["error"])
        )
        conn.close()
        assert small.leftovers() == [next(small.tmpdir.iterdir())]  # the empty jobs root
    finally:
        small.stop()


TRAVERSALS = [
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/static/%2E%2E/jobs.py",
    "/static/..%2fapp.py",
    "/static/%2e%2e%2f%2e%2e%2fweb%2fapp.py",
    "/static/../../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/%252e%252e/app.py",
    "/static/..\\app.py",
    "/..%2f..%2f..%2fetc%2fpasswd",
    "/api/jobs/..%2f..%2f..%2fetc%2fpasswd",
    "/api/jobs/%2e%2e/events",
]


def test_dot_dot_paths_give_404_and_leak_nothing(server: Server, done_job: dict) -> None:
    job = done_job["id"]
    paths = [
        *TRAVERSALS,
        f"/api/jobs/{job}/stems/..%2finput",
        f"/api/jobs/{job}/stems/%2e%2e",
        f"/api/jobs/{job}/stems/../../{job}/input",
        f"/api/jobs/{job}/stems/vocals%2f..%2f..%2finput",
        f"/api/jobs/{job}/../{job}/input",
    ]
    index = (Path(__file__).parents[2] / "src/splitstems/web/static/index.html").read_bytes()
    for path in paths:
        status, body, _ = _raw(server, "GET", path)
        assert status == 404, (path, status, body[:200])
        assert len(body) < 200, (path, body[:200])
        for secret in (b"root:", b"import ", b"def ", index[:50], str(server.tmpdir).encode()):
            assert secret not in body, (path, body)
    # the same requests on a real static file and the real stem work (the test can fail)
    assert _raw(server, "GET", "/static/app.js")[0] == 200
    assert _raw(server, "GET", f"/api/jobs/{job}/stems/vocals")[0] == 200


def test_delete_removes_the_files_and_stop_removes_everything(
    model_env: dict[str, str], tmp_path: Path, shared_dir: Path
) -> None:
    running = start_server(model_env, tmp_path, "--keep", "1")
    try:
        first = _upload(running, song(shared_dir))
        assert running.wait_done(first["id"])["state"] == "done"
        assert any(p.name == first["id"] for p in running.leftovers())
        # expiry: a finished job is gone about a second after it ended
        running.wait_files_gone(first["id"], timeout=10)
        assert _raw(running, "GET", f"/api/jobs/{first['id']}")[0] == 404
        # delete of a queued or running job, at once
        second = _upload(running, song(shared_dir, 1))
        assert _raw(running, "DELETE", f"/api/jobs/{second['id']}")[0] == 204
        running.wait_files_gone(second["id"], timeout=30)
        assert _raw(running, "DELETE", f"/api/jobs/{second['id']}")[0] == 404
        # stop with a job in the queue: every file goes
        _upload(running, song(shared_dir, 2))
        assert running.leftovers()
    finally:
        code = running.stop()
    assert code in (0, 143)
    assert running.leftovers() == []


def test_three_uploads_at_once_all_finish_with_bounded_memory(
    server: Server, done_job: dict, shared_dir: Path
) -> None:
    one_job = server.peak_rss_mb()  # the model is loaded and one song was separated
    results: list[dict] = []

    def post(k: int) -> None:
        results.append(_upload(server, song(shared_dir, k)))

    threads = [threading.Thread(target=post, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 3
    finished = [server.wait_done(job["id"]) for job in results]
    assert [job["state"] for job in finished] == ["done"] * 3
    assert len({job["id"] for job in finished}) == 3
    three_jobs = server.peak_rss_mb()
    assert three_jobs - one_job < 200, (one_job, three_jobs)


def test_token_host_and_origin_are_checked(
    model_env: dict[str, str], tmp_path: Path, shared_dir: Path
) -> None:
    locked = start_server(model_env, tmp_path, "--token", "s3cret-token")
    try:
        status, body, _ = _raw(locked, "GET", "/api/config")
        assert status == 401 and b"token" in body
        # a person opening the address without ?token= gets a page that says so, not JSON
        status, body, response = _raw(locked, "GET", "/")
        assert status == 401
        assert response.headers["content-type"].startswith("text/html")
        assert b"<h1>This splitstems server needs its token</h1>" in body
        assert b"Authorization: Bearer &lt;token&gt;" in body
        assert (
            _raw(locked, "GET", "/api/config", headers={"Authorization": "Bearer nope"})[0] == 401
        )
        ok = {"Authorization": "Bearer s3cret-token"}
        assert _raw(locked, "GET", "/api/config", headers=ok)[0] == 200
        status, _, response = _raw(locked, "GET", "/?token=s3cret-token")
        assert status == 200
        cookie = response.headers["set-cookie"].split(";")[0]
        assert _raw(locked, "GET", "/api/jobs", headers={"Cookie": cookie})[0] == 200
        # a page of another site, or a name that resolves here (DNS rebinding)
        status, body, _ = _raw(locked, "GET", "/api/jobs", headers={**ok, "Host": "evil.test"})
        assert status == 400
        status, body, _ = _raw(
            locked,
            "POST",
            "/api/jobs?name=a.mp4",
            body=song(shared_dir).read_bytes(),
            headers={**ok, "Origin": "http://evil.test"},
        )
        assert status == 403
    finally:
        locked.stop()


def test_host_beyond_loopback_needs_a_token(model_env: dict[str, str]) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "splitstems", "serve", "--host", "0.0.0.0", "--port", "9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--host 0.0.0.0 can be reached from other machines: pass --token" in result.stderr


def test_unknown_job_and_stem_are_404(server: Server, done_job: dict) -> None:
    assert _raw(server, "GET", "/api/jobs/" + "0" * 32)[0] == 404
    assert _raw(server, "GET", "/api/jobs/not-an-id")[0] == 404
    assert _raw(server, "GET", f"/api/jobs/{done_job['id']}/stems/drums")[0] == 404
    with pytest.raises(urllib.error.HTTPError):
        server.json("/api/jobs/" + "f" * 32)


def test_delete_of_a_running_job_or_a_conversion_stops_it_and_leaks_no_path(
    server: Server, done_job: dict, tmp_path: Path
) -> None:
    # 60 s of a separated stem: five model segments, so the job is seen running
    long_song = tmp_path / "long.wav"
    stem = audio.load(next(server.tmpdir.rglob("vocals.wav")))
    audio.save(long_song, np.resize(stem, (60 * 44100, 2)), sample_rate=44100)
    job = _upload(server, long_song)
    deadline = time.monotonic() + 60
    while server.json(f"/api/jobs/{job['id']}")["progress"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.json(f"/api/jobs/{job['id']}")["state"] == "running"
    assert _raw(server, "DELETE", f"/api/jobs/{job['id']}")[0] == 204
    server.wait_files_gone(job["id"], timeout=30)
    assert _raw(server, "GET", f"/api/jobs/{job['id']}")[0] == 404
    # the worker is free for the next song
    after = server.wait_done(_upload(server, long_song, name="after.wav")["id"])
    assert after["state"] == "done"

    # removed while a stem is converted for download: a 404 naming the song, no server path
    stems = next(p for p in server.tmpdir.rglob(after["id"]) if p.is_dir()) / "stems"
    answers: list[tuple[int, bytes, http.client.HTTPResponse]] = []
    url = after["stems"][1]["url"] + "?codec=m4a"  # 60 s of AAC: about 2 s to encode
    fetch = threading.Thread(target=lambda: answers.append(_raw(server, "GET", url)))
    fetch.start()
    deadline = time.monotonic() + 30
    while not list(stems.glob(".*.part*")):  # the encoder's temp file
        assert time.monotonic() < deadline and fetch.is_alive(), answers
        time.sleep(0.01)
    assert _raw(server, "DELETE", f"/api/jobs/{after['id']}")[0] == 204
    fetch.join(60)
    status, body, response = answers[0]
    assert status == 404, (status, body)
    assert response.headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "after.wav: removed from this server while it was prepared"
    assert b"/" not in body  # no path of any kind


def test_open_starts_the_browser_on_the_page(model_env: dict[str, str], tmp_path: Path) -> None:
    opened = tmp_path / "opened.txt"
    browser = f"/bin/sh -c 'echo \"$0\" > {opened}' %s"  # $BROWSER, as webbrowser reads it
    running = start_server({**model_env, "BROWSER": browser}, tmp_path, "--open")
    try:
        deadline = time.monotonic() + 20
        while not opened.exists() or not opened.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert opened.read_text().strip() == f"http://localhost:{running.port}/"
        assert "serving on" in running.log.read_text()
    finally:
        running.stop()


def test_a_full_queue_refuses_more_songs_until_one_is_done(
    model_env: dict[str, str], tmp_path: Path, shared_dir: Path
) -> None:
    long_song = tmp_path / "long.wav"
    audio.save(
        long_song, np.resize(audio.load(song(shared_dir)), (120 * 44100, 2)), sample_rate=44100
    )
    running = start_server(model_env, tmp_path, "--queue", "1")
    try:
        first = _upload(running, long_song)
        query = urllib.parse.urlencode({"name": "second.mp4"})
        status, body, _ = _raw(
            running, "POST", f"/api/jobs?{query}", body=song(shared_dir).read_bytes()
        )
        assert status == 503
        assert json.loads(body)["error"] == (
            "second.mp4: the queue is full (1 song waiting or running); try again when one is done"
        )
        assert _raw(running, "DELETE", f"/api/jobs/{first['id']}")[0] == 204
        second = _upload(running, song(shared_dir), name="second.mp4")
        assert running.wait_done(second["id"])["state"] == "done"
    finally:
        running.stop()
