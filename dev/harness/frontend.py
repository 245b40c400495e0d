"""Drive the real ComfyUI frontend in headless Debian Chromium through Playwright.

Loads UI-format workflow JSON with the frontend's own ``app.loadGraphData``, checks every node
type is registered, converts it with the frontend's own ``app.graphToPrompt`` and takes
screenshots. Chromium comes from Debian (``/usr/bin/chromium``); Playwright never downloads a
browser here.
"""

from __future__ import annotations

import os
import shutil
import time

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        raise RuntimeError("Debian's chromium is not installed; run 'make env' (apt-get install chromium).")
    return path


class FrontendError(AssertionError):
    """The frontend could not load or convert a workflow."""


class Frontend:
    """One headless Chromium page on a ComfyUI server's frontend."""

    def __init__(self, server_url: str, viewport=(2400, 1500)):
        self.server_url = server_url
        self.viewport = viewport
        self.console_errors: list[str] = []

    def __enter__(self) -> Frontend:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        self.page = self._browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
        self.page.on("pageerror", lambda error: self.console_errors.append(f"pageerror: {error}"))
        self.page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        self.page.goto(self.server_url, wait_until="domcontentloaded", timeout=120_000)
        self.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        # The app finishes registering node definitions from /object_info after the graph exists.
        self.page.wait_for_function(
            "() => Object.keys(window.LiteGraph.registered_node_types).length > 50", timeout=120_000
        )
        return self

    def __exit__(self, *exc) -> None:
        self._browser.close()
        self._playwright.stop()

    def load_workflow(self, workflow: dict) -> None:
        """Load UI-format JSON; raise ``FrontendError`` on unknown node types or load errors."""
        result = self.page.evaluate(
            """async (workflow) => {
                const registered = window.LiteGraph.registered_node_types;
                const missing = workflow.nodes.map(n => n.type).filter(t => !(t in registered));
                if (missing.length) return {missing};
                try {
                    await window.app.loadGraphData(workflow, true, true, null);
                } catch (e) { return {error: String(e && e.stack || e)}; }
                const loaded = window.app.graph._nodes.length;
                const unknown = window.app.graph._nodes.filter(n => n.has_errors || !(n.type in registered))
                                     .map(n => n.type);
                return {loaded, unknown};
            }""",
            workflow,
        )
        if result.get("missing"):
            raise FrontendError(f"missing node types: {sorted(set(result['missing']))}")
        if result.get("error"):
            raise FrontendError(f"loadGraphData failed: {result['error']}")
        if result.get("unknown"):
            raise FrontendError(f"nodes failed to load: {result['unknown']}")
        if result["loaded"] != len(workflow["nodes"]):
            raise FrontendError(f"loaded {result['loaded']} of {len(workflow['nodes'])} nodes")

    def set_widgets(self, values_by_node_type: dict[str, dict]) -> int:
        """Set widget values on every node of the given types in the loaded graph (e.g. a
        smaller image size for a quick run). Returns how many widgets were set."""
        return self.page.evaluate(
            """(values) => {
                let count = 0;
                for (const node of window.app.graph._nodes) {
                    const wanted = values[node.type];
                    if (!wanted) continue;
                    for (const widget of node.widgets || []) {
                        if (widget.name in wanted) { widget.value = wanted[widget.name]; count++; }
                    }
                }
                window.app.graph.setDirtyCanvas(true, true);
                return count;
            }""",
            values_by_node_type,
        )

    def queue_and_wait(self, server, timeout: float = 900.0) -> dict:
        """Queue the loaded graph through the frontend's own ``app.queuePrompt`` (so the page
        receives progress and previews) and wait for the server to finish it.

        Returns the history entry; raises ``FrontendError`` unless it ends in
        ``execution_success``.
        """
        before = set(server.get("/history?max_items=10000"))
        self.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        deadline = time.time() + timeout
        while time.time() < deadline:
            new = [key for key in server.get("/history?max_items=10000") if key not in before]
            if new:
                entry = server.wait(new[0], timeout=max(1.0, deadline - time.time()))
                events = [message[0] for message in entry["status"].get("messages", [])]
                if "execution_success" not in events:
                    raise FrontendError(f"prompt ended without execution_success: {events}")
                self.page.wait_for_timeout(500)  # let the page draw the last previews
                return entry
            time.sleep(0.5)
        raise FrontendError(f"nothing was queued/finished within {timeout:.0f} s")

    def graph_to_prompt(self) -> dict:
        """The API-format prompt, as the frontend's own ``graphToPrompt`` makes it."""
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def screenshot(self, path: str, fit_view: bool = True) -> str:
        """Save a PNG of the page, by default zoomed so the whole graph is in view."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if fit_view:
            self.page.evaluate("async () => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
            self.page.wait_for_timeout(300)
        self.page.screenshot(path=path)
        return path
