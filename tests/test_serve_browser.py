"""fd-serve end to end in a real headless browser (Debian's chromium driven by playwright): the page
loads, frames arrive and change, the HUD shows FPS, block time and input-to-present latency, a second
tab gets its own session, and different keys make different frames."""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest.importorskip("aiohttp", reason="fd-serve needs aiohttp: pip install -e '.[serve]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright (pip install -e '.[serve]'; .ci/run installs it)"
)
CHROMIUM = os.environ.get("FD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "the browser test needs Debian's chromium (apt-get install chromium; .ci/run installs it); "
        "looked for $FD_CHROMIUM, chromium and chromium-browser on PATH",
        allow_module_level=True,
    )

import flashdreams  # noqa: E402
from flashdreams.cli.serve import default_world  # noqa: E402
from flashdreams.serve import protocol  # noqa: E402
from flashdreams.serve.manager import Limits, SessionManager  # noqa: E402
from flashdreams.serve.server import ServerThread  # noqa: E402
from flashdreams.serve.stepper import SessionStepper  # noqa: E402

# The flags a root, offline machine needs (no sandbox as root; no background calls to the network).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def serve(preset: str) -> ServerThread:
    engine = flashdreams.load(preset=preset, device="cpu")
    manager = SessionManager(SessionStepper(engine), Limits(max_sessions=4), protocol.FrameCodec.choose())
    return ServerThread(manager)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    srv = serve(default_world())
    yield srv
    srv.stop()


def open_page(browser, url: str):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("window.fdStats.hello !== null", timeout=20_000)
    page.page_errors = errors
    return page


def poke(page, spec: dict) -> None:
    """Send one input through the page's own control for `spec` (a key press, a new prompt, ...)."""
    if spec["units"] == "keys":
        key = spec["labels"][0] if spec["labels"] else "1"
        page.keyboard.down(key)
        time.sleep(0.05)
        page.keyboard.up(key)
    elif page.query_selector(f"#standin-{spec['name']}"):
        page.click(f"#standin-{spec['name']}")
    else:
        page.click("#reset")  # any input: a reset carries a sequence number too


def test_page_plays_frames_that_change_and_shows_the_hud(browser, server):
    page = open_page(browser, server.url)
    hello = page.evaluate("window.fdStats.hello")
    assert page.evaluate("[document.getElementById('video').width, document.getElementById('video').height]") == [
        hello["width"],
        hello["height"],
    ]
    assert page.query_selector_all("#controls .control")  # one control box per input spec
    page.click("#start")
    fpb = hello["frames_per_block"]
    page.wait_for_function(f"window.fdStats.presented >= {2 * fpb}", timeout=120_000)
    sums = set()
    for _ in range(fpb):
        sums.add(page.evaluate("window.fdChecksum()"))
        page.wait_for_timeout(1000 / hello["fps"])
    assert len(sums) >= 2, "the video area did not change over time"
    spec = next(s for s in hello["specs"] if s["when"] == "block")
    poke(page, spec)
    page.wait_for_function("window.fdStats.latencies.length > 0", timeout=120_000)
    latency = page.evaluate("window.fdStats.latencies[0]")
    assert 0 < latency < 30_000
    page.wait_for_function("document.getElementById('hud-latency').textContent !== '-'", timeout=10_000)
    hud = {k: page.inner_text(f"#hud-{k}") for k in ("fps", "block", "latency")}
    assert int(hud["fps"]) > 0 and float(hud["block"]) > 0 and float(hud["latency"].split()[0]) > 0, hud
    assert not page.page_errors, page.page_errors
    page.close()


def test_a_second_tab_gets_its_own_session(browser, server):
    a, b = open_page(browser, server.url), open_page(browser, server.url)
    for p in (a, b):
        p.click("#start")
    for p in (a, b):
        p.wait_for_function("window.fdStats.presented >= 2", timeout=120_000)
    ids = [p.evaluate("window.fdStats.session") for p in (a, b)]
    assert ids[0] and ids[1] and ids[0] != ids[1]
    assert set(ids) <= set(server.manager.sessions)
    a.close()  # one tab leaves: its session is ended and freed; the other keeps playing
    deadline = time.monotonic() + 20
    while ids[0] in server.manager.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ids[0] not in server.manager.sessions
    before = b.evaluate("window.fdStats.presented")
    b.wait_for_function(f"window.fdStats.presented > {before + 2}", timeout=120_000)
    b.close()


def first_frame_from(page, seq_expr: str, timeout_ms: int = 60_000) -> dict:
    """The first presented frame stamped with the sequence number `seq_expr` (a page expression) or later;
    a named failure, not a hang, when none comes."""
    return page.evaluate(
        f"Promise.race([window.fdCapture({seq_expr}, 1), new Promise((_, no) => setTimeout(() => "
        f"no(new Error('no frame stamped with ' + ({seq_expr}) + ' or later within {timeout_ms} ms')), {timeout_ms}))])"
    )


