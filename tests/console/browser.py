#!/usr/bin/env python3
"""fleetgate's operator console in a real browser: headless Chromium driven
over WebDriver (chromedriver), with nothing but the standard library.

Run by tests/tests/console.rs against a running `fleetgate serve`:

    browser.py --api URL --link URL --used-link URL --expired-link URL
               --device ID --bystander ID [--screenshots DIR]

It signs in through the one-time link, finds the device (connected by
mosquitto_sub, started by the Rust side), revokes it from its page, and
checks what must be refused is: the used and the expired link, no cookie,
a cross-site POST. Exits non-zero with the reason on the first failure.
"""

import argparse
import base64
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


STARTED = time.time()


def step(what):
    print(f"{time.time() - STARTED:6.1f}s {what}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """A WebDriver session on a chromedriver of its own."""

    def __init__(self):
        port = free_port()
        self.driver = subprocess.Popen(
            ["chromedriver", f"--port={port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("chromedriver did not start")
            time.sleep(0.1)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    # fleetgate's own CA signed the server certificate.
                    "acceptInsecureCerts": True,
                    "goog:chromeOptions": {
                        "binary": os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--window-size=1280,960",
                        ],
                    },
                }
            }
        }
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read().decode()}") from None

    def s(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def go(self, url):
        self.s("POST", "/url", {"url": url})

    def find(self, css, within=10.0):
        """The first element matching `css`, waiting for it."""
        deadline = time.time() + within
        while True:
            found = self.s("POST", "/elements", {"using": "css selector", "value": css})
            if found:
                return found[0][ELEMENT]
            if time.time() > deadline:
                raise AssertionError(f"no {css!r} on {self.url()}:\n{self.text('body')[:2000]}")
            time.sleep(0.1)

    def text(self, css):
        return self.s("GET", f"/element/{self.find(css)}/text")

    def click(self, css):
        self.s("POST", f"/element/{self.find(css)}/click", {})

    def url(self):
        return self.s("GET", "/url")

    def js(self, script, *args):
        return self.s("POST", "/execute/async", {"script": script, "args": list(args)})

    def run(self, script, *args):
        """A script's value (a promise it returns is waited for)."""
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_text(self, css, want, within=10.0):
        deadline = time.time() + within
        while True:
            try:
                got = self.text(css)
            except (AssertionError, RuntimeError):
                got = None
            if got is not None and want in got:
                return got
            if time.time() > deadline:
                raise AssertionError(f"{css!r} never said {want!r} (last: {got!r})")
            time.sleep(0.1)

    def screenshot(self, path):
        png = base64.b64decode(self.s("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)

    def close(self):
        try:
            self.s("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(10)


AXE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_modules", "axe-core", "axe.min.js")


def set_view(b, width, dark):
    """The window's width, and light or dark (prefers-color-scheme)."""
    b.s("POST", "/window/rect", {"width": width, "height": 900})
    b.s("POST", "/goog/cdp/execute", {
        "cmd": "Emulation.setEmulatedMedia",
        "params": {"features": [{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]},
    })


def accessible(b, page):
    """axe-core's checks on the page as it stands: no violation, and no
    sideways scrolling of the page itself."""
    with open(AXE, encoding="utf-8") as f:
        b.run(f.read())
    found = b.run("""
        return axe.run(document, {resultTypes: ["violations"]}).then((r) => r.violations.map((v) =>
            `${v.id} (${v.impact}): ${v.nodes.length} element(s), e.g. ${v.nodes[0].target.join(" ")}: ${v.nodes[0].failureSummary}`));
    """)
    assert not found, f"{page}: axe-core found:\n" + "\n".join(found)
    wide = b.run("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert wide[0] <= wide[1], f"{page}: the page scrolls sideways ({wide[0]} px in {wide[1]})"


def fetch_status(b, path, method="GET", body=None, headers=None):
    """`fetch` from the page (its origin, its cookies): the HTTP status."""
    return b.js(
        """
        const [path, method, body, headers, done] = arguments;
        fetch(path, {method, body, headers, credentials: "same-origin"})
            .then((r) => done(r.status), (e) => done(String(e)));
        """,
        path,
        method,
        body,
        headers or {},
    )


def evil_site(target):
    """Another origin (plain HTTP on another port) with a form that posts
    to `target` on load, as a cross-site request forgery would."""
    page = f"""<!doctype html><html><body>
<form id="f" method="post" action="{target}" enctype="text/plain">
<input name='{{"reason":"key-compromise","x":"' value='"}}'></form>
<script>document.getElementById("f").submit();</script></body></html>""".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *a):
            pass

    # Threads: the browser's idle preconnections must not hold up the rest.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", required=True)
    p.add_argument("--link", required=True)
    p.add_argument("--used-link", required=True)
    p.add_argument("--expired-link", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--bystander", required=True)
    p.add_argument("--pending", required=True)
    p.add_argument("--csr", required=True, help="a CSR for the bystander's new key")
    p.add_argument("--rotated-out", required=True, help="where the rotated chain goes")
    p.add_argument("--screenshots")
    a = p.parse_args()
    api = a.api.rstrip("/")

    step("starting chromium")
    b = Browser()
    try:
        step("no cookie")
        # No cookie: the console and its API refuse.
        b.go(f"{api}/console/")
        b.find("#login-required")
        assert fetch_status(b, "/console/api/me") == 401, "me without a cookie"
        assert fetch_status(b, "/console/api/devices") == 401, "devices without a cookie"

        step("used and expired links")
        # A used link and an expired one are refused.
        for link in (a.used_link, a.expired_link):
            b.go(link)
            b.find("#refused")
        accessible(b, "a refused link's page")

        step("sign in")
        # The one-time link signs in: a session cookie as it must be.
        b.go(a.link)
        b.find("#sign-in")
        accessible(b, "the sign-in page")
        b.click("#sign-in")
        b.find("#live-sessions")
        cookies = {c["name"]: c for c in b.s("GET", "/cookie")}
        c = cookies.get("__Host-fleetgate-console")
        assert c, f"no session cookie: {cookies}"
        assert c["httpOnly"] and c["secure"] and c["sameSite"] == "Strict", c
        # The link was spent.
        b.go(a.link)
        b.find("#refused")
        b.go(f"{api}/console/#/")
        b.wait_text("#live-sessions", "1")
        # The live activity has the refusal the Rust side caused (the
        # bystander publishing on the device's topic).
        b.wait_text("#activity", "reason=acl")
        if a.screenshots:
            b.screenshot(os.path.join(a.screenshots, "console-overview.png"))

        step("the device")
        # The device, connected by mosquitto_sub, in the list and on its page.
        b.go(f"{api}/console/#/devices?q={a.device}")
        row = f'tr[data-device="{a.device}"]'
        b.wait_text(row, "connected")
        b.click(f"{row} a")
        b.wait_text("#device-id", a.device)
        b.wait_text("#device-status", "active")
        b.find("#sessions")
        if a.screenshots:
            b.screenshot(os.path.join(a.screenshots, "console-device.png"))

        step("no CSRF token")
        # A state change without the CSRF token is refused, even from the
        # console's own origin with its cookie.
        assert (
            fetch_status(b, f"/console/api/devices/{a.bystander}/suspend", "POST", "{}",
                         {"Content-Type": "application/json"}) == 403
        ), "a POST without the CSRF token"

        step("revoke")
        # Revoke it from its page, with a reason, confirmed.
        b.click("#action-revoke")
        b.click('#reason option[value="key-compromise"]')
        b.click("#confirm-ok")
        b.wait_text("#device-status", "revoked")
        b.find("#no-session", within=10)
        # The cut shows in the live activity as it happens.
        b.go(f"{api}/console/#/activity")
        b.wait_text("#activity", "kick")
        b.wait_text("#activity", "device.id=console-dev")

        step("cross-site POST")
        # A cross-site POST (a form on another origin) does nothing.
        evil, evil_url = evil_site(f"{api}/console/api/devices/{a.bystander}/revoke")
        b.go(evil_url)
        deadline = time.time() + 10
        while not b.url().startswith(api):
            assert time.time() < deadline, f"the forged form never posted: {b.url()}"
            time.sleep(0.1)
        b.wait_text("body", "login_required")
        evil.shutdown()
        b.go(f"{api}/console/#/devices/{a.bystander}")
        b.wait_text("#device-status", "active")
        # Its refusal (publishing on another device's topic) on its page,
        # with the address it came from and why.
        b.wait_text("#refusals", "acl")
        b.wait_text("#refusals", "127.0.0.1:")
        b.wait_text("#refusals", "MQTT")

        step("rotate a certificate from a CSR, download it as PEM")
        with open(a.csr) as f:
            csr = f.read()
        b.click("#action-rotate")
        b.run("document.getElementById('rotate-csr').value = arguments[0]", csr)
        b.run("document.getElementById('rotate-days').value = '30'")
        b.click("#rotate-ok")
        b.wait_text("#rotated-chain", "BEGIN CERTIFICATE")
        chain = b.text("#rotated-chain")
        assert chain.count("BEGIN CERTIFICATE") == 2, f"the leaf and its issuer: {chain[:200]}"
        n = b.run("return document.querySelectorAll('#certificates a[data-pem]').length")
        assert n == 2, f"two certificates listed after the rotation, not {n}"
        # Each row's PEM link serves that certificate: the new one is the
        # chain's first.
        pems = b.run("return Promise.all([...document.querySelectorAll('#certificates a[data-pem]')]"
                     ".map(a => fetch(a.href).then(r => r.text())))")
        leaf = chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        assert leaf.strip() in [p.strip() for p in pems], f"no row serves the new leaf: {pems}"
        with open(a.rotated_out, "w") as f:
            f.write(chain)
        # A CSR that is not one is refused with why.
        b.click("#action-rotate")
        b.run("document.getElementById('rotate-csr').value = 'not a csr'")
        b.click("#rotate-ok")
        b.wait_text("#action-error", "csr")

        step("approve pending devices")
        # The overview's pending card opens the pending devices; one is
        # approved in bulk from the list, the other from its own page.
        first, second = a.pending.split(",")
        # The overview's counts are refreshed behind the page it shows:
        # loaded again until they have caught up.
        deadline = time.time() + 15
        while True:
            b.go(f"{api}/console/#/devices")
            b.go(f"{api}/console/#/")
            if b.text("#count-pending") == "2":
                break
            assert time.time() < deadline, "the pending count never reached 2"
            time.sleep(0.5)
        b.click("a.card.link[href='#/devices?status=pending']")
        b.wait_text(f'tr[data-device="{first}"]', "pending")
        b.wait_text(f'tr[data-device="{second}"]', "pending")
        b.click(f'input[data-pick="{first}"]')
        b.click("#approve-selected")
        b.click("#confirm-ok")
        b.wait_text("#approve-result", "Approved 1")
        b.wait_text(f'tr[data-device="{second}"]', "pending")
        assert not b.run(f"return !!document.querySelector('tr[data-device=\"{first}\"]')"), \
            "an approved device still listed as pending"
        b.go(f"{api}/console/#/devices/{second}")
        b.wait_text("#device-status", "pending")
        b.click("#action-approve")
        b.click("#confirm-ok")
        b.wait_text("#device-status", "active")
        # A change made here shows on the overview's next load.
        b.go(f"{api}/console/#/")
        b.wait_text("#count-pending", "0", within=3)

        step("one certificate revoked from its device's page")
        b.go(f"{api}/console/#/devices/{first}")
        b.wait_text("#certificates", "good")
        b.click("button[data-revoke-cert]")
        b.click('#reason option[value="superseded"]')
        b.click("#confirm-ok")
        b.wait_text("#certificates", "revoked")
        b.wait_text("#device-status", "active")

        step("a manufacturer's page, revoked from it; a claim's page")
        b.go(f"{api}/console/#/")
        b.click("#manufacturers-table a[href='#/manufacturers/acme']")
        b.wait_text("#maker-name", "acme")
        b.wait_text("#maker-status", "active")
        b.wait_text("#maker-ca", "CN=")
        b.click("#action-revoke")
        b.click('#reason option[value="key-compromise"]')
        b.click("#confirm-ok")
        b.wait_text("#maker-status", "revoked")
        b.go(f"{api}/console/#/devices?role=claim")
        b.click('tr[data-device="line-1"] a')
        b.wait_text("#claim-uses-left", "3")
        b.wait_text("#claim", "No device provisioned yet")

        step("audit log, newest first, filtered, exported")
        b.go(f"{api}/console/#/audit")
        b.find("#audit")
        seqs = b.run("return [...document.querySelectorAll('#audit td.seq')].map(td => +td.textContent)")
        assert seqs and seqs == sorted(seqs, reverse=True), f"not newest first: {seqs}"
        newest = b.run("return fetch('/console/api/audit').then(r => r.json()).then(p => p.items[0].seq)")
        assert seqs[0] == newest, f"the first row {seqs[0]} is not the newest entry {newest}"
        b.run("document.getElementById('audit-action').value = 'approve'")
        b.click("#audit-filter button[type=submit]")
        b.wait_text("#audit", second)
        actions = b.run("return [...document.querySelectorAll('#audit tbody tr')].map(tr => tr.children[3].textContent)")
        assert actions and all(x == "approve" for x in actions), f"filtered by action: {actions}"
        assert len(actions) == 2, f"two approvals: {actions}"
        b.go(f"{api}/console/#/audit?device={second}")
        b.find("#audit")
        devices = b.run("return [...document.querySelectorAll('#audit tbody tr')].map(tr => tr.children[4].textContent)")
        assert devices and all(d == second for d in devices), f"filtered by device: {devices}"
        csv = b.run("return fetch(document.getElementById('export-csv').href).then(r => r.text())")
        assert csv.splitlines()[0] == "seq,at,actor,action,device,serial,detail", csv[:200]
        assert all(second in line for line in csv.splitlines()[1:]), csv[:400]
        assert "jit-register" in csv and "approve" in csv, csv[:400]

        step("accessibility (axe-core), 1280 and 400 px, light and dark")
        pages = [
            ("overview", f"{api}/console/#/", "#live-sessions"),
            ("devices", f"{api}/console/#/devices", "#devices"),
            ("device", f"{api}/console/#/devices/{a.bystander}", "#device-status"),
            ("audit", f"{api}/console/#/audit", "#audit"),
            ("activity", f"{api}/console/#/activity", "#activity"),
            ("manufacturer", f"{api}/console/#/manufacturers/slowco", "#maker-ca"),
            ("claim", f"{api}/console/#/devices/line-1", "#claim"),
        ]
        for width in (1280, 400):
            for dark in (False, True):
                set_view(b, width, dark)
                for name, url, ready in pages:
                    b.go(url)
                    b.find(ready)
                    accessible(b, f"{name} at {width} px{' dark' if dark else ''}")
                    if a.screenshots and (name, width, dark) == ("overview", 400, True):
                        b.screenshot(os.path.join(a.screenshots, "console-overview-400-dark.png"))
        set_view(b, 1280, False)

        step("sign out")
        # Signing out ends the session.
        b.go(f"{api}/console/#/")
        b.find("#live-sessions")
        b.click("#logout")
        b.find("#signed-out")
        assert fetch_status(b, "/console/api/me") == 401, "me after signing out"
    finally:
        b.close()
    print("console: all browser checks passed")


if __name__ == "__main__":
    main()
