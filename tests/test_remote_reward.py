"""RemoteReward against real HTTP servers on 127.0.0.1 (free ports, shut down at each test's end),
and the per_sample decorator. No other address is contacted; every test takes well under 2 s."""

import asyncio
import contextlib
import importlib.util
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reward import RewardError, RewardScorer, WeightedReward, per_sample
from reward.remote import MIB, RemoteReward
from rlhf.config import RemoteRewardConfig
from rlhf.types import Prompt, Sample, SampleGroup

SERVER_PY = Path(__file__).resolve().parents[1] / "examples" / "remote_reward" / "server.py"
DIGITS = "0123456789"
FAST = {"timeout_s": 0.5, "retries": 2, "backoff_s": 0.01}  # small enough that a failing test is quick


def example_server_module():
    spec = importlib.util.spec_from_file_location("remote_reward_example_server", SERVER_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def running(server):
    """Serves in a thread; yields the URL of /score; stops and closes the server however the test ends."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        yield f"http://{host}:{port}/score"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)


class Scripted(ThreadingHTTPServer):
    """A server whose i-th request gets answer(i, request_doc) -> (status, body bytes[, headers]).

    `bodies` records each raw request body, in arrival order."""

    def __init__(self, answer):
        self.answer, self.bodies, self.lock = answer, [], threading.Lock()
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)

    def handle_error(self, request, client_address):
        pass  # a client that timed out has closed its end: the late answer's broken pipe is expected


class _ScriptedHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            i = len(self.server.bodies)
            self.server.bodies.append(body)
        status, payload, *headers = self.server.answer(i, json.loads(body))
        self.send_response(status)
        for key, value in (headers[0] if headers else {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):
        pass


def ok(rewards):
    return 200, json.dumps({"rewards": rewards}).encode()


def by_length(i, doc):
    """Rewards the length of each completion."""
    return ok([float(len(c)) for c in doc["completions"]])


def batch(completions, charset=DIGITS, **columns):
    n = len(completions)
    return {"prompts": ["Compute 1 plus 1 using only digits:"] * n, "completions": list(completions),
            "completion_ids": [[3, 4]] * n, "charset": [charset] * n, **columns}


def groups(texts, charset=DIGITS):
    p = Prompt(index=0, text="Compute 1 plus 1 using only digits:", ids=[1, 2], row={"charset": charset})
    return [SampleGroup(p, [Sample(p, [3], [-0.1], t, False, 0, 0) for t in texts])]


@pytest.fixture
def dead_url():
    """A port bound but not listening: connecting is refused at once, and nothing else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/score"


# ---- the example server, end to end ----

def test_the_example_server_scores_through_remote_reward_and_the_scorer():
    module = example_server_module()
    with running(module.make_server(port=0)) as url:
        remote = RemoteReward(url, **FAST)
        assert remote(**batch(["12", "1 a", "   "])) == [1.0, 0.5, 0.0]

        gs = groups(["12", "1a"])
        metrics = RewardScorer([WeightedReward(remote.name, remote, 2.0)]).score(gs)
        assert [s.reward for s in gs[0].samples] == [2.0, 1.0]
        assert gs[0].samples[1].reward_components == {remote.name: 0.5}
        assert metrics == {"reward/127.0.0.1/score/mean": 0.75}  # _short drops "remote:"


def test_the_example_server_answers_400_to_a_bad_request_and_500_when_its_scorer_raises():
    module = example_server_module()
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with running(module.make_server(port=0)) as url:
        for body in (b"not json", b'{"prompts": ["p"], "completions": []}'):
            with pytest.raises(urllib.error.HTTPError) as err:
                no_proxy.open(urllib.request.Request(url, data=body, method="POST"), timeout=1.0)
            assert err.value.code == 400 and b"bad request" in err.value.read()
            err.value.close()
    with running(module.make_server(port=0, score_fn=lambda **kw: 1 / 0)) as url:
        with pytest.raises(RewardError, match=r"3 attempt\(s\) failed; the last: HTTP 500"):
            RemoteReward(url, **FAST)(**batch(["1"]))


def test_the_wire_format_is_the_documented_json():
    server = Scripted(by_length)
    with running(server) as url:
        RemoteReward(url, **FAST)(prompts=["p\u00e9"], completions=["ab"], completion_ids=[[7, 8]],
                                  kind=["sum"], meta=[{"k": [1, None, True]}])
    doc = {"prompts": ["p\u00e9"], "completions": ["ab"], "completion_ids": [[7, 8]],
           "columns": {"kind": ["sum"], "meta": [{"k": [1, None, True]}]}}
    assert server.bodies == [json.dumps(doc, separators=(",", ":")).encode()]


def test_from_config_and_name():
    cfg = RemoteRewardConfig(url="http://127.0.0.1:8000/score", weight=3.0, timeout_s=1.5, retries=4,
                             backoff_s=0.25, max_request_mb=2.0)
    remote = RemoteReward.from_config(cfg)
    assert (remote.url, remote.timeout_s, remote.retries, remote.backoff_s, remote.max_request_mb) == (
        cfg.url, 1.5, 4, 0.25, 2.0)
    assert remote.name == remote.__name__ == "remote:127.0.0.1/score"


@pytest.mark.parametrize("url, kwargs", [
    ("127.0.0.1:8000/score", {}), ("file:///etc/passwd", {}), ("http://127.0.0.1/s", {"timeout_s": 0}),
    ("http://127.0.0.1/s", {"retries": -1}), ("http://127.0.0.1/s", {"max_request_mb": 0}),
])
def test_bad_arguments_are_refused(url, kwargs):
    with pytest.raises(RewardError, match="remote reward"):
        RemoteReward(url, **kwargs)


# ---- retries and errors ----

@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_5xx_or_429_is_retried_with_exponential_backoff(status):
    server = Scripted(lambda i, doc: (status, b"busy") if i < 2 else by_length(i, doc))
    with running(server) as url:
        t0 = time.monotonic()
        assert RemoteReward(url, timeout_s=0.5, retries=2, backoff_s=0.05)(**batch(["a", "bcd"])) == [1.0, 3.0]
        elapsed = time.monotonic() - t0
    assert len(server.bodies) == 3
    assert 0.05 + 0.1 <= elapsed < 1.5  # backoff_s * 2**0, then backoff_s * 2**1


def test_one_retry_too_few_fails_naming_url_attempts_and_last_error():
    server = Scripted(lambda i, doc: (500, b"down") if i < 2 else by_length(i, doc))
    with running(server) as url:
        with pytest.raises(RewardError, match=rf"remote reward {url}: 2 attempt\(s\) failed; the last: HTTP 500"):
            RemoteReward(url, timeout_s=0.5, retries=1, backoff_s=0.01)(**batch(["a"]))
    assert len(server.bodies) == 2


@pytest.mark.parametrize("status, headers", [(400, {}), (404, {}), (302, {"Location": "http://127.0.0.1:1/x"})])
def test_another_status_is_not_retried_and_its_body_is_shown(status, headers):
    body = b"charset column missing " + b"x" * 300
    server = Scripted(lambda i, doc: (status, body, headers))
    with running(server) as url:
        with pytest.raises(RewardError, match=rf"HTTP {status} .*: 'charset column missing x+'") as err:
            RemoteReward(url, **FAST)(**batch(["a"]))
    assert len(server.bodies) == 1  # and a redirect is not followed
    assert str(err.value).count("x") == 200 - len("charset column missing ")  # the body's first 200 characters


def test_a_server_slower_than_timeout_s_fails_after_the_retries_in_bounded_time():
    release = threading.Event()
    server = Scripted(lambda i, doc: (release.wait(2.0), by_length(i, doc))[1])
    with running(server) as url:
        t0 = time.monotonic()
        try:
            with pytest.raises(RewardError, match=r"2 attempt\(s\) failed; the last: TimeoutError: timed out"):
                RemoteReward(url, timeout_s=0.1, retries=1, backoff_s=0.05)(**batch(["a"]))
        finally:
            elapsed = time.monotonic() - t0
            release.set()  # the handlers finish at once, so shutdown does not wait for them
    assert len(server.bodies) == 2
    assert elapsed < 1.0  # 2 x 0.1 s + 0.05 s, plus slack for a busy machine


def test_nothing_listening_is_a_connection_error_retried_then_raised(dead_url):
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"3 attempt\(s\) failed; the last: ConnectionRefusedError") as err:
        RemoteReward(dead_url, timeout_s=0.2, retries=2, backoff_s=0.01)(**batch(["a"]))
    assert time.monotonic() - t0 < 1.0
    assert dead_url in str(err.value)


