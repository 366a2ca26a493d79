"""fd-serve's wire protocol through the Python client: bad inputs are answered and the session goes on,
tokens are checked, admission refuses over the limit, failing, idle and disconnected sessions end alone."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("aiohttp", reason="fd-serve needs aiohttp: pip install -e '.[serve]'")

import flashdreams  # noqa: E402
from flashdreams.client import AccessRefused, Client, ServerBusy, SessionEnded  # noqa: E402
from flashdreams.serve import protocol  # noqa: E402
from flashdreams.serve.manager import Limits, SessionManager  # noqa: E402
from flashdreams.serve.server import ServerThread, access_token, is_loopback  # noqa: E402
from flashdreams.serve.stepper import SessionStepper  # noqa: E402

TOKEN = "test-token-0123456789abcdef"


def fast_preset() -> str:
    """The quickest built-in world here: arena (a block in ~30 ms on a CPU), else tiny."""
    return "arena" if "arena" in flashdreams.preset_names() else "tiny"


@pytest.fixture(scope="module")
def engine():
    return flashdreams.load(preset=fast_preset(), device="cpu")


def start(engine, stepper=None, token=None, **limits) -> ServerThread:
    lim = Limits(**{"max_message_bytes": 64 * 1024, **limits})
    manager = SessionManager(stepper or SessionStepper(engine), lim, protocol.FrameCodec.choose("auto"))
    return ServerThread(manager, token=token)


@pytest.fixture(scope="module")
def server(engine):
    srv = start(engine, max_sessions=4)
    yield srv
    srv.stop()


def block_input(client: Client) -> dict:
    """A per-block input of the served model (keys for arena, the prompt for tiny)."""
    return next(s for s in client.specs if s["when"] == "block")


def frames_go_on(client: Client, n: int = 2) -> None:
    """The session still delivers frames, in order, after whatever was sent."""
    last = client.next_frame(timeout=30).index
    for _ in range(n):
        f = client.next_frame(timeout=30)
        assert f.index == last + 1
        last = f.index


def test_frames_arrive_in_order_with_the_spec_shape(server):
    with Client(server.url) as c:
        assert c.info["protocol"] == protocol.PROTOCOL_VERSION and c.specs
        frames = [c.next_frame(timeout=30) for _ in range(6)]
        assert [f.index for f in frames] == list(range(6))
        assert all(
            f.image.shape == (c.info["height"], c.info["width"], 3) and f.image.dtype == np.uint8 for f in frames
        )
        assert frames[0].image.std() > 0  # a picture, not a blank


@pytest.mark.parametrize(
    "bad, expect",
    [
        ("shape", "must have shape"),
        ("nan_json", "not a JSON number"),
        ("nan_binary", "non-finite"),
        ("unknown", "is unknown"),
        ("oversized", "over this server's"),
        ("not_json", "not valid JSON"),
        ("range", "outside"),
        ("short_payload", "payload bytes"),
    ],
)
def test_bad_input_gets_an_error_and_the_session_goes_on(server, bad, expect):
    with Client(server.url) as c:
        spec = block_input(c)
        shape = spec["shape"]
        c.next_frame(timeout=30)
        if bad == "shape":
            seq = c.send_input(spec["name"], np.zeros([1, 2], np.float32))
        elif bad == "nan_json":
            seq = c.send_input(spec["name"], np.full(shape, np.nan, np.float32), binary=False)
            seq = None  # the JSON could not be read, so its seq is unknown to the server
        elif bad == "nan_binary":
            seq = c.send_input(spec["name"], np.full(shape, np.nan, np.float32), binary=True)
        elif bad == "unknown":
            seq = c.send_input("no_such_input", [1.0])
        elif bad == "oversized":
            c.send("x" * (64 * 1024 + 1))
            seq = None
        elif bad == "not_json":
            c.send("{not json")
            seq = None
        elif bad == "range":
            if spec["high"] is None:
                pytest.skip(f"{spec['name']} has no upper bound to exceed")
            seq = c.send_input(spec["name"], np.full(shape, spec["high"] + 1, np.float32))
        else:
            header = {"t": "input", "seq": 7, "name": spec["name"], "dtype": "float32", "shape": shape}
            c.send(protocol.pack(header, b"\0" * 8))
            seq = 7
        err = c.next_error(timeout=10)
        assert err["t"] == "error" and expect in err["message"], err
        if seq is not None:
            assert err["seq"] == seq
        frames_go_on(c)
        assert c.ended is None


def test_a_good_input_is_reflected_by_later_frames(server):
    with Client(server.url) as c:
        spec = block_input(c)
        value = np.zeros(spec["shape"], np.float32)
        if spec["units"] == "keys":
            value[..., 0] = 1.0
        else:
            value = np.random.default_rng(0).standard_normal(spec["shape"]).astype(np.float32)
        seq = c.send_input(spec["name"], value)
        seen = [c.next_frame(timeout=30) for _ in range(3 * c.info["frames_per_block"])]
        assert all(a.seq <= b.seq for a, b in zip(seen, seen[1:]))  # stamps never go back
        assert seen[-1].seq == seq and c.errors.empty()


def first_block_from(c: Client, seq: int) -> tuple[int, list[np.ndarray]]:
    """The block of the first frame stamped with `seq` or later, and that block's frames."""
    f = c.next_frame(timeout=30)
    while f.seq < seq:
        f = c.next_frame(timeout=30)
    frames = [f.image]
    while len(frames) < c.info["frames_per_block"]:
        g = c.next_frame(timeout=30)
        assert g.block == f.block
        frames.append(g.image)
    return f.block, frames


