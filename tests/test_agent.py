"""The multi-turn loop (rollout/agent.py) with a scripted engine: the trained ids are the sampled ids, the
mask covers exactly the model's tokens, environment rewards and stop causes, tools, limits and failures."""

from __future__ import annotations

import asyncio
import threading

import pytest
from transformers import AutoTokenizer

from rlhf.tiny_model import CHAT_TEMPLATE
from rollout.agent import AgentSettings, TurnOutput, run_episode
from rollout.decode import completion_texts
from rollout.env import EnvError, EnvRunner
from rollout.multiturn import ReplyRenderer
from rollout.tools import ToolBox

PROMPT = [{"role": "user", "content": "Repeat the letter b many times:"}]


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


class TwoTurns:
    """Rewards each turn by the share of 'b' in it; asks for a second turn, then ends."""

    closed = 0

    def __init__(self):
        self.turn = 0

    def init(self, prompt_messages):
        return prompt_messages, {}

    def step(self, action_text):
        self.turn += 1
        reward = action_text.count("b") / max(len(action_text), 1)
        return {"observations": [{"role": "user", "content": "again"}], "reward": reward, "done": self.turn == 2}

    def close(self):
        TwoTurns.closed += 1


class Endless(TwoTurns):
    def step(self, action_text):
        return {"observations": [{"role": "user", "content": "more"}], "reward": 0.25, "done": False}


class Raises(TwoTurns):
    def step(self, action_text):
        raise RuntimeError("the simulator crashed")


@pytest.fixture(scope="module")
def tok(tiny_model):
    t = AutoTokenizer.from_pretrained(tiny_model)
    t.chat_template = CHAT_TEMPLATE
    return t


class Script:
    """An engine that answers turn k with texts[k] (+ EOS unless cut), and records what it was given."""

    def __init__(self, tok, texts, cut_at=None):
        self.tok, self.texts, self.cut_at, self.seen = tok, texts, cut_at, []

    async def __call__(self, ids, max_tokens, seed):
        k = len(self.seen)
        self.seen.append((list(ids), max_tokens))
        out = self.tok.encode(self.texts[k], add_special_tokens=False) + [self.tok.eos_token_id]
        cut = len(out) > max_tokens
        out = out[:max_tokens]
        return TurnOutput(out, [-0.1 * (i + 1) for i in range(len(out))], cut, version=k)


def decode_with(tok):
    return lambda before, new: completion_texts(tok, before, [new])[0]


def episode(tok, script, settings, runner=None, toolbox=None):
    renderer = ReplyRenderer(tok, toolbox.schemas if toolbox else None)
    prompt_ids = renderer.prompt_ids(PROMPT)
    return prompt_ids, renderer, asyncio.run(run_episode(script, decode_with(tok), renderer, prompt_ids, PROMPT,
                                                         settings, seed=0, runner=runner, toolbox=toolbox))


def test_two_turns_with_an_environment_train_exactly_the_sampled_ids(tok):
    closed = TwoTurns.closed
    script = Script(tok, ["bbb", "bxb"])
    prompt_ids, renderer, ep = episode(tok, script, AgentSettings(4, 16, 200), runner=EnvRunner(TwoTurns))
    t1 = tok.encode("bbb", add_special_tokens=False) + [tok.eos_token_id]
    t2 = tok.encode("bxb", add_special_tokens=False) + [tok.eos_token_id]
    reply = renderer.reply_ids(t1, [{"role": "user", "content": "again"}])
    assert ep.trajectory.ids == prompt_ids + t1 + reply + t2
    assert ep.trajectory.loss_mask == [0] * len(prompt_ids) + [1] * len(t1) + [0] * len(reply) + [1] * len(t2)
    assert script.seen[1][0] == prompt_ids + t1 + reply  # turn 2 continues the very ids of turn 1
    assert ep.env_reward == pytest.approx(1.0 + 2 / 3)  # "bbb" 3/3, "bxb" 2/3 (EOS is not in the text)
    assert ep.stats.turns == 2 and ep.stats.stop == "done" and not ep.stats.truncated
    assert ep.stats.turn_versions == [0, 1] and TwoTurns.closed == closed + 1
    assert ep.trajectory.policy_versions[len(prompt_ids)] == 0 and ep.trajectory.policy_versions[-1] == 1


def test_reward_last_takes_the_final_steps_reward(tok):
    _, _, ep = episode(tok, Script(tok, ["bbb", "bxb"]), AgentSettings(4, 16, 200, reward="last"),
                       runner=EnvRunner(TwoTurns))
    assert ep.env_reward == pytest.approx(2 / 3)


def test_a_tool_call_then_an_answer(tok):
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    script = Script(tok, [call, "5"])
    _, renderer, ep = episode(tok, script, AgentSettings(4, 200, 1000), toolbox=ToolBox([add]))
    assert ep.stats.tool_calls == 1 and sum(ep.stats.tool_errors.values()) == 0 and ep.stats.stop == "answered"
    t1 = tok.encode(call, add_special_tokens=False) + [tok.eos_token_id]
    reply = renderer.reply_ids(t1, [{"role": "tool", "name": "add", "content": "5"}])
    assert tok.decode(reply).count("5") == 1  # the tool's answer is in the reply, masked out
    assert ep.env_reward is None and sum(ep.trajectory.loss_mask) == len(t1) + 2  # "5" + EOS


