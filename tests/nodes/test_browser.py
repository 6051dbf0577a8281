"""The shipped workflows in the real frontend: Debian chromium driven by Python playwright.

Each file is dropped onto the canvas with real dragenter/dragover/drop events (the frontend's own file
handler loads it), then: no missing node types, the frontend's own UI → API conversion
(``app.graphToPrompt``) equals ``workflows/api/<name>.json``, the CPU-size widget changes are made through
``node.widgets`` and the Run button's ``app.queuePrompt`` runs the graph to completion on the test server.

Never runs ``playwright install``: the browser is the system's /usr/bin/chromium (apt-get install chromium).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests.support.prerequisites import missing

from .helpers import WORKFLOW_NAMES, WORKFLOWS_DIR, astronaut_png, load_api, without_meta

pytestmark = pytest.mark.comfyui

CHROMIUM = os.environ.get("DP_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

READY_JS = """() => !!(window.app && app.graph && app.canvas && app.api
    && app.extensionManager && app.extensionManager.workflow && app.extensionManager.workflow.activeWorkflow)"""

CLOSE_DIALOGS_JS = """() => {
    const vue = document.querySelector('#vue-app').__vue_app__;
    const store = vue.config.globalProperties.$pinia._s.get('dialog');
    const keys = store.dialogStack.map(d => d.key);
    for (const key of keys) store.closeDialog({key});
    return keys;
}"""

DIALOG_KEYS_JS = """() => document.querySelector('#vue-app').__vue_app__.config.globalProperties
    .$pinia._s.get('dialog').dialogStack.map(d => d.key)"""

DROP_JS = """async ([text, name]) => {
    const file = new File([text], name, {type: 'application/json'});
    const target = document.querySelector('#graph-canvas');
    const dt = new DataTransfer();
    dt.items.add(file);
    const rect = target.getBoundingClientRect();
    const at = {clientX: rect.left + rect.width / 2, clientY: rect.top + rect.height / 2};
    for (const type of ['dragenter', 'dragover', 'drop']) {
        target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt, ...at}));
    }
}"""

GRAPH_JS = """() => app.graph._nodes.map(n => ({id: n.id, type: n.type, has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => [w.name, w.value])}))"""

SET_WIDGETS_JS = """(changes) => {
    for (const [type, values] of Object.entries(changes)) {
        const nodes = app.graph._nodes.filter(n => n.type === type);
        if (!nodes.length) throw new Error('no node ' + type);
        for (const node of nodes) for (const [name, value] of Object.entries(values)) {
            const widget = node.widgets.find(w => w.name === name);
            if (!widget) throw new Error(type + ' has no widget ' + name);
            widget.value = value;
        }
    }
    app.graph.setDirtyCanvas(true, true);
}"""


@pytest.fixture(scope="module")
def page(comfy_server):
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        missing(f"no chromium at {CHROMIUM} (apt-get install -y chromium; scripts/setup_env.sh does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(comfy_server.base_url, wait_until="domcontentloaded", timeout=120_000)
            tab.wait_for_function(READY_JS, timeout=120_000)
            tab.wait_for_timeout(1500)  # the first-visit Templates dialog opens after the app is ready
            tab.evaluate(CLOSE_DIALOGS_JS)
            tab.page_errors = errors
            yield tab
        finally:
            browser.close()


def _drop(page, name: str) -> list[dict]:
    text = (WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8")
    page.evaluate(CLOSE_DIALOGS_JS)
    page.evaluate("() => app.graph.clear()")
    page.evaluate(DROP_JS, [text, f"{name}.json"])
    expected = sorted(n["type"] for n in json.loads(text)["nodes"])
    page.wait_for_function(
        "(types) => JSON.stringify(app.graph._nodes.map(n => n.type).sort()) === JSON.stringify(types)",
        arg=expected, timeout=30_000)
    page.wait_for_timeout(500)
    return page.evaluate(GRAPH_JS)


def _queue_and_wait(page, server, timeout: float = 600.0) -> dict:
    before = set(server.get_json("/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = {k: v for k, v in server.get_json("/history").items() if k not in before}
        for entry in new.values():
            status = entry.get("status") or {}
            if status.get("completed"):
                return entry
            if status.get("status_str") == "error":
                raise AssertionError(f"queued workflow failed: {json.dumps(status)[:3000]}")
        time.sleep(0.5)
    raise TimeoutError(f"queued workflow did not finish; log tail:\n{server.log_tail()}")


def _tiny_changes(server, photo: str, task: str) -> dict:
    changes = {"CheckpointLoaderSimple": {"ckpt_name": server.models.checkpoint_name},
               "LoadImage": {"image": photo},
               "DiffPrivacy_FaceAlign": {"size": 64},
               "DiffPrivacy_MSIInvert": {"steps": 2, "inversion_steps": 4},
               "DiffPrivacy_PrivacySampler": {"steps": 4, "batch_size": 2 if task == "anonymize" else 1,
                                              "seed": 7 if task == "anonymize" else 8},
               "DiffPrivacy_IdentityEnergyGuidance": {"max_identity_similarity": 1.0},
               "DiffPrivacy_SaveImageClean": {"filename_prefix": f"browser_{task}"},
               "DiffPrivacy_ProtectFaces": {"size": 64, "msi_steps": 2, "inversion_steps": 4, "steps": 4,
                                            "batch_size": 1, "max_identity_similarity": 1.0}}
    return changes


def _screenshot(page, name: str, folder: str) -> None:
    """Close dialogs and banners, fit the graph into view (the frontend's Fit View command), save
    <folder>/<name>.png."""
    from PIL import Image

    page.evaluate(CLOSE_DIALOGS_JS)
    viewport = page.viewport_size
    page.set_viewport_size({"width": 2800, "height": 1500})  # fit zoom high enough for text to render
    page.wait_for_timeout(500)
    page.evaluate("""async () => {
        for (const el of document.querySelectorAll('div')) {
            if (el.children.length < 6 && /Introducing Nodes 2\\.0/.test(el.textContent || '')
                && el.getBoundingClientRect().height < 60) el.style.display = 'none';
        }
        await app.extensionManager.command.execute('Comfy.Canvas.FitView');
    }""")
    page.wait_for_timeout(1000)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.png")
    page.screenshot(path=path)
    page.set_viewport_size(viewport)
    with Image.open(path) as shot:
        shot.convert("RGB").resize((1600, round(shot.height * 1600 / shot.width)), Image.LANCZOS).save(path, optimize=True)


def _give_server_the_workflow_files(comfy_server, tmp_path) -> None:
    """The shipped workflows name a real checkpoint and photo; the test server gets files of those names (the
    tiny checkpoint, the astronaut), so every frontend version loads them without "missing file" flags and
    the test can demand a graph without errors."""
    for name in WORKFLOW_NAMES:
        for node in load_api(name).values():
            if node["class_type"] == "CheckpointLoaderSimple":
                link = comfy_server.models.checkpoints / node["inputs"]["ckpt_name"]
                if not link.exists():
                    link.symlink_to((comfy_server.models.checkpoints / comfy_server.models.checkpoint_name).resolve())
            elif node["class_type"] == "LoadImage" and not (comfy_server.input_dir / node["inputs"]["image"]).exists():
                comfy_server.upload_image(tmp_path / astronaut_png(tmp_path), name=node["inputs"]["image"])


def test_workflows_in_the_browser(page, comfy_server, tmp_path):
    photo = comfy_server.upload_image(tmp_path / astronaut_png(tmp_path), name="astronaut_browser.png")["name"]
    _give_server_the_workflow_files(comfy_server, tmp_path)
    page.reload(wait_until="domcontentloaded", timeout=120_000)  # the frontend lists files when it loads
    page.wait_for_function(READY_JS, timeout=120_000)
    key_file = None
    for name in ("anonymize", "hide", "recover", "protect_faces_quick"):
        nodes = _drop(page, name)
        assert not [n for n in nodes if n["has_errors"]], f"{name}: nodes with errors (missing types?)"
        assert "global-missing-nodes" not in page.evaluate(DIALOG_KEYS_JS), f"{name}: missing-nodes dialog"

        if os.environ.get("DP_SCREENSHOT_DIR"):  # how the README's workflow pictures are made
            _screenshot(page, name, os.environ["DP_SCREENSHOT_DIR"])
        prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
        assert without_meta(prompt) == without_meta(load_api(name)), f"{name}: frontend conversion differs"

        if name == "recover":
            changes = {"CheckpointLoaderSimple": {"ckpt_name": comfy_server.models.checkpoint_name},
                       "DiffPrivacy_LoadKeys": {"key_file": key_file},
                       "DiffPrivacy_SaveImageClean": {"filename_prefix": "browser_recover"}}
        else:
            present = {n["type"] for n in nodes}
            changes = {k: v for k, v in _tiny_changes(comfy_server, photo, name).items() if k in present}
        page.evaluate(SET_WIDGETS_JS, changes)
        entry = _queue_and_wait(page, comfy_server)
        images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
        # the protect workflows also show Face Align's / Protect Faces' numbered faces (one PreviewImage)
        assert len(images) == {"anonymize": 3, "hide": 2, "recover": 2, "protect_faces_quick": 2}[name]
        if name == "anonymize":
            texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
            key_file = texts[0].split(": ", 1)[1]
    assert not page.page_errors, page.page_errors