@pytest.mark.parametrize("batched", [False, True], ids=["sessions", "worlds"])
def test_load_goes_back_to_the_saved_world(engine, batched):
    """save keeps the world after its newest block; load puts it back: the blocks after a load are the
    blocks that followed the save, frame for frame (the same encoded bytes decode to the same pixels)."""
    from flashdreams.serve.worlds_stepper import WorldsStepper

    stepper = WorldsStepper(engine, 2) if batched and engine.plan.row_independent else SessionStepper(engine)
    srv = start(engine, stepper=stepper, max_sessions=2)
    try:
        with Client(srv.url, seed=5) as c:
            assert c.info["save_limit_bytes"] == 2 << 30
            load = c.load()
            err = c.next_error(timeout=30)
            assert err["seq"] == load and "saved nothing yet" in err["message"]
            for _ in range(2 * c.info["frames_per_block"]):
                c.next_frame(timeout=30)
            seq = c.save()
            saved = c.next_reply(timeout=30)
            assert saved["t"] == "saved" and saved["seq"] == seq and saved["bytes"] > 0
            block, after_save = first_block_from(c, seq)
            assert block == saved["block"]
            for _ in range(2 * c.info["frames_per_block"]):  # the world goes on past the saved point
                c.next_frame(timeout=30)
            seq = c.load()
            loaded = c.next_reply(timeout=30)
            assert loaded == {"t": "loaded", "seq": seq, "block": saved["block"]}
            block, after_load = first_block_from(c, seq)
            assert block == saved["block"]
            assert all(np.array_equal(a, b) for a, b in zip(after_save, after_load, strict=True))
            assert c.errors.empty()
    finally:
        srv.stop()


def test_a_save_over_the_limit_is_refused_and_the_session_goes_on(engine):
    srv = start(engine, max_sessions=1, save_limit_bytes=16)
    try:
        with Client(srv.url) as c:
            seq = c.save()
            err = c.next_error(timeout=30)
            assert err["seq"] == seq and "--save-limit-mb" in err["message"] and c.replies.empty()
            frames_go_on(c)
    finally:
        srv.stop()


