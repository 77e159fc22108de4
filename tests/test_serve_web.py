"""The web chat page in headless Chromium (Debian's `chromium`), driven over the Chrome DevTools protocol
with a minimal stdlib websocket client: the page loads, a message is typed and sent, the reply streams in
(several DOM updates), equals the API's own greedy reply, and a screenshot is saved. Skipped when no
chromium binary is installed (`apt-get install -y chromium`)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from typing import Any

import httpx
import pytest
from fixtures import make_tokenizer_dir

import internlm_jax as ij
from internlm_jax.serve.backend import ServeConfig
from internlm_jax.serve.testing import serve_in_thread, tiny_engine

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1000,800"]


class CDP:
    """Just enough of RFC 6455 (client side) for the DevTools protocol: masked text frames out, frames in."""

    def __init__(self, ws_url: str):
        rest = ws_url.removeprefix("ws://")
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self._id = 0

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("devtools websocket closed")
            buf += part
        return buf

    def _recv_message(self) -> dict:
        data = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            data += self._recv_exact(n)
            if b0 & 0x80:  # FIN
                return json.loads(data)

    def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        payload = json.dumps({"id": self._id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            msg = self._recv_message()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr!r} raised: {res['exceptionDetails']}")
        return res["result"].get("value")


def _wait(fn, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install -y chromium)")
def test_web_chat_page_streams_a_reply(tmp_path):
    lm = ij.init("internlm2-tiny", seed=0, tokenizer=make_tokenizer_dir(tmp_path / "tok"))
    engine = tiny_engine(lm, max_batch=4, max_len=256)
    proc = None
    try:
        with serve_in_thread(engine, lm.tokenizer, ServeConfig(model_name="tiny", random_weights=True)) as (url, _):
            want = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": "Hello there!"}], "max_tokens": 24,
                "temperature": 0}).json()["choices"][0]["message"]["content"]
            profile = tmp_path / "profile"
            proc = subprocess.Popen([CHROMIUM, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                     url + "/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            port_file = profile / "DevToolsActivePort"
            port = int(_wait(lambda: port_file.exists() and port_file.read_text().split("\n")[0], 60,
                             "chromium's DevToolsActivePort"))
            pages = _wait(lambda: [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
                                   if t["type"] == "page"], 30, "a page target")
            cdp = CDP(pages[0]["webSocketDebuggerUrl"])
            cdp.call("Page.navigate", url=url + "/")
            _wait(lambda: cdp.eval("location.href") == url + "/" and cdp.eval("document.readyState") == "complete",
                  30, "the page to load")
            assert _wait(lambda: cdp.eval("document.getElementById('model').textContent").startswith("tiny"), 30,
                         "the model name")
            # count DOM updates of the reply to see it arrive in pieces
            cdp.eval("""window.__updates = 0;
                new MutationObserver((records) => {
                  for (const r of records) {
                    const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
                    if (el && el.closest('.msg.assistant .content') && el.textContent) window.__updates++;
                  }
                })
                  .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
                document.getElementById('temperature').value = '0';
                document.getElementById('max_tokens').value = '24';
                document.getElementById('input').value = 'Hello there!';
                document.getElementById('send').click(); true""")
            status = _wait(lambda: (s := cdp.eval("document.getElementById('status').textContent"))
                           and s.startswith(("done", "error")) and s, 60, "the reply to finish")
            assert status.startswith("done"), status
            shown = cdp.eval("document.querySelector('.msg.assistant .content').textContent")
            assert shown == want
            assert cdp.eval("document.querySelector('.msg.user').textContent") == "Hello there!"
            assert cdp.eval("window.__updates") >= 2  # the reply's text changed several times: it streamed
            shot = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
            assert shot[:8] == b"\x89PNG\r\n\x1a\n"
            out = tmp_path / "web_chat.png"
            out.write_bytes(shot)
            if os.environ.get("IJ_ARTIFACTS"):
                os.makedirs(os.environ["IJ_ARTIFACTS"], exist_ok=True)
                shutil.copy(out, os.path.join(os.environ["IJ_ARTIFACTS"], "web_chat.png"))
            print(f"screenshot: {out}; reply updates: {cdp.eval('window.__updates')}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        engine.shutdown()