def test_proxy_variables_are_ignored(monkeypatch, dead_url):
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, dead_url.removesuffix("/score"))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with running(Scripted(by_length)) as url:
        assert RemoteReward(url, **FAST)(**batch(["ab"])) == [2.0]


@pytest.mark.parametrize("payload, message", [
    (b"<html>oops</html>", r"is not JSON .*it begins '<html>oops</html>'"),
    (b'{"scores": [1, 2]}', r"has no \"rewards\" key \(it is keys \['scores'\]\)"),
    (b"[1, 2]", r"has no \"rewards\" key \(it is a JSON list\)"),
    (b'{"rewards": [1.0]}', r"has 1 values in \"rewards\"; expected a list of 2"),
    (b'{"rewards": 1.0}', r"has a float in \"rewards\"; expected a list of 2"),
    (b'{"rewards": [1.0, "high"]}', r"has 'high' for sample 1; expected a number or null"),
    (b'{"rewards": [true, 1]}', r"has True for sample 0; expected a number or null"),
])
def test_a_malformed_response_raises_at_once_naming_url_and_fault(payload, message):
    server = Scripted(lambda i, doc: (200, payload))
    with running(server) as url:
        with pytest.raises(RewardError, match=rf"remote reward {url}: the response to samples 0..1 {message}"):
            RemoteReward(url, **FAST)(**batch(["a", "b"]))
    assert len(server.bodies) == 1


