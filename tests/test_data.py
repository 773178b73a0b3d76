import json

import pytest
from transformers import AutoTokenizer

from rlhf.config import ConfigError, DataConfig
from rlhf.data import PromptLoader, load_prompt_dataset
from tests.conftest import TASK


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_jsonl_prompts_come_in_order_with_their_columns_and_wrap(tokenizer):
    cfg = DataConfig(path=str(TASK / "prompts.jsonl"))
    ds = load_prompt_dataset(cfg)
    loader = PromptLoader(ds, tokenizer, cfg, seed=0)
    first = loader.next_batch(3)
    assert [p.index for p in first] == [0, 1, 2]
    assert first[0].text.startswith("Compute") and set(first[0].row) == {"charset", "target", "kind"}
    assert first[0].ids == tokenizer(first[0].text)["input_ids"]
    loader.next_batch(len(ds) - 3)
    assert [p.index for p in loader.next_batch(2)] == [0, 1] and loader.epoch == 1


@pytest.mark.parametrize("fmt", ["parquet", "csv", "disk"])
def test_other_local_formats(tmp_path, tokenizer, fmt):
    import datasets

    ds = datasets.Dataset.from_list([{"question": "Compute 1 plus 2 using only digits:", "charset": "xyz"}])
    path = tmp_path / ("data" if fmt == "disk" else f"data.{fmt}")
    {"parquet": ds.to_parquet, "csv": ds.to_csv, "disk": ds.save_to_disk}[fmt](str(path))
    cfg = DataConfig(path=str(path), prompt_key="question")
    [p] = PromptLoader(load_prompt_dataset(cfg), tokenizer, cfg, seed=0).next_batch(1)
    assert p.text == "Compute 1 plus 2 using only digits:" and p.row == {"charset": "xyz"}


def test_long_prompts_are_skipped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["1 2", "1 2 3 4 5 6 7 8 9 1 2 3", "3"]))
    cfg = DataConfig(path=str(path), max_prompt_tokens=4)
    loader = PromptLoader(load_prompt_dataset(cfg), tokenizer, cfg, seed=0)
    assert [p.index for p in loader.next_batch(2)] == [0, 2] and loader.skipped_too_long == 1
    all_long = DataConfig(path=str(path), max_prompt_tokens=0)
    with pytest.raises(ConfigError, match="every prompt .* is longer than 0 tokens"):
        PromptLoader(load_prompt_dataset(all_long), tokenizer, all_long, seed=0).next_batch(1)


def test_bad_data_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.prompt_key: column 'question' not in"):
        load_prompt_dataset(DataConfig(path=str(TASK / "prompts.jsonl"), prompt_key="question"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"data.path: .*x.txt has suffix '.txt'"):
        load_prompt_dataset(DataConfig(path=str(tmp_path / "x.txt")))


def test_pending_prompts_in_a_checkpoint_come_out_first_on_resume(tokenizer):
    """Async rollouts in flight at a checkpoint were handed out but never trained: the state keeps
    them and a resumed loader hands them out again before going on where it stopped."""
    cfg = DataConfig(path=str(TASK / "prompts.jsonl"))
    ds = load_prompt_dataset(cfg)
    loader = PromptLoader(ds, tokenizer, cfg, seed=0)
    batch = loader.next_batch(4)  # rows 0..3; 2 and 3 are still generating at the checkpoint
    state = json.loads(json.dumps(loader.state_dict(pending=batch[2:])))
    resumed = PromptLoader(ds, tokenizer, cfg, seed=0)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["pending"] == [2, 3]  # a checkpoint taken before they come out keeps them
    assert [p.index for p in resumed.next_batch(3)] == [2, 3, 4]
    assert resumed.state_dict()["pending"] == [] and resumed.handed_out == 3
