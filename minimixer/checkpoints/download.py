"""Downloads that are checked before they are kept.

    fetch(url, path, kind=..., sha256_prefix=None, timeout=600) -> the file's SHA-256
    check_file(path, kind, full=False)                           (cached files, before use)

A body is streamed into a temporary file beside `path` and renamed onto it only after
every check the source allows has passed, so a cache never holds a bad file:
- size: the hub's X-Linked-Size, else Content-Length; a short or long body fails;
- digest: the hub's SHA-256 (X-Linked-Etag, or the ETag of an LFS file: 64 hex digits),
  Google Cloud Storage's MD5 (x-goog-hash), MMPretrain's SHA-256 prefix (in its file names);
- contents: a safetensors header whose tensors end exactly at the end of the file, a zip
  (.npz, torch .pth) whose every member passes its CRC-32, and a Mixer checkpoint in it;
- an overall deadline: a server that trickles bytes (body or headers), or sends none, or a name
  lookup that hangs, ends the download in bounded time (the network part runs in a thread that
  is waited for until the deadline).
Failures raise DownloadError with a one-line reason; the caller adds what to do.
"""
import base64
import hashlib
import http.client
import json
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

from .convert import read_checkpoint
from .safetensors_io import atomic_target, atomic_write_bytes

DEFAULT_TIMEOUT = 600.0  # seconds for a whole download; MINIMIXER_DOWNLOAD_TIMEOUT or --timeout change it
SOCKET_TIMEOUT = 30.0  # the longest wait for a connection or for the next packet
CHUNK = 1 << 20
KINDS = ("safetensors", "npz", "pth")


class DownloadError(Exception):
    """A download that failed or did not pass its checks; the message is one line."""


