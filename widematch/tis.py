"""Truncated importance sampling (grpo.py --tis-cap, --tis-level): the sampler (vLLM, bf16) does not sample from
exactly the trainer's distribution, so the policy term of each token is reweighted by trainer / sampler
probability, capped. Token level: each token's own ratio; sequence level (as TRL's and veRL's sequence modes):
the geometric mean of a completion's ratios, i.e. exp of its mean log-ratio over its tokens, the same weight on
every token of it."""
import torch

LEVELS = ("token", "sequence")


def tis_weights(trainer_logp, sampler_logp, mask, cap, level="token"):
    """trainer_logp, sampler_logp, mask: (B, T) -> (B, T) weights min(ratio, cap), 0 where mask is 0."""
    if level not in LEVELS:
        raise ValueError(f"tis level {level!r}: expected one of {LEVELS}")
    log_ratio = (trainer_logp.float() - sampler_logp.float()) * mask                                     # (B, T)
    if level == "sequence":
        per_seq = log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)               # (B, 1)
        log_ratio = per_seq.expand_as(log_ratio)
    return torch.exp(log_ratio).clamp(max=cap) * mask
