"""The reward-model scorer: a Ray actor hosting an HF AutoModelForSequenceClassification (one output),
and `ModelReward`, the plain reward callable the driver hands to RewardScorer, so a reward model gets
the same timeouts, failure policy and weighting as any reward function.

Each (prompt, completion) is rendered with the tokenizer's chat template when it has one (user turn,
assistant turn), else as prompt + completion, truncated from the left to max_length tokens, and
scored by the logit at its last token.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from rlhf.config import RunConfig
from rlhf.devices import torch_device


@ray.remote
class RewardModel:
    def __init__(self, cfg: RunConfig, device: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        rm = cfg.reward.model
        self.batch_size, self.max_length = rm.batch_size, rm.max_length
        self.device = torch_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(rm.path, trust_remote_code=cfg.model.trust_remote_code)
        self.tokenizer.truncation_side = "left"  # keep the completion, which is what is being judged
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            rm.path, num_labels=1, trust_remote_code=cfg.model.trust_remote_code).to(self.device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # how HF finds each row's last token
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward.model.path: {rm.path} has {self.model.config.num_labels} outputs; a reward "
                             f"model needs exactly 1")

    def render(self, prompt: str, completion: str) -> str:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out += self.model(**enc).logits[:, 0].float().cpu().tolist()
        return out


class ModelReward:
    """The reward function that asks the RewardModel actor; weighted and checked like any other."""

    __name__ = "reward_model"

    def __init__(self, actor: Any):
        self.actor = actor

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return ray.get(self.actor.score.remote(prompts, completions))