def test_null_and_nan_pass_through_to_the_scorer_which_judges_them():
    server = Scripted(lambda i, doc: (200, b'{"rewards": [null, NaN, 2]}'))
    with running(server) as url:
        remote = RemoteReward(url, **FAST)
        values = remote(**batch(["a", "b", "c"]))
        assert values[0] is None and math.isnan(values[1]) and values[2] == 2
        gs = groups(["a", "b", "c"])
        metrics = RewardScorer([WeightedReward("remote", remote), WeightedReward("one", lambda **kw: [1.0] * 3)],
                               on_error="penalize", penalty=-1.0).score(gs)
    assert [s.reward for s in gs[0].samples] == [1.0, 0.0, 3.0]
    assert metrics["reward/failures/not_finite"] == 1.0


def test_a_column_that_is_not_json_is_named_and_nothing_is_sent(dead_url):
    with pytest.raises(RewardError, match=r"column 'meta' cannot be sent as JSON: sample 1 has a object"):
        RemoteReward(dead_url, **FAST)(**batch(["a", "b"], meta=[{"ok": 1}, object()]))
    with pytest.raises(RewardError, match=r"column 'score' cannot be sent as JSON: sample 0 has a float"):
        RemoteReward(dead_url, **FAST)(**batch(["a"], score=[math.nan]))


def test_an_empty_batch_sends_nothing(dead_url):
    assert RemoteReward(dead_url, **FAST)(prompts=[], completions=[], completion_ids=[]) == []


# ---- the size limit ----

def wire(b):
    """The body RemoteReward sends for batch(...) b."""
    doc = {k: b[k] for k in ("prompts", "completions", "completion_ids")}
    doc["columns"] = {k: v for k, v in b.items() if k not in doc}
    return json.dumps(doc, separators=(",", ":")).encode()


