"""The per-token cross-entropy: the one definition of a token's loss, in nats.

Why this module exists: the losses stage scores every corpus token and the gradients
stage differentiates one token's loss at a time; both must mean the same number by "the
loss of a token", to the last bit, or a sample's gradient would belong to a slightly
different loss from the one it was selected by. Both call :func:`cross_entropy` on the
logits of the positions they score. It is a module of its own (torch only) so that the
gradients stage does not import the losses stage to get it.
"""

from __future__ import annotations

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits) - logits[target]`` per row: -log p(target), in nats.

    logits: (n, vocab), fp32 (the caller upcasts and applies any logit transform);
    targets: (n,) token ids. Returns (n,) in the logits' dtype. Differentiable; no
    (n, vocab) log-softmax is written out, only the logsumexp's temporaries.
    """
    target_logit = logits.gather(1, targets[:, None])[:, 0]  # (n,)
    return torch.logsumexp(logits, dim=-1) - target_logit