def test_saves_past_the_servers_budget_are_refused_until_room_is_made(engine):
    """Saved worlds live in host memory, outside the device-memory admission: all of them together stay
    within --saves-budget-mb. A save past it is refused (out_of_memory) and the session goes on; a session
    saving again replaces its own save (no second copy); a session's end frees its save's room."""
    one = engine.session().snapshot_nbytes
    srv = start(engine, max_sessions=2, saves_budget_bytes=one + one // 2)
    try:
        with Client(srv.url, seed=1) as a, Client(srv.url, seed=2) as b:
            a.save()
            assert a.next_reply(timeout=30)["t"] == "saved"
            seq = b.save()
            err = b.next_error(timeout=30)
            assert err["seq"] == seq and err["code"] == "out_of_memory" and "--saves-budget-mb" in err["message"]
            assert b.replies.empty()
            frames_go_on(b)
            a.save()  # over its own save: still one copy
            assert a.next_reply(timeout=30)["t"] == "saved" and a.errors.empty()
            assert srv.manager.saves_held_bytes == one
            a.close()
            deadline = time.monotonic() + 30
            while srv.manager.saves_held_bytes and time.monotonic() < deadline:  # the end runs on the server
                time.sleep(0.05)
            assert srv.manager.saves_held_bytes == 0
            b.save()
            reply = b.next_reply(timeout=30)
            assert reply["t"] == "saved" and reply["bytes"] == one and b.errors.empty()
    finally:
        srv.stop()


class SlowCodec(protocol.FrameCodec):
    """JPEG that takes 30 ms a frame: the next round applies inputs while a block's frames still encode."""

    def encode(self, frame):
        time.sleep(0.03)
        return super().encode(frame)


def test_stamps_are_exact_the_first_frame_stamped_with_a_reset_is_block_0(engine):
    """Stamps are taken when the block is made, not when its frames leave (encoding runs later)."""
    manager = SessionManager(SessionStepper(engine), Limits(max_sessions=2), SlowCodec("jpeg"))
    srv = ServerThread(manager)
    try:
        with Client(srv.url) as c:
            for _ in range(3):
                for _ in range(5):
                    c.next_frame(timeout=30)
                seq = c.reset()
                f = c.next_frame(timeout=30)
                while f.seq < seq:
                    f = c.next_frame(timeout=30)
                assert (f.block, f.frame) == (0, 0), (f.block, f.frame, f.seq)
    finally:
        srv.stop()


def test_oversized_past_the_transport_cap_closes_only_that_connection(server):
    with Client(server.url) as other, Client(server.url) as c:
        c.send(b"\0" * (4 * 64 * 1024 + 65536 + 1))
        with pytest.raises(SessionEnded):
            for _ in range(200):
                c.next_frame(timeout=30)
        frames_go_on(other)


def test_wrong_or_missing_token_is_refused(engine):
    srv = start(engine, token=TOKEN, max_sessions=2)
    try:
        with pytest.raises(AccessRefused):
            Client(srv.url.split("?")[0], token="wrong-token-0123456789")
        with pytest.raises(AccessRefused):
            Client(srv.url.split("?")[0])
        for path in ("/", "/app.js", "/api/info"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=10)
            assert e.value.code == 401
        info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/info?token={TOKEN}", timeout=10))
        assert info["t"] == "hello"
        page = urllib.request.urlopen(srv.url, timeout=10).read().decode()
        assert f"app.js?token={TOKEN}" in page  # the page's script request carries the token too
        with Client(srv.url) as c:  # the printed URL holds the token
            assert c.next_frame(timeout=30).index == 0
    finally:
        srv.stop()


def test_a_page_of_another_site_cannot_open_a_session(server):
    import asyncio

    import aiohttp

    async def connect(origin: str) -> int:
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(f"ws://127.0.0.1:{server.port}/ws", origin=origin) as ws:
                    hello = await ws.receive_json()
                    return 101 if hello["t"] == "hello" else 0
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(connect("http://evil.example")) == 403
    assert asyncio.run(connect(f"http://127.0.0.1:{server.port}")) == 101


def test_token_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert access_token("127.0.0.1", None) is None
    generated = access_token("0.0.0.0", None)
    assert generated and len(generated) >= 24 and generated != access_token("0.0.0.0", None)
    assert access_token("0.0.0.0", TOKEN) == TOKEN
    with pytest.raises(flashdreams.FlashDreamsError, match="at least 16"):
        access_token("0.0.0.0", "short")


def test_admission_from_measured_memory_refuses_over_the_limit_and_frees_on_close(engine):
    per = SessionStepper(engine).session_bytes()
    assert per > 0
    srv = start(engine, memory_budget=int(2.5 * per))
    try:
        assert srv.manager.max_sessions == 2 and srv.manager.per_session_bytes == per
        a, b = Client(srv.url), Client(srv.url)
        with pytest.raises(ServerBusy, match="busy.*2 of 2.*try again later"):
            Client(srv.url)
        a.close()
        deadline = time.monotonic() + 20
        while len(srv.manager.stepper.sessions) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(srv.manager.stepper.sessions) == 1  # the closed session's world is no longer live
        with Client(srv.url) as c:
            assert c.next_frame(timeout=30).index == 0
        frames_go_on(b)
        b.close()
    finally:
        srv.stop()


def test_admission_refuses_a_session_that_would_slow_all_below_min_fps(engine):
    srv = start(engine, max_sessions=4, min_fps=1e9)
    try:
        with Client(srv.url) as a:
            a.next_frame(timeout=30)  # a measured block
            with pytest.raises(ServerBusy, match="--min-fps"):
                Client(srv.url)
            frames_go_on(a)
    finally:
        srv.stop()


class FailingStepper(SessionStepper):
    """Fails the block of every session opened with seed 666 (a world that breaks mid-run)."""

    def open(self, sid, seed):
        super().open(sid, seed)
        if seed == 666:
            self.sessions[sid].step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))