def test_a_large_batch_is_split_into_the_fewest_even_requests_and_rewards_keep_their_order():
    b = batch([f"{i:02d}" + "x" * 60 for i in range(10)], idx=list(range(10)))
    one = len(wire({k: v[:1] for k, v in b.items()}))
    fits = 3  # requests of 3 samples fit, of 4 do not: so 4 requests, of 2, 3, 2 and 3 samples
    limit = len(wire({k: v[:fits] for k, v in b.items()}))
    assert len(wire({k: v[:fits + 1] for k, v in b.items()})) > limit > one
    server = Scripted(lambda i, doc: ok([float(x) for x in doc["columns"]["idx"]]))
    with running(server) as url:
        rewards = RemoteReward(url, **FAST, max_request_mb=limit / MIB)(**b)
    assert rewards == [float(i) for i in range(10)]
    sent = [json.loads(body)["columns"]["idx"] for body in server.bodies]
    assert sent == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert all(len(body) <= limit for body in server.bodies)


def test_samples_of_unequal_size_are_packed_greedily_when_an_even_split_does_not_fit():
    b = batch(["x" * 200, "x" * 200, "a", "b"])  # even halves would put both large samples in one request
    limit = len(wire({k: [v[0], v[2], v[3]] for k, v in b.items()}))
    server = Scripted(by_length)
    with running(server) as url:
        assert RemoteReward(url, **FAST, max_request_mb=limit / MIB)(**b) == [200.0, 200.0, 1.0, 1.0]
    assert [json.loads(body)["completions"] for body in server.bodies] == [["x" * 200], ["x" * 200, "a", "b"]]


def test_a_single_sample_over_the_limit_is_named_and_nothing_is_sent():
    server = Scripted(by_length)
    with running(server) as url:
        with pytest.raises(RewardError, match=r"sample 1 alone makes a request of \d{4} bytes .*max_request_mb="):
            RemoteReward(url, **FAST, max_request_mb=1000 / MIB)(**batch(["a", "x" * 2000, "b"]))
    assert server.bodies == []


# ---- per_sample ----

def test_per_sample_sync_gets_each_samples_values_and_keeps_its_name():
    seen = []

    @per_sample
    def digits(prompt, completion, completion_ids, charset, **kw):
        """Digits only."""
        seen.append((prompt, completion_ids, charset))
        return None if not completion else sum(c in charset for c in completion) / len(completion)

    assert digits.__name__ == "digits" and digits.__doc__ == "Digits only."
    assert digits(prompts=["p", "q", "r"], completions=["12", "1a", ""], completion_ids=[[1], [2], [3]],
                  charset=["0123456789", "a", "x"]) == [1.0, 0.5, None]
    assert seen == [("p", [1], "0123456789"), ("q", [2], "a"), ("r", [3], "x")]
    assert digits(prompts=["p"], completions=["1"], charset=[DIGITS]) == [1.0]  # no ids given: None
    assert seen[-1] == ("p", None, DIGITS)

    gs = groups(["12", "1a"])
    RewardScorer([WeightedReward(digits.__name__, digits)]).score(gs)
    assert [s.reward for s in gs[0].samples] == [1.0, 0.5]


def test_per_sample_async_runs_the_samples_concurrently():
    started, n = [], 4

    @per_sample
    async def wait_for_all(prompt, completion, completion_ids, charset, **kw):
        started.append(completion)
        for _ in range(100):  # at most 1 s: finishes only once every sample has started
            if len(started) == n:
                return float(len(completion_ids)) + (completion in charset)
            await asyncio.sleep(0.01)
        raise AssertionError(f"the samples ran one after another: {started}")

    assert wait_for_all.__name__ == "wait_for_all" and asyncio.iscoroutinefunction(wait_for_all)
    gs = groups(["1", "a", "2", "b"])
    RewardScorer([WeightedReward("w", wait_for_all)], timeout_s=1.5).score(gs)
    assert [s.reward for s in gs[0].samples] == [2.0, 1.0, 2.0, 1.0]  # one id each, + 1 for a digit


def test_per_sample_refuses_a_column_named_like_its_arguments():
    fn = per_sample(lambda prompt, completion, **kw: 1.0)
    with pytest.raises(RewardError, match="dataset column 'completion' clashes"):
        fn(prompts=["p"], completions=["c"], completion=["x"])