def test_a_bad_tool_call_is_an_error_message_and_a_count(tok):
    script = Script(tok, ['<tool_call>{"name": "mul", "arguments": {}}</tool_call>', "ok"])
    _, _, ep = episode(tok, script, AgentSettings(4, 200, 1000), toolbox=ToolBox([add]))
    assert ep.stats.tool_errors["unknown_tool"] == 1 and ep.stats.turns == 2


def test_limits_mark_the_trajectory_truncated(tok):
    # max_turns: the environment never ends it
    _, _, ep = episode(tok, Script(tok, ["b", "b", "b"]), AgentSettings(3, 16, 400), runner=EnvRunner(Endless))
    assert (ep.stats.stop, ep.stats.turns, ep.stats.truncated, ep.env_reward) == ("max_turns", 3, True, 0.75)
    # turns cut by rollout.max_new_tokens are still actions: the environment reads them and the dialogue goes on
    _, _, ep = episode(tok, Script(tok, ["bbbbbbbbbbbbbbbbbbbb", "b", "bbbbbbbbbbbbbbbbbbbb"]),
                       AgentSettings(3, 4, 400), runner=EnvRunner(Endless))
    assert (ep.stats.stop, ep.stats.cut_turns, ep.stats.truncated, ep.env_reward) == ("max_turns", 2, True, 0.75)
    _, _, ep = episode(tok, Script(tok, ["bbbbbbbbbbbbbbbbbbbb", "b"]), AgentSettings(3, 4, 400),
                       runner=EnvRunner(TwoTurns))
    assert (ep.stats.stop, ep.stats.cut_turns, ep.stats.truncated) == ("done", 1, False)  # its last turn ended
    # the token budget: turn 2 gets only the room that is left
    prompt_ids, _, ep = episode(tok, Script(tok, ["b", "bbbbbbbbbbbbbbbbbbbbbbbbbbbb"]), AgentSettings(3, 64, 40),
                                runner=EnvRunner(Endless))
    assert ep.stats.stop == "budget" and ep.stats.truncated and len(ep.trajectory.ids) == 40


def test_a_failing_environment_under_both_policies(tok):
    closed = TwoTurns.closed
    _, _, ep = episode(tok, Script(tok, ["b"]), AgentSettings(3, 16, 400),
                       runner=EnvRunner(Raises, on_error="penalize", penalty=-1.0))
    assert ep.stats.stop == "env_error" and ep.env_reward == -1.0 and ep.stats.env_failures == {"raised": 1}
    assert not ep.stats.truncated and ep.stats.turns == 1 and TwoTurns.closed == closed + 1
    with pytest.raises(EnvError, match="the simulator crashed"):
        episode(tok, Script(tok, ["b"]), AgentSettings(3, 16, 400), runner=EnvRunner(Raises))
    assert TwoTurns.closed == closed + 2  # closed on the way out of the error too


class Meet(TwoTurns):
    """Each step waits until all four trajectories' environments are inside a step at once."""

    barrier = threading.Barrier(4, timeout=60)  # a deadline against a hang, far from the ~0 s it takes

    def step(self, action_text):
        Meet.barrier.wait()
        return super().step(action_text)


def test_the_engine_generates_for_others_while_one_waits_on_its_environment(tok):
    """Four trajectories whose environment steps only proceed together: they can finish only if
    every trajectory reaches its step while the others wait in theirs (steps run off the loop)."""
    renderer = ReplyRenderer(tok)
    prompt_ids = renderer.prompt_ids(PROMPT)

    async def four():
        return await asyncio.gather(*(run_episode(Script(tok, ["b", "b"]), decode_with(tok), renderer, prompt_ids,
                                                  PROMPT, AgentSettings(2, 8, 200), seed=i,
                                                  runner=EnvRunner(Meet, timeout_s=120))
                                      for i in range(4)))

    episodes = asyncio.run(four())
    assert all(e.stats.stop == "done" and e.stats.turns == 2 for e in episodes)


def test_tools_go_into_the_system_message_when_the_template_ignores_them(tok):
    from rollout.agent import template_renders_tools, with_tools_in_system

    schemas = ToolBox([add]).schemas
    assert not template_renders_tools(tok, schemas)  # the tiny template, like SmolLM2's, has no tools section
    with_tools = type(tok).from_pretrained(tok.name_or_path)
    with_tools.chat_template = "{% if tools %}TOOLS {{ tools | tojson }}{% endif %}" + CHAT_TEMPLATE
    assert template_renders_tools(with_tools, schemas)
    messages = with_tools_in_system(PROMPT, schemas)
    assert messages[0]["role"] == "system" and '"name": "add"' in messages[0]["content"] and messages[1:] == PROMPT
    own = with_tools_in_system([{"role": "system", "content": "Be brief."}, *PROMPT], schemas)
    assert own[0]["content"].startswith("Be brief.\n\nYou can call these tools") and len(own) == 2
