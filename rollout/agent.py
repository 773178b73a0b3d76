"""Multi-turn rollouts: one trajectory, turn by turn, token in and token out.

    prompt ids -> model turn 1 (sampled ids) -> tool calls? run them, their results as `tool` messages
                                             -> else the environment's step(text): reward, done, observations
               -> the reply rendered by the chat template as ids (rollout.multiturn.ReplyRenderer)
               -> model turn 2 -> ... until the environment says done, the model answers without a tool
                  call (tools only), env.max_turns, the token budget, or a turn cut by max_new_tokens.

The engine is behind `complete(ids, max_tokens, seed) -> TurnOutput`, so the loop runs (and is tested)
without vLLM; rollout/generator.py gives it the engine. The model's ids go into the trajectory exactly
as sampled; only the environment and the tools read them as text. Environment and tool calls run off
the engine's thread (rollout.calls): while this trajectory waits on them the engine keeps generating
for the others in flight.

Stop causes (`EpisodeStats.stop`): "done" (the environment ended it), "answered" (tools only: a turn
without a tool call), "env_error" (a failed environment call under env.on_error=penalize), and the
limits, "max_turns" and "budget" (env.max_total_tokens). A turn cut by rollout.max_new_tokens is still
the model's action: the environment (or the tool parser) reads it and the trajectory goes on
(`cut_turns` counts them). A trajectory is marked truncated, like a single-turn sample cut by
max_new_tokens, when a limit stopped it or its last turn was cut.

Policy versions: each turn records the weights that sampled it. In async mode a weight update can land
between two turns of one trajectory, so its turns may span versions. Each model token's rollout
log-prob is the one of the weights that sampled it, so the token-level corrections (token_tis,
token_mask) weigh every token by its own version's ratio; the sample's `policy_version` is its oldest
turn's, so rollout.max_staleness bounds every turn of a trained trajectory.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from rlhf.types import EpisodeStats
from rollout.decode import completion_texts
from rollout.env import ENV_FAILURE_KINDS, EnvRunner
from rollout.multiturn import ModelTurn, ReplyRenderer, Trajectory, build_trajectory
from rollout.tools import TOOL_ERROR_KINDS, ToolBox


@dataclass(frozen=True)
class TurnOutput:
    ids: list[int]  # [n] the sampled token ids of this turn
    logprobs: list[float]  # [n] the generator's log-prob of each
    cut: bool  # stopped by its token limit, not by a stop token
    version: int  # the policy version of the weights that sampled it


Complete = Callable[[list[int], int, int], Awaitable[TurnOutput]]  # (ids so far, max_tokens, seed) -> the turn
Decode = Callable[[list[int], list[int]], str]  # (ids before, new ids) -> the new ids' text


@dataclass(frozen=True)
class AgentSettings:
    max_turns: int  # model turns per trajectory
    max_new_tokens: int  # per model turn
    max_total_tokens: int  # prompt + model turns + replies
    reward: Literal["sum", "last"] = "sum"  # how the environment's step rewards make the trajectory's


@dataclass(frozen=True)
class Episode:
    trajectory: Trajectory
    env_reward: float | None  # None without an environment
    stats: EpisodeStats


async def run_episode(complete: Complete, decode: Decode, renderer: ReplyRenderer, prompt_ids: list[int],
                      prompt_messages: list[dict[str, Any]], settings: AgentSettings, seed: int,
                      runner: EnvRunner | None = None, toolbox: ToolBox | None = None) -> Episode:
    """One trajectory (see the module docstring). The environment, if any, is closed whatever happens."""
    turns: list[ModelTurn] = []
    rewards: list[float] = []
    tool_results: list = []
    stop, cut_turns, last_cut = "", 0, False
    try:
        if runner is not None:
            init = await asyncio.wrap_future(runner.init(prompt_messages))
            if init.failure is not None:  # penalize: the trajectory ends before its first turn
                rewards.append(runner.penalty)
                stop = "env_error"
            elif init.messages != prompt_messages:
                prompt_ids = renderer.prompt_ids(init.messages)
        ids = list(prompt_ids)
        for k in range(settings.max_turns if not stop else 0):
            room = settings.max_total_tokens - len(ids)
            if room <= 0:
                stop = "budget"
                break
            out = await complete(ids, min(settings.max_new_tokens, room), seed + 7919 * k)
            turn = ModelTurn(out.ids, out.logprobs, out.version)
            if out.cut and room <= settings.max_new_tokens:  # the trajectory's budget is spent
                turns.append(turn)
                stop = "budget"
                break
            cut_turns += out.cut  # a turn cut by max_new_tokens is still the model's action
            last_cut = out.cut
            text = decode(ids, out.ids)
            reply: list[dict[str, Any]] | None = None
            results = await asyncio.wrap_future(toolbox.run(text)) if toolbox is not None else []
            if results:
                tool_results += results
                reply = [r.message() for r in results]
            elif runner is not None:
                step = await asyncio.wrap_future(runner.step(text))
                rewards.append(step.reward)
                if step.done:
                    stop = "env_error" if step.failure is not None else "done"
                else:
                    reply = step.observations
            else:
                stop = "answered"
            if reply is None or k == settings.max_turns - 1:
                turns.append(turn)
                stop = stop or "max_turns"
                break
            turns.append(ModelTurn(out.ids, out.logprobs, out.version, renderer.reply_ids(out.ids, reply)))
            ids += turns[-1].ids + turns[-1].reply_ids
    finally:
        if runner is not None:
            await asyncio.wrap_future(runner.close())
    trajectory = build_trajectory(prompt_ids, turns, settings.max_total_tokens)
    if trajectory.truncated:
        stop = "budget"  # a reply did not fit
    env_reward = None if runner is None else (sum(rewards) if settings.reward == "sum" else
                                              (rewards[-1] if rewards else 0.0))
    errors = dict.fromkeys(TOOL_ERROR_KINDS, 0)
    for r in tool_results:
        if r.error is not None:
            errors[r.error] += 1
    failures: dict[str, int] = {}
    for f in runner.failures if runner is not None else ():
        failures[f.kind] = failures.get(f.kind, 0) + 1
    stats = EpisodeStats(turns=len(turns), turn_versions=[t.policy_version for t in turns],
                         tool_calls=len(tool_results), tool_errors=errors, env_failures=failures,
                         env_seconds=runner.seconds if runner is not None else 0.0, stop=stop, cut_turns=cut_turns,
                         truncated=stop in ("max_turns", "budget") or (bool(turns) and last_cut))
    return Episode(trajectory=trajectory, env_reward=env_reward, stats=stats)


class Agent:
    """What a generator needs for multi-turn rollouts, built once from the config (env.*): the
    tokenizer and reply renderer, the environment class, the tools. `runner(row)` makes one
    trajectory's environment; `sample(...)` turns an episode into the Sample the trainer gets."""

    def __init__(self, cfg: Any):
        from transformers import AutoTokenizer

        from rollout.env import load_env_class
        from rollout.sandbox import python_tool
        from rollout.tools import load_tool

        e = cfg.env
        self.cfg = e
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        self.env_cls = load_env_class(e.cls) if e.cls else None
        tools = [python_tool() if t == "python" else load_tool(t) for t in e.tools]
        self.toolbox = ToolBox(tools, e.tool_parser, e.tool_timeout_s, e.tool_max_chars) if tools else None
        self.renderer = ReplyRenderer(self.tokenizer, self.toolbox.schemas if self.toolbox else None)
        # A template that ignores `tools=` (SmolLM2's, for one) would hide the tools from the model without
        # a word: their schemas and the call format then go into the system message instead.
        self.tools_in_system = self.toolbox is not None and not template_renders_tools(self.tokenizer,
                                                                                       self.toolbox.schemas)
        self.settings = AgentSettings(max_turns=e.max_turns, max_new_tokens=cfg.rollout.max_new_tokens,
                                      max_total_tokens=cfg.max_total_tokens, reward=e.reward)

    def runner(self, row: dict[str, Any]) -> EnvRunner | None:
        if self.env_cls is None:
            return None
        return EnvRunner(self.env_cls, self.cfg.kwargs, row, self.cfg.timeout_s, self.cfg.on_error, self.cfg.penalty)

    def prompt_messages(self, prompt: Any) -> list[dict[str, Any]]:
        """The conversation the first turn continues: the prompt's messages, with the tools described in
        the system message where the chat template does not render them itself."""
        if prompt.messages is None:
            raise ValueError("multi-turn rollouts need chat prompts (data.apply_chat_template: true)")
        if not self.tools_in_system:
            return prompt.messages
        return with_tools_in_system(prompt.messages, self.toolbox.schemas)

    def prompt_ids(self, prompt: Any) -> list[int]:
        """The prompt as the loader rendered it, or rendered again with the tools when there are tools."""
        return self.renderer.prompt_ids(self.prompt_messages(prompt)) if self.toolbox else list(prompt.ids)

    def decode(self, before: list[int], new: list[int]) -> str:
        return completion_texts(self.tokenizer, before, [new])[0]

    def sample(self, prompt: Any, episode: Episode, generator: int, version: int) -> Any:
        from dataclasses import replace

        from rlhf.types import Sample

        t = episode.trajectory
        p = t.prompt_len
        if t.ids[:p] != prompt.ids:  # the tools' schemas, or the environment's own opening
            prompt = replace(prompt, ids=t.ids[:p])
        completion = t.ids[p:]
        versions = episode.stats.turn_versions
        return Sample(prompt=prompt, completion_ids=completion, rollout_logprobs=t.logprobs[p:],
                      text=self.decode(t.ids[:p], completion), truncated=episode.stats.truncated,
                      policy_version=min(versions) if versions else version, generator=generator,
                      completion_mask=t.loss_mask[p:], env_reward=episode.env_reward, episode=episode.stats)


