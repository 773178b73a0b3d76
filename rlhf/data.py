"""Prompts from an HF `datasets` source: a local file (.jsonl/.json/.parquet/.csv), a directory
saved with `save_to_disk`, or a hub dataset id. Batches come out in order (or shuffled per epoch)."""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, DataConfig
from rlhf.types import Prompt

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompt_dataset(cfg: DataConfig) -> Any:
    import datasets

    path = Path(cfg.path).expanduser()
    if path.is_file():
        fmt = FILE_FORMATS.get(path.suffix)
        if fmt is None:
            raise ConfigError(f"data.path: {path} has suffix {path.suffix!r}; expected one of {sorted(FILE_FORMATS)}")
        ds = datasets.load_dataset(fmt, data_files=str(path), split=cfg.split)
    elif path.is_dir() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))
    elif path.exists():
        ds = datasets.load_dataset(str(path), cfg.subset or None, split=cfg.split)  # a directory of data files
    else:
        ds = datasets.load_dataset(cfg.path, cfg.subset or None, split=cfg.split)  # an HF hub id
    if cfg.prompt_key not in ds.column_names:
        raise ConfigError(f"data.prompt_key: column {cfg.prompt_key!r} not in {cfg.path} "
                          f"(columns: {ds.column_names})")
    if len(ds) == 0:
        raise ConfigError(f"data.path: {cfg.path} has no rows")
    return ds


class PromptLoader:
    """Tokenizes rows on demand and hands out batches, wrapping around epochs.

    Prompts longer than max_prompt_tokens are skipped and counted in `skipped_too_long`.
    """

    def __init__(self, dataset: Any, tokenizer: Any, cfg: DataConfig, seed: int):
        self.dataset, self.tokenizer, self.cfg = dataset, tokenizer, cfg
        self.rng = random.Random(seed)
        self.epoch = 0
        self.position = 0
        self.order = self._order()
        self.skipped_too_long = 0
        self.handed_out = 0  # prompts returned by next_batch in this process (not saved: a resumed run counts anew)
        self.requeued: deque[int] = deque()  # rows handed out before a checkpoint but never trained: first out

    def _order(self) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.cfg.shuffle:
            self.rng.shuffle(order)
        return order

    def state_dict(self, pending: list[Prompt] | tuple[Prompt, ...] = ()) -> dict:
        """Where the loader is, as JSON-able data: resuming from it yields the same batches. `pending`:
        prompts handed out but not trained yet (async rollouts in flight); they come out first on resume."""
        version, internal, gauss = self.rng.getstate()
        return {"epoch": self.epoch, "position": self.position, "order": self.order,
                "rng": [version, list(internal), gauss], "skipped_too_long": self.skipped_too_long,
                "pending": [p.index for p in pending] + list(self.requeued)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["order"]) != len(self.dataset):
            raise ValueError(f"the checkpoint's prompt order covers {len(state['order'])} rows; "
                             f"{self.cfg.path} has {len(self.dataset)}: not the same dataset")
        self.epoch, self.position, self.order = state["epoch"], state["position"], list(state["order"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.skipped_too_long = state["skipped_too_long"]
        self.requeued = deque(state.get("pending", []))

    def next_batch(self, n: int) -> list[Prompt]:
        batch: list[Prompt] = []
        scanned = 0
        while len(batch) < n and self.requeued:
            prompt = self._prompt(self.requeued.popleft())
            if prompt is not None:
                batch.append(prompt)
        while len(batch) < n:
            if self.position == len(self.order):
                self.epoch, self.position, self.order = self.epoch + 1, 0, self._order()
            index = self.order[self.position]
            self.position += 1
            scanned += 1
            prompt = self._prompt(index)
            if prompt is None:
                self.skipped_too_long += 1
                if scanned > len(self.order) and not batch:
                    raise ConfigError(f"data.max_prompt_tokens: every prompt of {self.cfg.path} is longer "
                                      f"than {self.cfg.max_prompt_tokens} tokens")
                continue
            batch.append(prompt)
        self.handed_out += len(batch)
        return batch

    def _prompt(self, index: int) -> Prompt | None:
        row = dict(self.dataset[index])
        text = row.pop(self.cfg.prompt_key)
        messages = None
        if self.cfg.apply_chat_template:
            messages = chat_messages(text, self.cfg.system_prompt, index)
            text = render_chat(self.tokenizer, messages)
            # what apply_chat_template(tokenize=True) does: the rendered text holds its special tokens
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if not isinstance(text, str):
                raise ConfigError(f"data.prompt_key: row {index} has a {type(text).__name__} prompt; "
                                  f"set data.apply_chat_template=true for chat messages")
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > self.cfg.max_prompt_tokens:
            return None
        return Prompt(index=index, text=text, ids=list(ids), row=row, messages=messages)


def chat_messages(prompt: Any, system_prompt: str, index: int) -> list[dict[str, Any]]:
    """A row's prompt as chat messages: a string becomes one user message, a list of messages is taken
    as it is; `system_prompt` goes first unless the messages start with a system message of their own."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise ConfigError(f"data.prompt_key: row {index}'s prompt is neither a string nor a list of messages "
                          f"with a 'role' each: {prompt!r:.200}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text of `messages` with the assistant's turn opened, by the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.apply_chat_template: the tokenizer of {tokenizer.name_or_path} has no chat template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
