"""Samples of one prompt share the prompt's forward (actors/common.py): the same log-probs and gradients
as one forward per sample, with fewer tokens."""

import pytest
import torch

from actors.common import SharedPrompts, micro_logits
from rlhf.algorithms import token_logprobs
from rlhf.types import Prompt, Sample, collate


def sample(prompt_ids: list[int], completion_ids: list[int], index: int) -> Sample:
    return Sample(Prompt(index, "p", prompt_ids, {}), completion_ids, [0.0] * len(completion_ids), "", False, 0, 0)


def test_plan_by_hand():
    # rows: prompt [5, 6] + [7, 8]; prompt [9] + [3, 4, 2]; prompt [5, 6] + [1]
    batch = collate([sample([5, 6], [7, 8], 0), sample([9], [3, 4, 2], 1), sample([5, 6], [1], 0)], pad_id=0)
    plan = SharedPrompts.of(batch.input_ids, batch.prompt_lengths, batch.attention_mask.sum(-1))
    assert plan.prompt_ids.tolist() == [[5, 6], [9, 0]]
    assert plan.prompt_lengths.tolist() == [2, 1]
    assert plan.row_prompt.tolist() == [0, 1, 0]
    assert plan.completion_ids.tolist() == [[7, 8, 0], [3, 4, 2], [1, 0, 0]]
    assert plan.completion_lengths.tolist() == [2, 3, 1]
    # table rows: 0-1 the prompts' last positions, 2 + 2 * row + j completion position j (of the first 2) of
    # a row, 8 zeros
    zero = 2 + 3 * 2
    assert plan.source.tolist() == [
        [zero, 0, 2],  # columns score tokens 6, 7, 8: 7 from prompt 0's end, 8 from completion position 0
        [1, 4, 5],  # scores 3 (prompt 1's end), 4 (position 0), 2 (position 1)
        [zero, 0, zero],  # scores 6, 1 (prompt 0's end), padding
    ]
    assert plan.saves_tokens()
    unique = collate([sample([5, 6], [7], 0), sample([9], [3], 1)], pad_id=0)
    assert not SharedPrompts.of(unique.input_ids, unique.prompt_lengths, unique.attention_mask.sum(-1)).saves_tokens()


def tiny_qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).float()


BATCH = [  # groups of different prompt lengths, a lone prompt, an empty completion, rows out of order
    sample([3, 4, 5], [7, 8, 9, 10], 0), sample([3, 4, 5], [11, 2], 0), sample([6, 7, 8, 9, 10], [12, 13], 1),
    sample([3, 4, 5], [14, 15, 16, 17, 18, 19], 0), sample([6, 7, 8, 9, 10], [20], 1), sample([21], [22, 23], 2),
    sample([3, 4, 5], [], 0),
]


def logprobs_and_grads(model: torch.nn.Module, share: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = collate(BATCH, pad_id=0)
    model.zero_grad()
    logits = micro_logits(model, batch, torch.device("cpu"), share_prompts=share)
    logp = token_logprobs(logits, batch.input_ids[:, 1:], 1.0) * batch.loss_mask
    (logp.sum() + logp.square().sum()).backward()  # a loss whose gradient depends on every scored token
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_shared_forward_equals_one_forward_per_sample(lora):
    model = tiny_qwen2()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0; a nonzero B makes the adapters matter
                torch.nn.init.normal_(p, std=0.1)
    plain, plain_grads = logprobs_and_grads(model, share=False)
    shared, shared_grads = logprobs_and_grads(model, share=True)
    mask = collate(BATCH, pad_id=0).loss_mask
    assert (plain != 0).sum() == mask.sum()  # every completion token is scored
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], g, atol=1e-4, rtol=1e-4, msg=name)


def test_shared_forward_runs_fewer_tokens():
    batch = collate(BATCH, pad_id=0)
    plan = SharedPrompts.of(batch.input_ids, batch.prompt_lengths, batch.attention_mask.sum(-1))
    fed = plan.prompt_ids.numel() + plan.completion_ids.numel()
    assert fed < batch.input_ids.numel()
    seen = []
    model = tiny_qwen2()
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()),
                                    with_kwargs=True)
    micro_logits(model, batch, torch.device("cpu"), share_prompts=True)
    b, c = plan.completion_ids.shape
    assert seen == [plan.prompt_ids.numel(), b * (c - 1)]  # the last completion position scores nothing


def test_the_plain_forward_skips_only_the_last_position():
    batch = collate(BATCH, pad_id=0)
    model = tiny_qwen2()
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = micro_logits(model, batch, torch.device("cpu"), share_prompts=False)
    assert logits.shape == (batch.input_ids.shape[0], batch.input_ids.shape[1] - 1, 50)
    mask = batch.attention_mask[:, 1:].bool()  # padded columns differ (they attend to nothing new); unused
    torch.testing.assert_close(logits[mask], full[:, :-1][mask], atol=1e-5, rtol=1e-5)


def test_completions_of_one_token_need_no_completion_forward():
    one = [sample([3, 4, 5], [7], 0), sample([3, 4, 5], [8], 0), sample([6], [9], 1)]
    batch = collate(one, pad_id=0)
    model = tiny_qwen2()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        plain = token_logprobs(micro_logits(model, batch, torch.device("cpu")), batch.input_ids[:, 1:], 1.0)
        shared = token_logprobs(micro_logits(model, batch, torch.device("cpu"), share_prompts=True),
                                batch.input_ids[:, 1:], 1.0)
    assert seen[1:] == [(2, 3)]  # the plain forward, then only the two unique prompts
    torch.testing.assert_close(shared * batch.loss_mask, plain * batch.loss_mask, atol=1e-5, rtol=1e-5)
