"""The environment API: loading by path, construction from config and row, a skyrl-gym-shaped class run
unchanged, sync and async methods off the caller's thread, and every failure kind under both policies."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time

import pytest

from rollout.env import (
    ENV_FAILURE_KINDS,
    EnvError,
    EnvRunner,
    InitResult,
    StepResult,
    build_env,
    failure_counts,
    load_env_class,
)

PROMPT = [{"role": "user", "content": "Say a word."}]

# A stand-in for the skyrl-gym package (PyPI `skyrl-gym`), with the shapes its BaseTextEnv has: a TypedDict
# step output with observations/reward/done/metadata (+ optional postprocessed_action), init(prompt) ->
# (prompt, {}), close(), and environments built as Cls(env_config=..., extras=row).
FAKE_SKYRL = {
    "skyrl_gym/__init__.py": """
        class Env:
            def step(self, action): raise NotImplementedError
            def init(self, *args, **kwargs): raise NotImplementedError
            def close(self): pass
    """,
    "skyrl_gym/envs/__init__.py": "",
    "skyrl_gym/envs/base_text_env.py": """
        from typing import Any, Dict, List, Optional, Tuple, TypedDict
        from skyrl_gym import Env

        ConversationType = List[Dict[str, str]]

        class BaseTextEnvStepOutput(TypedDict):
            observations: List[Dict[str, str]]
            reward: float
            done: bool
            metadata: Dict[str, Any]
            postprocessed_action: Optional[str]

        class BaseTextEnv(Env):
            def __init__(self):
                super().__init__()
                self.turns = 0
                self.max_turns = 1

            def step(self, action: str) -> BaseTextEnvStepOutput:
                pass

            def init(self, prompt: ConversationType) -> Tuple[ConversationType, Dict[str, Any]]:
                return prompt, {}

            def close(self):
                pass
    """,
}

SKYRL_ENV = """
    from typing import Any, Dict
    from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

    CLOSED = []

    class EchoUntilRight(BaseTextEnv):
        '''Asks again until the answer is the ground truth; written for skyrl-gym, unchanged.'''

        def __init__(self, env_config, extras: Dict[str, Any] = {}):
            super().__init__()
            self.ground_truth = extras["reward_spec"]["ground_truth"]
            self.max_turns = env_config.max_turns

        def step(self, action: str) -> BaseTextEnvStepOutput:
            self.turns += 1
            right = action.strip() == self.ground_truth
            done = right or self.turns >= self.max_turns
            obs = [] if done else [{"role": "user", "content": "Try again."}]
            return BaseTextEnvStepOutput(observations=obs, reward=1.0 if right else 0.0, done=done,
                                         metadata={"turn": self.turns}, postprocessed_action=None)

        def close(self):
            CLOSED.append(self.turns)
"""

ENVS = """
    import asyncio, math, time

    CALLS = []

    class Plain:
        def __init__(self, target, answer, **row):
            self.target, self.answer, self.row = target, answer, row
        def init(self, messages):
            return [{"role": "system", "content": self.target}] + messages, {"row": sorted(self.row)}
        def step(self, action):
            return {"observations": [], "reward": float(action == self.answer), "done": True}

    class Async:
        def __init__(self, delay=0.0):
            self.delay = delay
        async def init(self, messages):
            return messages, {}
        async def step(self, action):
            await asyncio.sleep(self.delay)
            return {"observations": [{"role": "user", "content": action[::-1]}], "reward": 0.5, "done": False,
                    "metadata": {}}
        async def close(self):
            CALLS.append("async-close")

    class Bad:
        '''step() misbehaves the way `mode` says; close() is recorded.'''
        def __init__(self, mode):
            self.mode = mode
        def step(self, action):
            m = self.mode
            if m == "raises": raise ValueError("the board is on fire")
            if m == "hangs": time.sleep(0.6)
            if m == "list": return [[], 1.0, True, {}]
            if m == "no_reward": return {"observations": [], "done": True, "metadata": {}}
            if m == "str_obs": return {"observations": "hello", "reward": 1.0, "done": True}
            if m == "str_reward": return {"observations": [], "reward": "1.0", "done": True}
            if m == "int_done": return {"observations": [], "reward": 1.0, "done": 1}
            if m == "nan": return {"observations": [], "reward": math.nan, "done": True}
            return {"observations": [], "reward": 1.0, "done": True}
        def close(self):
            CALLS.append(("close", self.mode))

    class AsyncHang:
        async def step(self, action):
            await asyncio.sleep(30)
        async def close(self):
            CALLS.append("async-hang-close")

    class BadInit:
        def init(self, messages):
            raise RuntimeError("no board today")
        def step(self, action):
            return {"observations": [], "reward": 0.0, "done": True}
        def close(self):
            CALLS.append("bad-init-close")

    class Slow:
        def step(self, action):
            time.sleep(0.3)
            return {"observations": [], "reward": 1.0, "done": True}

    def not_a_class():
        pass

    class NoStep:
        pass