TOOLS_SYSTEM = ("You can call these tools:\n<tools>\n{schemas}\n</tools>\nTo call one, write "
                '<tool_call>{{"name": "<tool name>", "arguments": {{<its arguments>}}}}</tool_call>. '
                "Its result comes back in the next message.")


def template_renders_tools(tokenizer: Any, schemas: list[dict]) -> bool:
    """Whether the chat template writes `tools=` into the prompt at all."""
    probe = [{"role": "user", "content": "."}]
    render = functools.partial(tokenizer.apply_chat_template, probe, add_generation_prompt=True, tokenize=False)
    return render(tools=schemas) != render(tools=None)


def with_tools_in_system(messages: list[dict[str, Any]], schemas: list[dict]) -> list[dict[str, Any]]:
    """The messages with the tools (Hermes style, as Qwen's template writes them) in the system message."""
    text = TOOLS_SYSTEM.format(schemas="\n".join(json.dumps(s) for s in schemas))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


STOP_CAUSES = ("done", "answered", "env_error", "max_turns", "budget")


def episode_metrics(episodes: list[EpisodeStats]) -> dict[str, float]:
    """A batch's multi-turn figures: turns and tool calls per trajectory, tool errors and environment
    failures by kind (counts), environment seconds (summed), and the share of each stop cause."""
    n = max(len(episodes), 1)
    m = {"env/turns": sum(e.turns for e in episodes) / n,
         "env/tool_calls": sum(e.tool_calls for e in episodes) / n,
         "env/cut_turns": sum(e.cut_turns for e in episodes) / n,
         "env/seconds": sum(e.env_seconds for e in episodes),
         "env/truncated_frac": sum(e.truncated for e in episodes) / n,
         # async: the most policy versions one trajectory's turns span (weights pushed between its turns)
         "env/version_span_max": float(max((max(e.turn_versions) - min(e.turn_versions) for e in episodes
                                            if e.turn_versions), default=0))}
    for kind in TOOL_ERROR_KINDS:
        m[f"tools/errors/{kind}"] = float(sum(e.tool_errors.get(kind, 0) for e in episodes))
    for kind in ENV_FAILURE_KINDS:
        m[f"env/failures/{kind}"] = float(sum(e.env_failures.get(kind, 0) for e in episodes))
    for cause in STOP_CAUSES:
        m[f"env/stop/{cause}"] = sum(e.stop == cause for e in episodes) / n
    return m
