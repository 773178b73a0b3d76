"""Remote rewards: a reward function that POSTs the batch to an HTTP server and returns its answer.

    remote = RemoteReward("http://127.0.0.1:8000/score", timeout_s=10, retries=2)
    remote(prompts=[...], completions=[...], completion_ids=[...], charset=[...])  # -> [0.5, None, ...]

It is a plain sync reward function (reward/api.py): RewardScorer runs it in its thread pool, under
`reward.timeout_s`, and applies the failure policy to what it returns or raises.

Protocol (examples/remote_reward/server.py is a server for it, on the standard library alone):

    Request   POST <url>, Content-Type: application/json, a UTF-8 body (non-ASCII is \\u-escaped):
                  {"prompts":        [str, ...],                    [B]
                   "completions":    [str, ...],                    [B]
                   "completion_ids": [[int, ...], ...],             [B][L] ([] each when the caller gave none)
                   "columns":        {name: [value, ...], ...}}     [B] per dataset column
              Keys in this order, no whitespace. Column values must be JSON values (str, number, bool,
              null, lists and string-keyed dicts of them; no NaN or inf): anything else raises a
              RewardError naming the column and the sample, before any request is sent.
    Response  status 200, a JSON body {"rewards": [float | null, ...]} with one entry per completion of
              that request, in its order; null means "does not apply" (as None from a local function).
              Other keys are ignored.

Size limit. A batch whose body would exceed `max_request_mb` MiB (2**20 bytes) is split into the fewest
contiguous chunks that fit, sent one after another, and their rewards concatenated in order. The
samples are spread evenly over that many chunks (counts differ by at most one) when such a split
fits, and packed greedily in order when it does not (samples of very unequal sizes). A sample that
alone makes a request over the limit raises a RewardError naming its index and size, before any
request is sent.

Retries. Each request is tried up to 1 + `retries` times; before retry k it waits
backoff_s * 2**(k-1). Retried: connection errors (refused, reset, DNS), timeouts (`timeout_s` bounds
the connect and each blocking read of one attempt, not the attempt as a whole) and HTTP 5xx and 429.
Any other status (4xx, and 3xx: redirects are not followed) raises at once with the status and the
first 200 characters of the body. After the last attempt, a RewardError names the URL, the number of
attempts and the last error. A response that is not what the protocol says (not JSON, no "rewards",
the wrong length, an entry that is not a number or null) raises at once, without retrying: the server
answered, and asking again would cost as much to get the same answer. NaN and inf entries (Python's
json reads them) are passed on, so the scorer fails that sample alone ("not_finite").

Requests go straight to the URL: proxy environment variables (http_proxy, ...) are ignored, since a
reward server is a cluster service and a proxy would quietly change where the batches go.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from reward.api import RewardError

if TYPE_CHECKING:
    from rlhf.config import RemoteRewardConfig

logger = logging.getLogger(__name__)

MIB = 2**20
_TOP_LEVEL = ("prompts", "completions", "completion_ids")  # the body's lists besides "columns", in order


class RemoteReward:
    """A reward function served at `url` (see the module docstring for the protocol)."""

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.5,
                 max_request_mb: float = 16.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RewardError(f"remote reward url {url!r} is not an http(s) URL with a host")
        if not (timeout_s > 0 and retries >= 0 and backoff_s >= 0 and max_request_mb > 0):
            raise RewardError(f"remote reward {url}: needs timeout_s > 0, retries >= 0, backoff_s >= 0 and "
                              f"max_request_mb > 0, not {timeout_s!r}, {retries!r}, {backoff_s!r}, {max_request_mb!r}")
        self.url = url
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_request_mb = float(max_request_mb)
        self.__name__ = f"remote:{parts.hostname}{parts.path}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    @classmethod
    def from_config(cls, cfg: RemoteRewardConfig) -> RemoteReward:
        """The config's `weight` is the scorer's business (WeightedReward), not this class's."""
        return cls(cfg.url, timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s,
                   max_request_mb=cfg.max_request_mb)

    @property
    def name(self) -> str:
        """`remote:<host><path>`, e.g. `remote:127.0.0.1/score` (the port is left out)."""
        return self.__name__

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r})"

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None,
                 **columns: list) -> list[float | None]:
        n = len(prompts)
        if completion_ids is None:
            completion_ids = [[] for _ in range(n)]
        lists = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        for key, values in lists.items():
            if len(values) != n:
                raise RewardError(f"remote reward {self.url}: {key!r} has {len(values)} values for {n} prompts")
        if n == 0:
            return []
        top = {key: self._encode(key, lists[key]) for key in _TOP_LEVEL}
        cols = {key: self._encode(key, values) for key, values in columns.items()}
        rewards: list[float | None] = []
        for start, stop in self._chunks(top, cols):
            body = _body(top, cols, start, stop)
            rewards += self._parse(self._post(body), start, stop)
        return rewards

    def _encode(self, key: str, values: list) -> list[bytes]:
        """Each value's JSON, encoded once: chunks are sized by adding these up and built by joining them."""
        out = []
        for i, v in enumerate(values):
            try:
                out.append(json.dumps(v, allow_nan=False, separators=(",", ":")).encode())
            except (TypeError, ValueError) as e:
                what = "argument" if key in _TOP_LEVEL else "column"
                raise RewardError(f"remote reward {self.url}: {what} {key!r} cannot be sent as JSON: sample {i} "
                                  f"has a {type(v).__name__} ({e}); only str, numbers (not NaN/inf), bool, None, "
                                  f"and lists and str-keyed dicts of them can be") from e
        return out

    def _chunks(self, top: dict[str, list[bytes]], cols: dict[str, list[bytes]]) -> list[tuple[int, int]]:
        """[start, stop) sample ranges, in order: the fewest whose bodies fit in max_request_mb."""
        limit = int(self.max_request_mb * MIB)
        n, n_lists = len(top["prompts"]), len(top) + len(cols)
        # A body of k >= 1 samples has len(empty body) + their JSON + (k - 1) commas per list; so with
        # cost_i = sample i's JSON + one comma per list, a body is `base + sum of its samples' costs`.
        base = len(_body(top, cols, 0, 0)) - n_lists
        costs = [sum(len(v[i]) for v in itertools.chain(top.values(), cols.values())) + n_lists for i in range(n)]
        for i, cost in enumerate(costs):
            if base + cost > limit:
                raise RewardError(f"remote reward {self.url}: sample {i} alone makes a request of {base + cost} "
                                  f"bytes ({(base + cost) / MIB:.3g} MiB), over max_request_mb="
                                  f"{self.max_request_mb:g}")
        greedy, start, size = [], 0, base  # filling each chunk as far as it goes gives the fewest chunks
        for i, cost in enumerate(costs):
            if size + cost > limit:
                greedy.append((start, i))
                start, size = i, base
            size += cost
        greedy.append((start, n))
        k = len(greedy)
        even = [(j * n // k, (j + 1) * n // k) for j in range(k)]
        total = [0, *itertools.accumulate(costs)]
        return even if all(base + total[b] - total[a] <= limit for a, b in even) else greedy

    def _post(self, body: bytes) -> bytes:
        """The 200 response's body, after up to 1 + retries attempts."""
        attempts = 1 + self.retries
        last: BaseException | None = None
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                wait_s = self.backoff_s * 2 ** (attempt - 2)
                logger.warning("remote reward %s: attempt %d of %d failed (%s); retrying in %.3g s",
                               self.url, attempt - 1, attempts, _describe(last), wait_s)
                time.sleep(wait_s)
            request = urllib.request.Request(self.url, data=body, method="POST", headers={
                "Content-Type": "application/json", "Accept": "application/json"})
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    if response.status != 200:  # another 2xx: the protocol says 200
                        raise RewardError(f"remote reward {self.url}: HTTP {response.status} "
                                          f"{_clip(response.read(200), 200)!r}; the protocol expects 200")
                    return response.read()
            except urllib.error.HTTPError as e:  # before OSError: an HTTPError is one
                text = _error_body(e)
                if e.code != 429 and e.code < 500:
                    raise RewardError(f"remote reward {self.url}: HTTP {e.code} {e.reason}: {text!r}") from e
                last = e
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, a broken response
                last = e
        raise RewardError(f"remote reward {self.url}: {attempts} attempt(s) failed; the last: "
                          f"{_describe(last)}") from last

    def _parse(self, raw: bytes, start: int, stop: int) -> list[float | None]:
        where = f"remote reward {self.url}: the response to samples {start}..{stop - 1}"
        try:
            doc = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError is one too
            raise RewardError(f"{where} is not JSON ({e}); it begins {_clip(raw, 200)!r}") from e
        if not isinstance(doc, dict) or "rewards" not in doc:
            what = f"keys {sorted(doc)}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
            raise RewardError(f"{where} has no \"rewards\" key (it is {what})")
        rewards = doc["rewards"]
        if not isinstance(rewards, list) or len(rewards) != stop - start:
            what = f"{len(rewards)} values" if isinstance(rewards, list) else f"a {type(rewards).__name__}"
            raise RewardError(f"{where} has {what} in \"rewards\"; expected a list of {stop - start}")
        for i, r in enumerate(rewards):
            if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))):
                raise RewardError(f"{where} has {_clip(repr(r), 80)} for sample {start + i}; "
                                  f"expected a number or null")
        return rewards


def _body(top: dict[str, list[bytes]], cols: dict[str, list[bytes]], start: int, stop: int) -> bytes:
    """The request body for samples [start, stop): the same bytes json.dumps(doc, separators=(",", ":")) gives."""

    def field(key: str, values: list[bytes]) -> bytes:
        return json.dumps(key).encode() + b":[" + b",".join(values[start:stop]) + b"]"

    columns = b'"columns":{' + b",".join(field(k, v) for k, v in cols.items()) + b"}"
    return b"{" + b",".join([*(field(k, v) for k, v in top.items()), columns]) + b"}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx becomes an HTTPError: urllib would re-send a redirected POST as a GET, elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _error_body(e: urllib.error.HTTPError) -> str:
    """The first 200 characters of an error response's body."""
    try:
        return e.read(800).decode("utf-8", "replace")[:200]
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        e.close()


def _describe(e: BaseException | None) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):  # urllib wraps the socket's error
        e = e.reason if isinstance(e.reason, BaseException) else e
    return f"{type(e).__name__}: {e}"


def _clip(raw: Any, n: int) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text if len(text) <= n else text[: n - 3] + "..."
