"""Headless Chromium (Debian's package) driven over the DevTools protocol, for the report test.

:func:`open_report` starts ``chromium`` with a fresh profile and the flags this closed network
needs (no background connections), opens a Snakemake HTML report, and walks it as a reader does:
the first page, then every category and subcategory of the report's menu, showing every image and
HTML result. It returns what rendered and every console error, uncaught exception and error log
entry the page produced. The browser is a hard requirement: :func:`chromium_path` fails with the
install command when it is missing (CI installs it, see ``.ci/run``).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0"]

# Runs in the page: every category / subcategory of the report, each result shown, what rendered.
WALK = r"""
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const out = {first_page: document.querySelector('#app').innerText, categories: {}};
  const viewer = new ToggleViewManager(app);
  for (const [category, subcats] of Object.entries(categories)) {
    const cat = out.categories[category] = {};
    for (const [subcategory, paths] of Object.entries(subcats)) {
      app.setView({navbarMode: "menu"});
      await sleep(100);
      app.setView({navbarMode: "subcategory", category: category, subcategory: subcategory});
      await sleep(300);
      const menu = document.querySelector("#app").innerText;
      const shown = [];
      for (const path of paths) {
        const entry = results[path];
        const mime = getResultMimeType(path);
        // the menu names a result by its labels where it has them, else by its file name
        const labels = entry.labels ? Object.values(entry.labels).map(String) : [entry.name];
        const item = {path: path, name: entry.name, mime: mime, labels: labels,
                      listed: labels.every((label) => menu.includes(label)), rendered: null};
        if (!item.listed) item.menu = menu.slice(0, 800);
        if (mime.startsWith("image/") || mime === "text/html") {
          viewer.handleSelectedResult(path);
          await sleep(200);
          if (mime.startsWith("image/")) {
            const img = Array.from(document.querySelectorAll('img')).find((i) => i.src === entry.data_uri);
            if (img && !img.complete) await new Promise((r) => { img.onload = r; img.onerror = r; });
            item.rendered = !!img && img.naturalWidth > 0 && img.naturalHeight > 0;
          } else {
            const frame = Array.from(document.querySelectorAll('iframe')).find((f) => f.src === entry.data_uri);
            item.rendered = !!frame;
          }
        }
        shown.push(item);
      }
      cat[subcategory] = shown;
    }
  }
  return JSON.stringify(out);
})()
"""


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    raise AssertionError("headless Chromium is needed for the report test and is not installed: "
                         "apt-get install -y chromium (Debian's package; .ci/run installs it)")


async def _walk(url: str, timeout: float) -> tuple[dict, list[str]]:
    import aiohttp

    profile = tempfile.mkdtemp(prefix="cxrssl-chromium-")
    proc = subprocess.Popen([chromium_path(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                port = match.group(1)
                break
        assert port, "Chromium did not start its DevTools endpoint"
        async with aiohttp.ClientSession() as session:
            targets = await (await session.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            counter, errors = 0, []

            def note(msg: dict) -> None:
                method, params = msg.get("method"), msg.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                          for a in params.get("args", [])))
                elif method == "Runtime.exceptionThrown":
                    details = params.get("exceptionDetails", {})
                    errors.append("exception: " + str(details.get("exception", {}).get("description")
                                                      or details.get("text")))
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    errors.append("log: " + params["entry"].get("text", ""))

            async def call(method: str, **params):
                nonlocal counter
                counter += 1
                await ws.send_json({"id": counter, "method": method, "params": params})
                while True:
                    msg = await asyncio.wait_for(ws.receive_json(), timeout)
                    if msg.get("id") == counter:
                        if "error" in msg:
                            raise AssertionError(f"DevTools {method}: {msg['error']}")
                        return msg["result"]
                    note(msg)

            for domain in ("Runtime", "Log", "Page"):
                await call(f"{domain}.enable")
            await call("Page.navigate", url=url)
            ready = "typeof app !== 'undefined' && document.querySelector('#loading-screen').style.display === 'none'"
            for _ in range(int(timeout * 4)):
                state = await call("Runtime.evaluate", expression=ready, returnByValue=True)
                if state["result"].get("value") is True:
                    break
                await asyncio.sleep(0.25)
            else:
                raise AssertionError(f"the report did not finish loading in {timeout} s")
            result = await call("Runtime.evaluate", expression=WALK, awaitPromise=True, returnByValue=True)
            if "exceptionDetails" in result:
                raise AssertionError(f"walking the report failed: {result['exceptionDetails']}")
            await asyncio.sleep(0.5)
            await call("Runtime.evaluate", expression="1")  # drain the events logged meanwhile
            return json.loads(result["result"]["value"]), errors
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def open_report(path: str | Path, timeout: float = 120) -> tuple[dict, list[str]]:
    """(what rendered, page errors) of the Snakemake HTML report at ``path``."""
    return asyncio.run(_walk(Path(path).resolve().as_uri(), timeout))
