"""Samples of one prompt share the prompt's forward, and the output layer runs only where a completion token
is scored (actors/common.py): the same log-probs, entropies and gradients as one full forward per sample, with
fewer tokens and fewer logits."""

import pytest
import torch

from actors.common import SharedPrompts, micro_scores, scored_columns
from rlhf.algorithms import entropy_from_logits, token_logprobs
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
    # columns of [3, 3] flattened: row * 3 + column, column k scoring token k+1
    assert plan.first_rows.tolist() == [0, 1, 2]  # every row has a completion
    assert plan.first_where.tolist() == [1, 3, 7]  # 7, 3 and 1, each scored at its prompt's last position
    assert plan.rest.tolist() == [[True, False], [True, True], [False, False]]
    assert plan.rest_where.tolist() == [2, 4, 5]  # 8 (row 0's position 0), 4 and 2 (row 1's positions 0, 1)
    assert scored_columns(batch).tolist() == [[False, True, True], [True, True, True], [False, True, False]]
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


def full_forward(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies [b, t-1] from one forward over every row and column, masked to the completions."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    mask = scored_columns(batch)
    return token_logprobs(logits, batch.input_ids[:, 1:]) * mask, entropy_from_logits(logits) * mask


def scores_and_grads(model: torch.nn.Module, share: bool, samples=BATCH):
    batch = collate(samples, pad_id=0)
    model.zero_grad()
    scores = micro_scores(model, batch, 1.0, torch.device("cpu"), share_prompts=share, entropy=True)
    logp = scores.logp * batch.loss_mask
    (logp.sum() + logp.square().sum() + scores.entropy.sum()).backward()  # depends on every scored token
    return scores, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_shared_forward_equals_one_forward_per_sample(lora):
    model = tiny_qwen2()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0; a nonzero B makes the adapters matter
                torch.nn.init.normal_(p, std=0.1)
    plain, plain_grads = scores_and_grads(model, share=False)
    shared, shared_grads = scores_and_grads(model, share=True)
    batch = collate(BATCH, pad_id=0)
    assert (plain.logp != 0).sum() == batch.loss_mask.sum()  # every completion token is scored, nothing else
    full_logp, full_entropy = full_forward(model, batch)
    for scores in (plain, shared):
        torch.testing.assert_close(scores.logp.detach(), full_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.entropy.detach(), full_entropy, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], g, atol=1e-4, rtol=1e-4, msg=name)


def output_layer_rows(model: torch.nn.Module) -> list[int]:
    """The positions each forward ran the output layer on (rows x columns), recorded by a hook."""
    seen: list[int] = []
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0] * args[0].shape[1]))
    return seen


def test_shared_forward_runs_fewer_tokens_and_the_output_layer_only_at_prompt_ends():
    batch = collate(BATCH, pad_id=0)
    plan = SharedPrompts.of(batch.input_ids, batch.prompt_lengths, batch.attention_mask.sum(-1))
    fed = plan.prompt_ids.numel() + plan.completion_ids.numel()
    assert fed < batch.input_ids.numel()
    seen = []
    model = tiny_qwen2()
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()),
                                    with_kwargs=True)
    heads = output_layer_rows(model)
    micro_scores(model, batch, 1.0, torch.device("cpu"), share_prompts=True)
    b, c = plan.completion_ids.shape
    assert seen == [plan.prompt_ids.numel(), b * (c - 1)]  # the last completion position scores nothing
    # 3 unique prompts ending at 3 distinct columns (3, 5 and 1 tokens): 3 x 3 prompt positions, not 3 x 5
    assert heads == [3 * 3, b * (c - 1)]


def test_the_plain_forward_runs_the_output_layer_from_the_first_scored_column():
    # prompts of 4 and 3 tokens: column 2 is the first to score a completion token, of 6 columns
    rows = [sample([3, 4, 5, 6], [7, 8, 9], 0), sample([10, 11, 12], [13, 14, 15, 16], 1)]
    batch = collate(rows, pad_id=0)
    model = tiny_qwen2()
    heads = output_layer_rows(model)
    with torch.no_grad():
        scores = micro_scores(model, batch, 1.0, torch.device("cpu"), share_prompts=False, entropy=True)
    assert batch.input_ids.shape == (2, 7) and heads == [2 * 4]  # columns 2..5 of both rows
    full_logp, full_entropy = full_forward(model, batch)
    torch.testing.assert_close(scores.logp, full_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.entropy, full_entropy, atol=1e-5, rtol=1e-5)


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not take logits_to_keep (as some remote-code models)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache)


@pytest.mark.parametrize("share", [False, True])
def test_a_model_without_logits_to_keep_gets_every_column_and_the_same_scores(share):
    model = tiny_qwen2()
    wrapped = NoLogitsToKeep(model)
    batch = collate(BATCH, pad_id=0)
    with torch.no_grad():
        want = micro_scores(model, batch, 0.7, torch.device("cpu"), share_prompts=share, entropy=True)
        got = micro_scores(wrapped, batch, 0.7, torch.device("cpu"), share_prompts=share, entropy=True)
    torch.testing.assert_close(got.logp, want.logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=1e-5)


def test_completions_of_one_token_need_no_completion_forward():
    one = [sample([3, 4, 5], [7], 0), sample([3, 4, 5], [8], 0), sample([6], [9], 1)]
    batch = collate(one, pad_id=0)
    model = tiny_qwen2()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        plain = micro_scores(model, batch, 1.0, torch.device("cpu")).logp
        shared = micro_scores(model, batch, 1.0, torch.device("cpu"), share_prompts=True).logp
    assert seen[1:] == [(2, 3)]  # the plain forward, then only the two unique prompts
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, full_forward(model, batch)[0], atol=1e-5, rtol=1e-5)