"""


def write(root, files):
    for name, body in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))


@pytest.fixture
def envs(tmp_path):
    write(tmp_path, {"envs.py": ENVS})
    return tmp_path / "envs.py"


def run(runner: EnvRunner, actions: list[str]) -> tuple[InitResult, list[StepResult]]:
    init = runner.init(PROMPT).result(timeout=5)
    steps = []
    try:
        for a in actions:
            steps.append(runner.step(a).result(timeout=5))
            if steps[-1].done:
                break
    finally:
        runner.close().result(timeout=5)
    return init, steps


def test_a_skyrl_gym_environment_runs_unchanged_from_a_file_path(tmp_path, monkeypatch):
    write(tmp_path, FAKE_SKYRL)
    write(tmp_path, {"my_env.py": SKYRL_ENV})
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = load_env_class(f"{tmp_path / 'my_env.py'}:EchoUntilRight")
    row = {"reward_spec": {"ground_truth": "blue"}, "extra_info": {}}
    runner = EnvRunner(cls, {"max_turns": 3}, row)
    init, steps = run(runner, ["red", "green", "blue", "never"])
    assert init.messages == PROMPT and init.info == {} and init.failure is None
    assert [s.reward for s in steps] == [0.0, 0.0, 1.0] and [s.done for s in steps] == [False, False, True]
    assert steps[0].observations == [{"role": "user", "content": "Try again."}] and steps[2].observations == []
    assert steps[1].metadata == {"turn": 2}
    assert sys.modules[cls.__module__].CLOSED == [3] and runner.failures == []
    for name in [m for m in sys.modules if m == "skyrl_gym" or m.startswith("skyrl_gym.")]:
        monkeypatch.delitem(sys.modules, name)


def test_config_kwargs_and_the_row_columns_the_constructor_names(envs, monkeypatch):
    monkeypatch.syspath_prepend(str(envs.parent))
    cls = load_env_class("envs:Plain")  # by import path
    init, steps = run(EnvRunner(cls, {"target": "say cat"}, {"answer": "cat", "level": 3}), ["cat"])
    assert init.messages[0] == {"role": "system", "content": "say cat"} and init.info == {"row": ["level"]}
    assert steps[0].reward == 1.0 and steps[0].done
    with pytest.raises(EnvError, match=r"dataset column 'answer' clashes with env.kwargs 'answer'"):
        build_env(cls, {"target": "t", "answer": "x"}, {"answer": "cat"})
    with pytest.raises(EnvError, match=r"env.kwargs \['colour'\] are not arguments of its constructor"):
        build_env(load_env_class(f"{envs}:Async"), {"colour": "red"}, {})
    sys.modules.pop("envs", None)


@pytest.mark.parametrize("spec, message", [
    ("envs.py:not_a_class", r"is a function, not a class"),
    ("envs.py:NoStep", r"class NoStep has no step\(action_text\) method"),
    ("envs.py:Missing", r"has no 'Missing'"),
    ("envs.py", r"must look like 'pkg.module:Class'"),
])
def test_bad_environment_specs_are_named(envs, spec, message):
    with pytest.raises(EnvError, match=message):
        load_env_class(str(envs.parent / spec) if ":" in spec else spec)


def test_async_methods_run_on_the_event_loop_and_close_is_awaited(envs):
    cls = load_env_class(f"{envs}:Async")
    init, steps = run(EnvRunner(cls), ["abc"])
    assert init.messages == PROMPT and steps[0].observations == [{"role": "user", "content": "cba"}]
    assert steps[0].reward == 0.5 and not steps[0].done
    assert "async-close" in sys.modules[cls.__module__].CALLS


def test_calls_return_at_once_and_trajectories_wait_on_their_environments_concurrently(envs):
    cls = load_env_class(f"{envs}:Slow")
    runners = [EnvRunner(cls) for _ in range(3)]
    for r in runners:
        r.init(PROMPT).result(timeout=5)
    began = time.monotonic()
    futures = [r.step("x") for r in runners]
    assert time.monotonic() - began < 0.1  # submitting does not wait on the environment
    assert all(f.result(timeout=5).reward == 1.0 for f in futures)
    assert time.monotonic() - began < 0.8  # three 0.3 s steps side by side, not one after another
    for r in runners:
        r.close().result(timeout=5)
    assert all(r.seconds >= 0.3 for r in runners)


def test_a_coroutine_can_await_a_step(envs):
    async def main():
        runner = EnvRunner(load_env_class(f"{envs}:Async"), {"delay": 0.05})
        await asyncio.wrap_future(runner.init(PROMPT))
        result = await asyncio.wrap_future(runner.step("ab"))
        await asyncio.wrap_future(runner.close())
        return result

    assert asyncio.run(main()).observations == [{"role": "user", "content": "ba"}]


@pytest.mark.parametrize("mode, kind, message", [
    ("raises", "raised", r"Bad.step\(\) raised ValueError: the board is on fire \[raised\]"),
    ("hangs", "timeout", r"did not return within env.timeout_s=0.2 s \[timeout\]"),
    ("list", "wrong_type", r"returned a list .*it must return a dict"),
    ("no_reward", "wrong_shape", r"returned a dict without \['reward'\]"),
    ("str_obs", "wrong_shape", r"its observations are a str 'hello', not a list of messages"),
    ("str_reward", "wrong_shape", r"its reward is a str '1.0', not a real number"),
    ("int_done", "wrong_shape", r"its done is a int 1, not a bool"),
    ("nan", "not_finite", r"returned reward nan \[not_finite\]"),
])
def test_step_failures_are_classified_under_both_policies(envs, mode, kind, message):
    cls = load_env_class(f"{envs}:Bad")
    calls = sys.modules[cls.__module__].CALLS
    penalized = EnvRunner(cls, {"mode": mode}, timeout_s=0.2, on_error="penalize", penalty=-1.0)
    _, steps = run(penalized, ["x"])
    assert steps[0].reward == -1.0 and steps[0].done and steps[0].observations == []
    assert steps[0].failure is not None and steps[0].failure.kind == kind
    assert [f.kind for f in penalized.failures] == [kind]
    assert failure_counts([penalized]) == {f"env/failures/{k}": float(k == kind) for k in ENV_FAILURE_KINDS}
    with pytest.raises(EnvError, match=r"after a failed call"):
        penalized.step("again")

    raising = EnvRunner(cls, {"mode": mode}, timeout_s=0.2, on_error="raise")
    raising.init(PROMPT).result(timeout=5)
    with pytest.raises(EnvError, match=message) as err:
        raising.step("x").result(timeout=5)
    assert err.value.failure.kind == kind
    raising.close().result(timeout=5)
    if mode == "hangs":  # close() waits for the abandoned step, then runs
        deadline = time.monotonic() + 3
        while calls.count(("close", mode)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert calls.count(("close", mode)) == 2


def test_an_async_step_that_hangs_is_cancelled_and_close_still_runs(envs):
    cls = load_env_class(f"{envs}:AsyncHang")
    runner = EnvRunner(cls, timeout_s=0.2, on_error="penalize")
    began = time.monotonic()
    _, steps = run(runner, ["x"])
    assert steps[0].failure.kind == "timeout" and time.monotonic() - began < 2
    assert "async-hang-close" in sys.modules[cls.__module__].CALLS


def test_a_failed_init_under_penalize_hands_back_the_prompt_and_closes(envs):
    cls = load_env_class(f"{envs}:BadInit")
    runner = EnvRunner(cls, on_error="penalize")
    init = runner.init(PROMPT).result(timeout=5)
    assert init.messages == PROMPT and init.failure.kind == "raised" and "no board today" in init.failure.message
    with pytest.raises(EnvError, match="after a failed call"):
        runner.step("x")
    assert runner.close().result(timeout=5) is None
    assert "bad-init-close" in sys.modules[cls.__module__].CALLS
    with pytest.raises(EnvError, match=r"BadInit.init\(\) raised RuntimeError: no board today"):
        EnvRunner(cls).init(PROMPT).result(timeout=5)


def test_policy_and_limits_are_checked(envs):
    cls = load_env_class(f"{envs}:Plain")
    with pytest.raises(EnvError, match="on_error must be 'raise' or 'penalize'"):
        EnvRunner(cls, on_error="ignore")
    with pytest.raises(EnvError, match="timeout_s must be > 0"):
        EnvRunner(cls, timeout_s=0)
    with pytest.raises(EnvError, match="step\\(\\) before init"):
        EnvRunner(cls).step("x")