class _Hops(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping each hop's headers: the hub puts the file's
    size and SHA-256 on its redirect (X-Linked-Size, X-Linked-Etag), not on the CDN's answer."""

    def __init__(self):
        self.hops = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append((req.full_url, headers))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _hex64(value):
    value = (value or "").strip()
    value = value.removeprefix("W/")
    value = value.strip('"').lower()
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def _int(value):
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


def announced(hops, final_url, final_headers):
    """(size, sha256, md5 base64) that the server's headers announce, None where none is given.
    An ETag counts as SHA-256 only from the host asked first (the hub's own), never a CDN's."""
    first_host = urllib.parse.urlsplit(hops[0][0] if hops else final_url).hostname
    size = sha256 = None
    for url, headers in [*hops, (final_url, final_headers)]:
        size = size if size is not None else _int(headers.get("X-Linked-Size"))
        sha256 = sha256 or _hex64(headers.get("X-Linked-Etag"))
        if urllib.parse.urlsplit(url).hostname == first_host:
            sha256 = sha256 or _hex64(headers.get("ETag"))
    length = None if final_headers.get("Content-Encoding") else _int(final_headers.get("Content-Length"))
    if size is not None and length is not None and size != length:
        raise DownloadError(f"the server sends {length} bytes but announced a {size}-byte file")
    md5 = None
    for part in (final_headers.get("x-goog-hash") or "").split(","):
        if part.strip().startswith("md5="):
            md5 = part.strip()[4:]
    return size if size is not None else length, sha256, md5


def fetch(url, path, *, kind, sha256_prefix=None, timeout=DEFAULT_TIMEOUT):
    """Download url to path (renamed into place only once checked); returns its SHA-256,
    which is also written to path + '.sha256' (sha256sum's format). Raises DownloadError.

    The network part runs in a daemon thread that this one waits for until the deadline:
    so name lookup, connecting, headers sent byte by byte and a trickling body are all bounded
    (a socket timeout alone restarts with every byte). A thread left behind stops at its next
    read, and the temporary file it writes into is removed here."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    deadline = time.monotonic() + timeout
    with atomic_target(path) as tmp:
        state = {"got": 0, "size": None, "cancel": False}
        with open(tmp, "wb") as f:  # opened here, so a late thread can never create a file
            worker = threading.Thread(target=_receive, args=(url, f, deadline, timeout, state), daemon=True)
            try:
                worker.start()
                worker.join(max(0.0, deadline - time.monotonic()) + 0.1)
            finally:
                state["cancel"] = True  # also on Ctrl-C: the thread stops at its next read
            if not worker.is_alive() and "error" not in state and not state.get("late"):
                f.flush()
                os.fsync(f.fileno())
        if worker.is_alive() or state.get("late"):
            raise DownloadError(f"not complete after {timeout:g} s ({_progress(state['got'], state['size'])}); "
                                f"a slow connection needs a longer --timeout")
        if "error" in state:
            raise state["error"]
        size, sha256, md5, got = state["size"], state["sha256"], state["md5"], state["got"]
        if size is not None and got != size:
            raise DownloadError(f"the body is short: {_progress(got, size)}")
        hexdigest = state["digest"].hexdigest()
        if sha256 and hexdigest != sha256:
            raise DownloadError(f"SHA-256 {hexdigest[:16]}... is not the {sha256[:16]}... "
                                f"the server announced: a damaged download")
        if md5 and base64.b64encode(state["md5_digest"].digest()).decode() != md5:
            raise DownloadError(f"MD5 is not the {md5} the server announced: a damaged download")
        check_file(tmp, kind, full=True, sha256_prefix=sha256_prefix, sha256=hexdigest)
        atomic_write_bytes(path + ".sha256", f"{hexdigest}  {os.path.basename(path)}\n".encode())
    return hexdigest


def _receive(url, f, deadline, timeout, state):
    """fetch's network part: the body into the open file f, hashed on the way; results and
    errors in state."""
    hops = _Hops()
    opener = urllib.request.build_opener(hops)
    request = urllib.request.Request(url, headers={"User-Agent": "minimixer"})
    wait = min(SOCKET_TIMEOUT, timeout)
    try:
        with opener.open(request, timeout=wait) as response:
            if response.headers.get_content_type() == "text/html":
                raise DownloadError("the server answered with a web page (text/html), not the file")
            size, state["sha256"], md5 = announced(hops.hops, response.geturl(), response.headers)
            state["size"], state["md5"] = size, md5
            digest, md5_digest = hashlib.sha256(), hashlib.md5() if md5 else None
            state["digest"], state["md5_digest"] = digest, md5_digest
            while True:
                if state["cancel"] or time.monotonic() > deadline:
                    state["late"] = True
                    return
                chunk = response.read1(CHUNK)  # returns what has arrived: the deadline is checked often
                if not chunk:
                    break
                state["got"] += len(chunk)
                if size is not None and state["got"] > size:
                    raise DownloadError(f"the server sent more than the {size} bytes it announced")
                digest.update(chunk)
                if md5_digest:
                    md5_digest.update(chunk)
                f.write(chunk)
    except DownloadError as e:
        state["error"] = e
    except urllib.error.HTTPError as e:
        state["error"] = DownloadError(f"HTTP {e.code} {e.reason}")
    except urllib.error.URLError as e:
        timed_out = isinstance(e.reason, (socket.timeout, TimeoutError))
        state["error"] = DownloadError(f"no answer within {wait:g} s" if timed_out else str(e.reason))
    except (socket.timeout, TimeoutError):
        state["error"] = DownloadError(f"no data for {wait:g} s ({_progress(state['got'], state['size'])})")
    except http.client.IncompleteRead as e:
        state["error"] = DownloadError(f"the connection closed early ({_progress(len(e.partial), state['size'])})")
    except (http.client.HTTPException, OSError, ValueError) as e:
        state["error"] = DownloadError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


def _progress(got, size):
    return f"{got} of {size} bytes" if size is not None else f"{got} bytes received"


def check_file(path, kind, *, full=False, sha256=None, sha256_prefix=None):
    """Raise DownloadError unless path holds a whole checkpoint of `kind`. The quick check
    (every use of a cached file) reads the safetensors header or the zip directory: it catches
    a web page, a truncated file, another format. full=True also runs every zip member's CRC-32
    and compares the SHA-256 (given, or recorded in path + '.sha256', and the prefix)."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
        if head.lstrip()[:1] == b"<":
            raise DownloadError("it is a web page (HTML), not a checkpoint")
        if kind == "safetensors":
            _check_safetensors(path, file_size)
        elif head[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if kind == "npz" and not (names and all(n.endswith(".npy") for n in names)):
                    raise DownloadError("a zip archive, but not a .npz of arrays")
                if kind == "pth" and not any(n.endswith("/data.pkl") for n in names):
                    raise DownloadError("a zip archive, but not a torch .pth")
                bad = zf.testzip() if full else None
                if bad is not None:
                    raise DownloadError(f"member {bad} fails its CRC-32: a damaged download")
        elif not (kind == "pth" and head[:3] == b"\x80\x02\x8a"):  # torch < 1.6 wrote a bare pickle
            raise DownloadError(f"not a {kind} file (it starts with {head[:8]!r})")
        if full:
            recorded = sha256 or _recorded_sha256(path)
            if recorded or sha256_prefix:
                actual = sha256 or _sha256(path)
                if recorded and actual != recorded:
                    raise DownloadError(f"SHA-256 is not the {recorded[:16]}... recorded when it was downloaded")
                if sha256_prefix and not actual.startswith(sha256_prefix):
                    raise DownloadError(f"SHA-256 does not start with {sha256_prefix}: a damaged download")
        read_checkpoint(path, load=False)  # names and shapes: a Mixer checkpoint of a known source
    except DownloadError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, struct.error) as e:
        raise DownloadError(str(e).replace(os.fspath(path) + ": ", "") or type(e).__name__) from None


def _check_safetensors(path, file_size):
    """The header must parse and its tensors must tile the data that follows it, to the last byte."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 2 <= n <= min(file_size - 8, 100_000_000):
            raise DownloadError(f"not a safetensors file (header length {n} for a {file_size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise DownloadError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise DownloadError("not a safetensors file (its header is not a mapping)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise DownloadError(f"not a safetensors file (bad offsets for {name!r})")
        end = max(end, offsets[1])
    if end != file_size - 8 - n:
        raise DownloadError(f"the file is {'short' if end > file_size - 8 - n else 'too long'}: its header "
                            f"describes {8 + n + end} bytes, the file has {file_size}")


def _recorded_sha256(path):
    try:
        with open(path + ".sha256") as f:
            return _hex64(f.read().split()[0])
    except (OSError, IndexError):
        return None


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
