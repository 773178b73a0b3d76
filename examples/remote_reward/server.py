"""A reward server for the charset task, speaking RemoteReward's protocol (reward/remote.py).

    python examples/remote_reward/server.py --port 8000

POST /score {"prompts": [...], "completions": [...], "completion_ids": [[...], ...], "columns": {...}}
answers {"rewards": [...]}: for each completion, the fraction of its non-space characters that are
in its row's `charset` column (examples/charset/reward.py, copied so this file runs on its own).

Standard library only, and bound to 127.0.0.1: an example to copy, not a hardened service. A request
it cannot read gets 400 and a scorer that raises gets 500 (RemoteReward retries that one); both
carry {"error": "..."}. Tests start it in a thread with make_server(port=0).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger("remote_reward")


def charset_reward(prompts, completions, charset, **kwargs):
    """Fraction of each completion's non-space characters that are in its row's `charset` (0 if empty)."""
    scores = []
    for completion, allowed in zip(completions, charset):
        chars = [c for c in completion if not c.isspace()]
        scores.append(sum(c in allowed for c in chars) / len(chars) if chars else 0.0)
    return scores


def make_server(port: int = 0, score_fn: Callable[..., list] = charset_reward,
                path: str = "/score") -> ThreadingHTTPServer:
    """A server on 127.0.0.1:port (0: a free one, see server.server_address) that answers POST `path`
    with score_fn(prompts=..., completions=..., completion_ids=..., **columns), a reward function of
    the ordinary kind (reward/api.py). Call serve_forever() on it, then shutdown() and server_close()."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != path:
                return self._reply(404, {"error": f"POST {path}, not {self.path}"})
            try:
                kwargs = _read_request(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except ValueError as e:
                return self._reply(400, {"error": f"bad request: {e}"})
            try:
                rewards = list(score_fn(**kwargs))
            except Exception as e:  # the scorer's failure, reported to the client as a server error
                logger.exception("scoring a batch of %d failed", len(kwargs["prompts"]))
                return self._reply(500, {"error": f"{type(e).__name__}: {e}"})
            self._reply(200, {"rewards": rewards})

        def _reply(self, status: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # to logging, not straight to stderr
            logger.info("%s %s", self.address_string(), format % args)

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def _read_request(body: bytes) -> dict:
    """The reward function's keyword arguments from a request body; ValueError says what is wrong."""
    doc = json.loads(body)  # a JSONDecodeError is a ValueError
    if not isinstance(doc, dict) or not isinstance(doc.get("columns", {}), dict):
        raise ValueError('expected {"prompts": [...], "completions": [...], "completion_ids": [...], '
                         '"columns": {...}}')
    kwargs = {key: doc.get(key) for key in ("prompts", "completions", "completion_ids")}
    for name, values in doc.get("columns", {}).items():
        if name in kwargs:
            raise ValueError(f"column {name!r} clashes with an argument")
        kwargs[name] = values
    n = len(kwargs["prompts"]) if isinstance(kwargs["prompts"], list) else -1
    for name, values in kwargs.items():
        if not isinstance(values, list) or len(values) != n:
            raise ValueError(f"{name!r} must be a list as long as 'prompts'")
    return kwargs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = make_server(args.port)
    logger.info("scoring at http://127.0.0.1:%d/score", server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