def test_a_failing_session_ends_alone_and_the_others_keep_their_pace(engine):
    srv = start(engine, stepper=FailingStepper(engine), max_sessions=3)
    try:
        with Client(srv.url, seed=1) as good, Client(srv.url, seed=666) as bad:
            with pytest.raises(SessionEnded, match="failed: RuntimeError: boom"):
                bad.next_frame(timeout=30)
            frames_go_on(good, n=2 * good.info["frames_per_block"])
            assert len(srv.manager.sessions) == 1
    finally:
        srv.stop()


class FullDevice(SessionStepper):
    """A device that runs out of memory creating a second session."""

    def open(self, sid, seed):
        if self.sessions:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        super().open(sid, seed)


def test_out_of_memory_opening_a_session_is_busy_not_a_crash(engine):
    srv = start(engine, stepper=FullDevice(engine), max_sessions=3)
    try:
        with Client(srv.url) as a:
            with pytest.raises(ServerBusy, match="cannot hold another session"):
                Client(srv.url)
            assert len(srv.manager.sessions) == 1
            frames_go_on(a)
    finally:
        srv.stop()


def test_idle_sessions_are_ended(engine):
    srv = start(engine, idle_timeout_s=1.0, max_sessions=2)
    try:
        with Client(srv.url) as c:
            t0 = time.monotonic()
            with pytest.raises(SessionEnded, match="idle"):
                while True:
                    c.next_frame(timeout=30)
            assert time.monotonic() - t0 < 10
            assert not srv.manager.sessions
    finally:
        srv.stop()


def test_shutdown_drains_sessions_with_a_reason(engine):
    srv = start(engine, max_sessions=2)
    c = Client(srv.url)
    c.next_frame(timeout=30)
    srv.stop()
    with pytest.raises(SessionEnded, match="shutting down"):
        while True:
            c.next_frame(timeout=30)
    c.close()
