"""The two training recipes of grpo.py (--recipe paper|released) and the released run's overlong penalty.

paper: what the paper's text describes (plain GRPO: token-level clipped ratio, k3 KL at 0.005, lr 1e-6).
released: the values of the authors' launch script (my_recipe/run_dcrl_anno.sh in github aim-uofa/ReasonMatch, on
its vendored veRL 0.6): GSPO's sequence-level ratio, clip-higher, an entropy bonus, veRL's clamped low_var_kl, weight
decay, 6,144 new tokens with DAPO's overlong penalty, images capped at 1,500 visual tokens, the released reward.
The batch shape stays the paper's (16 prompts x 32): the release's README calls its checked-in batch sizes smoke-test
settings; its ppo_mini_batch_size (1 of 2 prompts) comes from those, so --ppo-mini-batches stays 1. Pure logic: no
torch, no I/O.
"""

# flag dest -> (paper, released); a flag given on the command line wins over its preset value
RECIPES = {
    "loss_mode": ("vanilla", "gspo"),
    "loss_agg_mode": ("token-mean", "seq-mean-token-mean"),
    "clip_ratio_low": (None, 0.2),     # None: --clip-eps (the paper's symmetric clip)
    "clip_ratio_high": (None, 0.28),
    "clip_ratio_c": (0.0, 10.0),
    "entropy_coeff": (0.0, 1e-3),
    "kl_beta": (0.005, 0.005),
    "kl_loss_type": ("k3", "low_var_kl"),
    "advantage_std": ("population", "unbiased"),
    "lr": (1e-6, 1e-6),
    "warmup_steps": (10, 10),
    "weight_decay": (0.0, 0.1),
    "max_grad_norm": (1.0, 1.0),
    "max_new_tokens": (5120, 6144),
    "overlong_buffer": (0, 4096),
    "overlong_penalty_factor": (1.0, 1.0),
    "max_visual_tokens": (0, 1500),
    "ppo_mini_batches": (1, 1),
    "reward": ("paper", "released"),
}
NAMES = ("paper", "released")


def preset(name):
    """-> {dest: value} of one recipe."""
    k = NAMES.index(name)
    return {dest: pair[k] for dest, pair in RECIPES.items()}


def table():
    """The two presets side by side, one flag a line (the usage card and --help print it)."""
    rows = [(f"--{dest.replace('_', '-')}", "--clip-eps" if p is None else str(p), str(r))
            for dest, (p, r) in RECIPES.items()]
    w = max(len(f) for f, _, _ in rows)
    v = max(len(p) for _, p, _ in rows)
    head = f"    {'flag'.ljust(w)}  {'paper'.ljust(v)}  released"
    return "\n".join([head] + [f"    {f.ljust(w)}  {p.ljust(v)}  {r}" for f, p, r in rows])


def resolve(args, explicit):
    """Fills every preset flag of args.recipe that is not in `explicit` (the dests given on the command line).
    -> args (also changed in place), so vars(args) records the resolved values."""
    for dest, value in preset(args.recipe).items():
        if dest not in explicit:
            setattr(args, dest, value)
    for dest in ("clip_ratio_low", "clip_ratio_high"):
        if getattr(args, dest) is None:
            setattr(args, dest, args.clip_eps)
    return args


def overlong_penalty(length, max_new_tokens, buffer, factor):
    """DAPO's soft overlong punishment, as the release's reward manager adds it to the score: 0 up to
    max_new_tokens - buffer tokens, then falling linearly to -factor at max_new_tokens (and beyond). buffer 0: off."""
    if buffer <= 0:
        return 0.0
    exceed = length - (max_new_tokens - buffer)
    return min(-exceed / buffer * factor, 0.0)