def test_save_and_load_buttons_go_back_to_the_saved_world(browser, server):
    """Save, play on, Load: the first frame shown after the load is the first frame that followed the save."""
    page = open_page(browser, server.url)
    assert page.is_disabled("#save") and page.is_disabled("#load")
    page.click("#start")
    page.wait_for_function("window.fdStats.presented >= 2", timeout=120_000)
    assert page.is_disabled("#load")  # nothing saved yet
    page.click("#save")
    after_save = first_frame_from(page, "window.fdStats.lastSaveSeq")
    page.wait_for_function("window.fdStats.saved !== null", timeout=60_000)
    saved = page.evaluate("window.fdStats.saved")
    assert after_save["block"] == saved["block"] and page.inner_text("#status") == f"saved at block {saved['block']}"
    fpb = page.evaluate("window.fdStats.hello.frames_per_block")
    shown = page.evaluate("window.fdStats.presented")
    page.wait_for_function(f"window.fdStats.presented >= {shown + 2 * fpb}", timeout=120_000)  # play on
    page.click("#load")
    after_load = first_frame_from(page, "window.fdStats.lastLoadSeq")
    assert after_load["block"] == saved["block"] and after_load["index"] > after_save["index"]
    assert after_load["pixels"] == after_save["pixels"], "the frame after the load is not the one after the save"
    assert page.evaluate("window.fdStats.loaded.block") == saved["block"]
    assert not page.page_errors and not page.evaluate("window.fdStats.errors"), page.evaluate("window.fdStats.errors")
    page.close()


def keys_preset() -> str | None:
    """The default world when it takes keys, else the arena world, else None."""
    for name in (default_world(), "arena"):
        if name in flashdreams.preset_names():
            engine_specs = flashdreams.load(preset=name, device="cpu").input_specs()
            if any(s.units == "keys" for s in engine_specs):
                return name
    return None


def test_different_keys_make_different_frames(browser):
    name = keys_preset()
    if name is None:
        pytest.skip(
            f"no world with a 'keys' input here (default world {default_world()!r}, no 'arena' preset); "
            "the arena family brings one"
        )
    weights = getattr(flashdreams.get_preset(name), "weights_path", None)
    if weights is not None and not weights.exists():
        pytest.skip(f"{name}: its trained weights ({weights}) are not here, and a random-weight world ignores keys")
    srv = serve(name)
    try:
        page = open_page(browser, srv.url + "?seed=7")
        spec = next(s for s in page.evaluate("window.fdStats.hello.specs") if s["units"] == "keys")
        first, second = spec["labels"][0], spec["labels"][-1]
        page.click("#start")
        page.wait_for_function("window.fdStats.presented >= 1", timeout=120_000)

        def frame_after_reset_holding(key: str) -> dict:
            """Hold `key`, reset (same seed), and capture the 2nd frame of the world after the reset."""
            page.keyboard.down(key)
            page.click("#reset")
            seq = page.evaluate("window.fdStats.lastResetSeq")
            shot = page.evaluate(f"window.fdCapture({seq}, {2 * spec['shape'][1]})")
            page.keyboard.up(key)
            page.focus("#video")
            return shot

        a = frame_after_reset_holding(first)
        b = frame_after_reset_holding(second)
        a_again = frame_after_reset_holding(first)
        assert a["block"] == b["block"] == a_again["block"]
        assert a["pixels"] == a_again["pixels"], "the same key from the same seed gave different frames"
        differ = sum(x != y for x, y in zip(a["pixels"], b["pixels"]))
        assert differ > len(a["pixels"]) // 100, f"'{first}' and '{second}' gave nearly the same frame ({differ})"
        assert not page.page_errors, page.page_errors
        page.close()
    finally:
        srv.stop()


def test_the_drive_page_steers_with_sliders(browser):
    """fd-serve --drive demo: the page shows steer and throttle sliders (from the `drive` spec); moving one
    sends the controls, and the session's car takes them."""
    from flashdreams.serve.drive import DriveStepper

    engine = flashdreams.load(preset="omnidreams-sv-tiny", device="cpu")
    stepper = DriveStepper(SessionStepper(engine))
    srv = ServerThread(SessionManager(stepper, Limits(max_sessions=2), protocol.FrameCodec.choose()))
    try:
        page = open_page(browser, srv.url)
        labels = page.eval_on_selector_all(
            "[data-input='drive'] label.slider", "els => els.map(e => e.textContent.trim())"
        )
        assert labels == ["steer", "throttle"]
        assert not page.query_selector("[data-input='hdmap_video']")  # the drive renders the HD map itself
        page.click("#start")
        page.wait_for_function("window.fdStats.presented >= 1", timeout=120_000)
        page.eval_on_selector(
            "[data-input='drive'] input[type=range]", "s => { s.value = 0.8; s.dispatchEvent(new Event('input')); }"
        )
        page.wait_for_function("window.fdStats.latencies.length > 0", timeout=120_000)
        drive = stepper.drives[page.evaluate("window.fdStats.session")]
        assert drive.override is not None and abs(drive.override[0] - 0.8) < 1e-6 and drive.override[1] == 0.0
        assert not page.page_errors, page.page_errors
        page.close()
    finally:
        srv.stop()
