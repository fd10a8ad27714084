"""Downloads against a loopback server that misbehaves: a web page with status 200, a body that
does not match its SHA-256, a short body, a server that trickles or stays silent. Each download
must exit non-zero in bounded time with one line and leave nothing in the cache; a cached file
that fails its check is fetched again; the next good download works.

The server listens on 127.0.0.1 only, answers at most MAX_REQUESTS requests and stops by itself
after LIFETIME seconds even if a test forgets it."""
import base64
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace

import pytest

from minimixer.checkpoints import download as dl
from minimixer.checkpoints import registry
from minimixer.checkpoints.registry import BUNDLED_DIGITS
from minimixer.commands import cli
from minimixer.commands import weights as mweights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
GOOD = open(BUNDLED_DIGITS, "rb").read()  # a real safetensors Mixer (the bundled digits model)
SHA = hashlib.sha256(GOOD).hexdigest()
NPZ = open(os.path.join(FIXTURES, "jax_tiny.npz"), "rb").read()
PTH = open(os.path.join(FIXTURES, "mmpretrain_tiny.pth"), "rb").read()
HTML = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>\n"
TAG = "mixer_b16_224.goog_in21k_ft_in1k"
HUB_PATH = f"/timm/{TAG}/resolve/main/model.safetensors"
MAX_REQUESTS, LIFETIME = 40, 60.0


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers every path with the server's current scenario (server.scenario)."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        name = self.server.scenario
        self.server.seen.append((name, self.path))
        if name == "trickle":  # a valid header, then one byte every 0.5 s (at most 40: bounded)
            self._head(200, "application/octet-stream", len(GOOD), SHA)
            for byte in GOOD[:40]:
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return  # the client gave up, as it should
                time.sleep(0.5)
            return
        if name == "header_trickle":  # the status line, then a header one byte every 0.5 s (at most 40)
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for byte in b"X-Slow: " + b"z" * 32:
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.5)
            return
        if name == "silent":  # headers, then nothing, for up to 20 s
            self._head(200, "application/octet-stream", len(GOOD), SHA)
            time.sleep(20)
            return
        if name == "redirect" and self.path.startswith("/timm/"):  # the hub: size and hash on the redirect
            self.send_response(302)
            self.send_header("Location", "/cdn/blob")
            self.send_header("X-Linked-Etag", f'"{SHA}"')
            self.send_header("X-Linked-Size", str(len(GOOD)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, ctype, etag, length, extra = {
            "good": (GOOD, "application/octet-stream", SHA, None, {}),
            # the CDN's own ETag is not the file's SHA-256 and must not be read as one
            "redirect": (GOOD, "binary/octet-stream", "f" * 64, None, {}),
            "html": (HTML, "text/html; charset=utf-8", None, None, {}),
            "html_as_binary": (HTML, "application/octet-stream", None, None, {}),
            "wrong_sha": (GOOD, "application/octet-stream", "0" * 64, None, {}),
            "short": (GOOD[: len(GOOD) // 2], "application/octet-stream", SHA, len(GOOD), {}),
            "truncated_safetensors": (GOOD[:-100], "application/octet-stream", None, None, {}),
            "not_found": (b"", "text/plain", None, None, {}),
            "npz": (NPZ, "application/octet-stream", None, None, self.server.extra),
            "short_npz": (NPZ[: len(NPZ) // 2], "application/octet-stream", None, None, {}),
            "pth": (PTH, "application/octet-stream", None, None, {}),
            "body": (getattr(self.server, "body", b""), "application/octet-stream", None, None, {}),
        }[name]
        if name == "not_found":
            self._head(404, ctype, 0, None)
            return
        self._head(200, ctype, len(body) if length is None else length, etag, extra)
        try:
            self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True

    def _head(self, status, ctype, length, etag, extra=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        if etag:
            self.send_header("ETag", f'"{etag}"')
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.scenario, srv.seen, srv.extra = "good", [], {}
    srv.timeout = 0.2
    stop = threading.Event()

    def serve():  # bounded: MAX_REQUESTS requests or LIFETIME seconds, whichever comes first
        end = time.monotonic() + LIFETIME
        while not stop.is_set() and time.monotonic() < end and len(srv.seen) < MAX_REQUESTS:
            srv.handle_request()
        srv.server_close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    stop.set()
    thread.join(5)


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("MINIMIXER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MINIMIXER_DOWNLOAD_TIMEOUT", raising=False)
    return server, tmp_path / "cache"


def download(*args):
    return cli.run(mweights.main, ["download", *args], prog="python -m minimixer.weights")


def error_lines(err):
    return [line for line in err.splitlines() if "error" in line]


def cache_listing(cache):
    return sorted(os.listdir(cache)) if cache.exists() else []


@pytest.mark.parametrize("scenario,reason", [
    ("html", "web page"),
    ("html_as_binary", "web page"),
    ("wrong_sha", "SHA-256"),
    ("short", "short"),
    ("truncated_safetensors", "short"),
    ("not_found", "HTTP 404"),
])
def test_bad_answer_exits_2_with_one_line_and_caches_nothing(hub, capsys, scenario, reason):
    server, cache = hub
    server.scenario = scenario
    start = time.monotonic()
    assert download("mixer_b16_224", "--timeout", "20") == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 15
    assert len(error_lines(err)) == 1 and reason in err and "Traceback" not in err, err
    assert "by hand" in err  # and what to do
    assert cache_listing(cache) == []  # not even a temporary file
    # the next good download works, and is what the server sent
    server.scenario = "good"
    assert download("mixer_b16_224") == 0
    out = capsys.readouterr().out.strip()
    assert open(out, "rb").read() == GOOD
    assert cache_listing(cache) == [f"{TAG}.safetensors", f"{TAG}.safetensors.sha256"]
    assert open(out + ".sha256").read().split()[0] == SHA


@pytest.mark.parametrize("scenario", ["trickle", "header_trickle", "silent"])
def test_trickle_or_silence_ends_at_the_deadline(hub, capsys, scenario):
    server, cache = hub
    server.scenario = scenario
    start = time.monotonic()
    assert download("mixer_b16_224", "--timeout", "2") == 2
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert took < 3, (took, err)  # the deadline, whatever phase the download is in
    assert len(error_lines(err)) == 1 and ("not complete after 2 s" in err or "no data for 2 s" in err), err
    assert cache_listing(cache) == []


def test_trickle_in_a_real_process_exits_non_zero_in_bounded_time(hub):
    server, cache = hub
    server.scenario = "trickle"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MINIMIXER_DOWNLOAD_TIMEOUT": "2"}  # as --weights auto would get it
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "minimixer.weights", "download", "mixer_b16_224"],
                       capture_output=True, text=True, timeout=60, env=env)
    took = time.monotonic() - start
    print(f"{took:.2f} s", r.stderr)
    assert r.returncode == 2 and took < 20 and "not complete after 2 s" in r.stderr
    assert len(error_lines(r.stderr)) == 1 and cache_listing(cache) == []


def test_the_hubs_redirect_gives_size_and_sha256_not_the_cdns_etag(hub, capsys):
    server, cache = hub
    server.scenario = "redirect"
    assert download("mixer_b16_224") == 0, capsys.readouterr().err
    assert [p for _, p in server.seen] == [HUB_PATH, "/cdn/blob"]
    assert open(capsys.readouterr().out.strip(), "rb").read() == GOOD


def test_announced_reads_hub_headers_and_rejects_a_mismatch():
    hops = [("https://huggingface.co/x", {"X-Linked-Size": "10", "X-Linked-Etag": f'"{SHA}"'})]
    assert dl.announced(hops, "https://cdn/x", {"Content-Length": "10", "ETag": '"' + "a" * 64 + '"'}) == \
        (10, SHA, None)
    with pytest.raises(dl.DownloadError, match="sends 9 bytes but announced a 10-byte file"):
        dl.announced(hops, "https://cdn/x", {"Content-Length": "9"})
    # a weak or non-hex ETag is no SHA-256; a GCS MD5 is read from x-goog-hash
    assert dl.announced([], "https://h/x", {"ETag": 'W/"abc"', "x-goog-hash": "crc32c=AAAA==, md5=Zm9v"}) == \
        (None, None, "Zm9v")


def test_a_poisoned_cache_is_fetched_again(hub, capsys):
    server, cache = hub
    cache.mkdir()
    for bad in (HTML, GOOD[:-1], b""):  # what the old downloader could have cached
        (cache / f"{TAG}.safetensors").write_bytes(bad)
        path = registry.find_weights("mixer_b16_224", "auto")  # eval's and predict's --weights auto
        err = capsys.readouterr().err
        assert "fetching it again" in err and open(path, "rb").read() == GOOD
    # a bad cached file that cannot be fetched again leaves nothing behind either
    (cache / f"{TAG}.safetensors").write_bytes(HTML)
    server.scenario = "short"
    with pytest.raises(registry.WeightsNotFound, match="short"):
        registry.find_weights("mixer_b16_224", "auto")
    assert cache_listing(cache) == []
    server.scenario = "good"
    path = registry.find_weights("mixer_b16_224", "auto")
    # a good cached file is used without asking the server
    before = len(server.seen)
    assert registry.find_weights("mixer_b16_224", "auto") == path and len(server.seen) == before


def test_explicit_download_hashes_the_cached_file(hub, capsys):
    server, cache = hub
    assert download("mixer_b16_224") == 0
    path = capsys.readouterr().out.strip()
    data = bytearray(GOOD)
    data[-1] ^= 1  # a flipped bit in the last tensor: the header still parses
    open(path, "wb").write(bytes(data))
    assert registry.find_weights("mixer_b16_224", "auto") == path  # the quick check cannot see it
    assert download("mixer_b16_224") == 0  # the explicit one can, and fetches again
    assert "recorded when it was downloaded; fetching it again" in capsys.readouterr().err
    assert open(path, "rb").read() == GOOD


def test_offline_with_nothing_cached_says_what_to_do(hub, capsys, monkeypatch):
    server, cache = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download("mixer_b16_224") == 2
    err = capsys.readouterr().err
    assert "offline" in err and "by hand" in err and server.seen == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_timeouts_are_one_line(hub, capsys, monkeypatch, value):
    with pytest.raises(SystemExit) as e:  # argparse's exit, as the shell sees it
        download("mixer_b16_224", "--timeout", value)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    monkeypatch.setenv("MINIMIXER_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(ValueError, match="MINIMIXER_DOWNLOAD_TIMEOUT"):
        registry.find_weights("mixer_b16_224", "auto")


# --- the original files: MMPretrain's .pth (SHA-256 prefix) and Google's .npz (parsed, GCS MD5) ---

def with_url(monkeypatch, tag, url):
    monkeypatch.setitem(registry.CHECKPOINTS, tag, replace(registry.CHECKPOINTS[tag], url=url))


def test_mmpretrain_tag_checks_the_sha256_prefix(hub, capsys, monkeypatch):
    server, cache = hub
    server.scenario = "pth"
    tag = "mixer_b16_224.mmpretrain"
    with_url(monkeypatch, tag, f"{server.url}/mixer-tiny_20211124-00000000.pth")
    assert download(tag) == 2
    err = capsys.readouterr().err
    assert "SHA-256 does not start with 00000000" in err and cache_listing(cache) == []
    prefix = hashlib.sha256(PTH).hexdigest()[:8]
    with_url(monkeypatch, tag, f"{server.url}/mixer-tiny_20211124-{prefix}.pth")
    assert download(tag) == 0
    assert open(capsys.readouterr().out.strip(), "rb").read() == PTH
    assert cache_listing(cache) == [f"{tag}.pth", f"{tag}.pth.sha256"]


@pytest.mark.parametrize("tag", ["mixer_b16_224.jax_in1k", "mixer_b16_224.jax_in21k", "mixer_b32_224.jax_sam_in1k"])
def test_jax_tags_are_parsed_before_they_are_cached(hub, capsys, monkeypatch, tag):
    server, cache = hub
    with_url(monkeypatch, tag, f"{server.url}/{registry.CHECKPOINTS[tag].url.split('/mixer_models/')[1]}")
    for scenario in ("short_npz", "html_as_binary", "pth"):  # a truncated zip, a page, another format
        server.scenario = scenario
        assert download(tag) == 2
        err = capsys.readouterr().err
        assert len(error_lines(err)) == 1 and cache_listing(cache) == [], err
    server.scenario, server.extra = "npz", {"x-goog-hash": "crc32c=AAAAAA==, md5=" + "A" * 22 + "=="}
    assert download(tag) == 2 and "MD5" in capsys.readouterr().err  # GCS's MD5, when it sends one
    server.extra = {"x-goog-hash": "md5=" + base64.b64encode(hashlib.md5(NPZ).digest()).decode()}
    assert download(tag) == 0
    assert open(capsys.readouterr().out.strip(), "rb").read() == NPZ


def test_a_damaged_zip_member_fails_its_crc(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("stem/kernel.npy", b"\x93NUMPY" + b"x" * 200)
    data = bytearray(buf.getvalue())
    data[100] ^= 0xFF  # inside the member's bytes; the directory is intact
    path = tmp_path / "a.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(dl.DownloadError, match="fails its CRC-32"):
        dl.check_file(str(path), "npz", full=True)


def test_every_published_tag_has_a_source():
    for tag, ck in registry.CHECKPOINTS.items():
        if ck.model == "mixer_digits":
            continue
        url, kind, prefix = registry.source_of(ck)
        assert url.startswith("https://") and kind in dl.KINDS, tag
        assert (prefix is not None) == (ck.source == "mmpretrain"), tag


def test_ctrl_c_during_a_download_leaves_nothing(hub, capsys):
    import signal
    server, cache = hub
    server.scenario = "trickle"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C, one second in
    timer.start()
    start = time.monotonic()
    try:
        assert download("mixer_b16_224", "--timeout", "20") == 130
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5
    assert capsys.readouterr().err.strip().splitlines()[-1] == "python -m minimixer.weights: interrupted"
    assert cache_listing(cache) == []
