"""Per-token log-probabilities of given tokens under a causal LM's logits."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens], without materialising the full log-softmax.

    logits: [B, T, V] (float); tokens: [B, T] int. Returns [B, T] float32. The temperature must be the
    sampler's, so that these match the generator's logprobs of the tokens it sampled.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H_t = -sum_v p_v log p_v of softmax(logits / temperature) at each position: [B, T, V] -> [B, T].

    Uses H = logsumexp(z) - sum_v p_v z_v on z shifted so that its max is 0: both terms are then small
    (in [0, log V] and <= 0), so there is no cancellation for large logits, and no log-softmax tensor is
    built. Temporaries of size [B, T, V]: the shifted float z and p; the sum is a batched dot product.
    Logits of -inf (masked vocabulary) count as probability 0.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    z = z - z.amax(dim=-1, keepdim=True)  # a new tensor: the caller's logits are untouched
    z.clamp_(min=torch.finfo(z.dtype).min)  # -inf -> finite, so that p * z is 0 * finite, not 0 * inf = nan
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - torch.einsum("...v,...v->...", p, z)
