"""Tests: the released training recipe (grpo.py --recipe released: GSPO, clip-higher, dual clip, low_var_kl, entropy
bonus, seq-mean-token-mean, overlong penalty, unbiased std; widematch/recipes.py), the pool in the release's LMDB
training format (widematch/release_lmdb.py, read back by a reader written here from the format), and two reader
conventions of build_pool.py. Every expected value is worked out by hand in the comment.
The fixtures grpo_env (tiny model + fake pool) come from test_all.py, which imports this module."""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import grpo
from widematch import model_io, recipes

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_of(logp, old, adv, mask, **kw):
    """grpo_loss with no reference, beta 0, the global counts of this one micro-batch unless given."""
    kw.setdefault("num_seqs", float((mask.sum(1) > 0).sum()))
    n_tok = kw.pop("num_tokens", float(mask.sum()))
    return grpo.grpo_loss(logp, old, None, adv, mask, 0.0, 0.2, n_tok, **kw)

# -----------------------------------------------------------------------------
# grpo_loss on hand-made tensors


def test_recipe_gspo_ratio_one_is_the_seq_mean_token_mean_of_the_advantage():
    # two completions of 2 and 4 tokens (padded to 4), A = (1, -2), old = logp: every ratio is 1.
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    logp = torch.tensor([[-1.0, -2, 0, 0], [-0.5, -1, -1.5, -2]], requires_grad=True)
    loss, st = loss_of(logp, logp.detach(), torch.tensor([1.0, -2.0]), mask, loss_mode="gspo")
    # each completion's token mean of -A is -A: (-1 + 2) / 2 completions = 0.5
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # d/dlogp = -A / (len x num_seqs): -1 / (2 x 2) on the first, 2 / (4 x 2) on the second; 0 on padding
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25, 0, 0], [0.25, 0.25, 0.25, 0.25]]))
    assert st["seq_clip_sum"] == 0


def test_recipe_gspo_sequence_ratio_is_exp_of_the_mean_token_log_ratio():
    # token log-ratios 0.1 and 0.3 -> mean 0.2 -> s = e^0.2 = 1.2214 (inside [0.8, 1.28]); A = 1
    mask = torch.ones(1, 2)
    old = torch.tensor([[-1.0, -2.0]])
    logp = (old + torch.tensor([[0.1, 0.3]])).requires_grad_()
    loss, _ = loss_of(logp, old, torch.tensor([1.0]), mask, loss_mode="gspo", clip_ratio_high=0.28)
    assert loss.item() == pytest.approx(-math.exp(0.2), rel=1e-6)
    loss.backward()  # the stop-gradient form: every token gets -s / len, not its own ratio
    assert torch.allclose(logp.grad, torch.full((1, 2), -math.exp(0.2) / 2))
    # vanilla on the same tensors: each token its own ratio, e^0.3 = 1.35 clipped to 1.28: -(e^0.1 + 1.28) / 2
    loss_v, _ = loss_of(logp, old, torch.tensor([1.0]), mask, clip_ratio_high=0.28)
    assert loss_v.item() == pytest.approx(-(math.exp(0.1) + 1.28) / 2, rel=1e-6)


@pytest.mark.parametrize("mode", ["vanilla", "gspo"])
def test_recipe_clip_higher_clips_at_1_28_not_1_2_for_a_positive_advantage(mode):
    mask = torch.ones(1, 1)
    old = torch.zeros(1, 1)
    for r, high, expected, has_grad in [(1.25, 0.28, -1.25, True),   # inside 1.28: not clipped
                                        (1.25, 0.2, -1.2, False),    # the paper's 1.2 would clip it
                                        (1.35, 0.28, -1.28, False)]:  # past 1.28: clipped, no gradient
        logp = torch.full((1, 1), math.log(r), requires_grad=True)
        loss, st = loss_of(logp, old, torch.tensor([1.0]), mask, loss_mode=mode, clip_ratio_low=0.2,
                           clip_ratio_high=high)
        loss.backward()
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert (logp.grad.abs().item() > 0) == has_grad
        assert st["clip_sum"] == (0 if has_grad else 1)
    # the low side stays at 0.8 for a negative advantage: ratio 0.7, A = -1 -> -min(-0.7, -0.8) = 0.8
    logp = torch.full((1, 1), math.log(0.7))
    assert loss_of(logp, old, torch.tensor([-1.0]), mask, loss_mode=mode, clip_ratio_low=0.2,
                   clip_ratio_high=0.28)[0].item() == pytest.approx(0.8, rel=1e-6)


def test_recipe_dual_clip_bounds_a_negative_advantage_at_c():
    # ratio 20, A = -1: the clipped PPO term is -min(-20, -1.2) = 20; the dual clip caps it at c x |A| = 10
    mask, old = torch.ones(1, 1), torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(20.0), requires_grad=True)
    loss, _ = loss_of(logp, old, torch.tensor([-1.0]), mask, clip_ratio_c=10.0)
    assert loss.item() == pytest.approx(10.0)
    loss.backward()
    assert logp.grad.item() == 0  # the bound is a constant
    assert loss_of(logp, old, torch.tensor([-1.0]), mask)[0].item() == pytest.approx(20.0, rel=1e-6)  # c off
    # a positive advantage is untouched by c: ratio 20, A = 1 -> -min(20, 1.2) = -1.2
    assert loss_of(logp, old, torch.tensor([1.0]), mask, clip_ratio_c=10.0)[0].item() == pytest.approx(-1.2)
    # below c nothing changes: ratio 5, A = -1 -> 5
    logp5 = torch.full((1, 1), math.log(5.0))
    assert loss_of(logp5, old, torch.tensor([-1.0]), mask, clip_ratio_c=10.0)[0].item() == pytest.approx(5.0)


def test_recipe_low_var_kl_is_clamped_k3_is_not():
    mask = torch.ones(1, 3)
    logp = torch.zeros(1, 3)
    ref = torch.tensor([[0.5, 25.0, -30.0]])  # ref - logp = 0.5, 25, -30

    def kl(kind):  # beta 1, A 0: the loss is the token mean of the KL estimate
        return grpo.grpo_loss(logp, logp, ref, torch.zeros(1), mask, 1.0, 0.2, 3.0, kl_loss_type=kind)[0].item()
    small = math.exp(0.5) - 1.5                                    # 0.1487, equal in both
    # low_var_kl: 25 -> clamp 20 -> e^20 - 21 -> clamp 10; -30 -> clamp -20 -> e^-20 + 19 -> clamp 10
    assert kl("low_var_kl") == pytest.approx((small + 10 + 10) / 3, rel=1e-6)
    # k3: e^25 - 26 and e^-30 + 29, unclamped
    assert kl("k3") == pytest.approx((small + math.exp(25) - 26 + math.exp(-30) + 29) / 3, rel=1e-5)


def test_recipe_kl_and_entropy_aggregated_seq_mean_token_mean():
    # KL k = e^d - d - 1 = 1 - ln 2 (d = ln 2) on a 1-token completion, 0 on a 3-token one:
    # token-mean k / 4 tokens, seq-mean-token-mean (k + 0) / 2 completions
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    logp = torch.zeros(2, 3)
    d = math.log(2.0)
    ref = torch.tensor([[d, 0, 0], [0, 0, 0.0]])
    k = 2 - d - 1
    args = (logp, logp, ref, torch.zeros(2), mask, 1.0, 0.2, 4.0)
    assert grpo.grpo_loss(*args)[0].item() == pytest.approx(k / 4, rel=1e-6)
    assert grpo.grpo_loss(*args, loss_agg_mode="seq-mean-token-mean", num_seqs=2.0)[0].item() == \
        pytest.approx(k / 2, rel=1e-6)
    # the entropy bonus: entropy (2, 3) -> each completion's token mean (0.6, (0.3 + 0.6 + 0.9) / 3 = 0.6) ->
    # mean 0.6 -> loss - 0.01 x 0.6
    ent = torch.tensor([[0.6, 5.0, 5.0], [0.3, 0.6, 0.9]])
    base = grpo.grpo_loss(*args, loss_agg_mode="seq-mean-token-mean", num_seqs=2.0)[0].item()
    loss, st = grpo.grpo_loss(*args, loss_agg_mode="seq-mean-token-mean", num_seqs=2.0, entropy=ent,
                              entropy_coeff=0.01)
    assert st["entropy_agg"] == pytest.approx(0.6) and loss.item() == pytest.approx(base - 0.006, rel=1e-6)


def test_recipe_overlong_penalty_on_hand_made_lengths():
    # max 6144, buffer 4096: no penalty up to 2048 tokens, then linear to -1 at 6144
    pen = [recipes.overlong_penalty(n, 6144, 4096, 1.0) for n in (1000, 2048, 4096, 6144, 7168)]
    assert pen == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.25])  # 2048 past: -0.5; 5120 past 2048: -1.25
    assert recipes.overlong_penalty(4096, 6144, 4096, 0.5) == pytest.approx(-0.25)  # the factor scales it
    assert recipes.overlong_penalty(6144, 6144, 0, 1.0) == 0.0  # buffer 0: off


def test_recipe_unbiased_advantage_std():
    # [1, 0, 1, 0]: mean 0.5, sample std sqrt(4 x 0.25 / 3) = 0.57735 -> +-0.5 / (0.57735 + 1e-6) = +-0.86603
    adv = grpo.group_advantages([1.0, 0.0, 1.0, 0.0], 4, std="unbiased")
    assert torch.allclose(adv, torch.tensor([0.866025, -0.866025, 0.866025, -0.866025]), atol=1e-5)
    assert torch.equal(grpo.group_advantages([0.3] * 4, 4, std="unbiased"), torch.zeros(4))

# -----------------------------------------------------------------------------
# presets


def test_recipe_presets_resolve_and_explicit_flags_win():
    paper = vars(grpo.parse_args([]))
    assert paper["recipe"] == "paper" and paper["loss_mode"] == "vanilla" and paper["reward"] == "paper"
    assert paper["clip_ratio_low"] == paper["clip_ratio_high"] == 0.2 and paper["max_new_tokens"] == 5120
    assert grpo.parse_args(["--clip-eps", "0.3"]).clip_ratio_high == 0.3  # the paper's clip follows --clip-eps
    rel = vars(grpo.parse_args(["--recipe", "released"]))
    expected = dict(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28,
                    clip_ratio_c=10.0, entropy_coeff=1e-3, kl_beta=0.005, kl_loss_type="low_var_kl",
                    advantage_std="unbiased", lr=1e-6, warmup_steps=10, weight_decay=0.1, max_grad_norm=1.0,
                    max_new_tokens=6144, overlong_buffer=4096, overlong_penalty_factor=1.0, max_visual_tokens=1500,
                    ppo_mini_batches=1, reward="released", group_size=32, prompts_per_step=16)
    assert {k: rel[k] for k in expected} == expected
    over = grpo.parse_args(["--recipe", "released", "--entropy-coeff", "0", "--max-new-tokens", "64",
                            "--overlong-buffer", "16", "--reward", "paper"])
    assert (over.entropy_coeff, over.max_new_tokens, over.overlong_buffer, over.reward) == (0, 64, 16, "paper")
    assert over.loss_mode == "gspo"  # the rest of the preset stays
    # docs/grpo.md (the full usage text the card points to) and --help show the one table
    with open(os.path.join(HERE, "docs", "grpo.md")) as f:
        assert recipes.table() in f.read()
    assert recipes.table() in grpo.build_parser().format_help()

# -----------------------------------------------------------------------------
# on the tiny model (grpo_env: test_all.py's tiny Qwen3-VL + fake pool)


def recipe_batch(env, n_prompts=2, G=3, seed=0):
    """Real prompts from the pool + random completions of 3..8 tokens (no special tokens), as train_on sees them:
    test_all.grpo_sample_batch, the one helper both sections use."""
    import test_all
    return test_all.grpo_sample_batch(env, n_prompts, G, seed)


def test_recipe_entropy_bonus_equals_full_softmax_entropy_with_its_gradient(grpo_env):
    model, tok, samples = recipe_batch(grpo_env)
    b = grpo.collate_samples(samples, tok.pad_token_id, "cpu")
    mask = b["mask"]
    # chunked (chunk 3 < T: several chunks, each recomputed in backward)
    _, ent = grpo.completion_logprobs(model, b, 0.7, chunk=3, entropy=True, entropy_grad=True)      # (B, T)
    seq = ((ent * mask).sum(1) / mask.sum(1)).mean()
    seq.backward()
    g_chunked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                   image_grid_thw=b["image_grid_thw"], mm_token_type_ids=b["mm_token_type_ids"]).logits   # (B, L, V)
    full = torch.log_softmax(logits.double() / 0.7, -1)
    rows = []
    for r, s in enumerate(samples):  # -sum p log p at the positions that predict the completion tokens
        P = s["enc"]["input_ids"].shape[1]
        lp = full[r, P - 1:P - 1 + len(s["token_ids"])]                                             # (n, V)
        rows.append(-(lp.exp() * lp).sum(-1).mean())
    direct = torch.stack(rows).mean()
    assert seq.item() == pytest.approx(direct.item(), rel=1e-5) and direct.item() > 0.1
    direct.backward()
    assert g_chunked.keys() and len(g_chunked) > 10
    for n, g in g_chunked.items():
        ref = dict(model.named_parameters())[n].grad.float()
        assert torch.allclose(g, ref, atol=1e-6 + 1e-4 * float(ref.abs().max())), n
    # and detached when the bonus is off
    assert not grpo.completion_logprobs(model, b, 0.7, chunk=3, entropy=True)[1].requires_grad


RELEASED_LOSS = dict(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28,
                     clip_ratio_c=10.0, entropy_coeff=0.01, kl_loss_type="low_var_kl", advantage_std="unbiased")


def recipe_train_args(tok, mb, **kw):
    base = dict(group_size=3, micro_batch=mb, pad_id=tok.pad_token_id, temperature=1.0, kl_beta=0.1, clip_eps=0.2,
                ppo_epochs=1, debug_grad_dump="x", max_grad_norm=0, pasta_weight=0, tis_cap=0, **RELEASED_LOSS)
    return argparse.Namespace(**{**base, **kw})


def test_recipe_seq_mean_token_mean_gradient_same_for_micro_batch_1_and_2(grpo_env):
    """The released loss (GSPO, seq-mean-token-mean, entropy bonus, low_var_kl) on 6 completions of 3..8 tokens: one
    micro-batch per completion or 2 micro-batches of 3, the same gradient (each micro-batch is normalised by the
    global completion count, not its own)."""
    grads = []
    for mb in (1, 3):
        model, tok, samples = recipe_batch(grpo_env)
        ref_model = model_io.load_policy(str(grpo_env / "tiny"))[0]
        torch.manual_seed(0)
        with torch.no_grad():  # the policy differs from the reference: the KL term has a gradient
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.train()
        grpo.train_on(samples, model, ref_model, None, recipe_train_args(tok, mb), "cpu", 1,
                      lambda: torch.autocast("cpu", enabled=False))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    scale = max(float(g.abs().max()) for g in grads[1].values())
    assert scale > 1e-4
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6 * max(1.0, scale)), n


def test_recipe_ppo_mini_batches_two_optimizer_steps_second_off_policy(grpo_env):
    """--ppo-mini-batches 2 on 2 groups: one AdamW step per group; the second group's old log-probs are the
    sampling policy's (taken before the first step), so its ratios move away from 1 and the clip can act."""
    model, tok, samples = recipe_batch(grpo_env)
    opt = torch.optim.SGD(model.parameters(), lr=50.0)  # a large step: the second group's ratio visibly != 1
    steps = []
    opt_step = opt.step
    opt.step = lambda: (steps.append(1), opt_step())[1]
    args = recipe_train_args(tok, 3, ppo_mini_batches=2, debug_grad_dump=None, kl_beta=0.0)
    model.train()
    stats, n_tok = grpo.train_on(samples, model, None, opt, args, "cpu", 1,
                                 lambda: torch.autocast("cpu", enabled=False))
    assert len(steps) == 2
    assert n_tok == sum(len(s["token_ids"]) for s in samples)
    # group 1 is on-policy (ratio 1: no clip); group 2 after a step: some of its 3 sequence ratios left [0.8, 1.28]
    assert 1 <= stats["seq_clip_sum"] <= 3 and stats["n_seqs"] == 6


def recipe_flags(env, out, *extra):
    """The tiny model's CPU recipe under --recipe released: 12 new tokens (so an 8-token overlong buffer, else past
    the 4,096 of the preset), the tiny model's own 48 visual tokens (the preset's 1,500 would only slow it down)."""
    return ["--model", str(env / "tiny"), "--pool", str(env / "pool"), "--out", str(out), "--recipe", "released",
            "--group-size", "4", "--prompts-per-step", "2", "--micro-batch", "8", "--max-new-tokens", "12",
            "--overlong-buffer", "8", "--max-visual-tokens", "48", "--lr", "1e-3", "--max-side", "640", "--n-min", "3",
            "--n-max", "5", "--eval-every", "0", "--no-grad-checkpointing", *extra]


def test_recipe_released_gradient_same_for_1_process_and_torchrun_2(grpo_env, tmp_path):
    """seq-mean-token-mean (and the rest of the released loss): 1 process with micro-batch 1 vs torchrun 2 ranks
    (FSDP2 over gloo) with micro-batch 8, the same global batch (--debug-grad-dump) -> the same gradient."""
    one, two = tmp_path / "g1.pt", tmp_path / "g2.pt"
    extra = ["--toy-reward", "--kl-beta", "0.1", "--steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    import test_all
    torchrun = test_all.torchrun_cmd()
    for launch, out, mb, dump in (([sys.executable], "a", "1", one), (torchrun, "b", "8", two)):
        test_all.torchrun_grad_dump([*launch, os.path.join(HERE, "grpo.py"),
                                     *recipe_flags(grpo_env, tmp_path / out, *extra, "--micro-batch", mb,
                                                   "--debug-grad-dump", str(dump))], tmp_path / out, cwd=HERE, env=env)
    g1, g2 = torch.load(one), torch.load(two)
    assert g1.keys() == g2.keys()
    scale = max(g.abs().max().item() for g in g1.values() if g is not None)
    assert scale > 1e-4
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n


def test_recipe_released_tiny_run_records_every_resolved_value(grpo_env, tmp_path):
    """A 2-step run with --recipe released (the released reward, GSPO, 2 PPO mini-batches: the second off-policy):
    args.json holds every preset value, resolved; the metrics carry the sequence clip fraction, the entropy bonus and
    the overlong penalty's share and mean; each completion's penalty follows the rule."""
    out = tmp_path / "rel"
    r = subprocess.run([sys.executable, os.path.join(HERE, "grpo.py"),
                        *recipe_flags(grpo_env, out, "--steps", "2", "--save-every", "2", "--ppo-mini-batches", "2")],
                       cwd=HERE, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((out / "args.json").read_text())
    expected = {**recipes.preset("released"), "max_new_tokens": 12, "overlong_buffer": 8, "max_visual_tokens": 48,
                "lr": 1e-3, "ppo_mini_batches": 2}
    assert {k: saved[k] for k in recipes.RECIPES} == expected and saved["recipe"] == "released"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    for row in rows:  # 12 new tokens, buffer 8: a completion of n > 4 tokens loses (n - 4) / 8
        assert row["overlong"] == pytest.approx(min(0.0, -(row["length"] - 4) / 8))
    for m in metrics:
        mine = [row for row in rows if row["step"] == m["step"]]
        assert m["overlong_frac"] == pytest.approx(np.mean([row["overlong"] < 0 for row in mine]))
        assert m["overlong_penalty"] == pytest.approx(np.mean([row["overlong"] for row in mine]))
        assert 0 <= m["seq_clip_frac"] <= 1 and m["entropy_bonus"] == pytest.approx(1e-3 * m["entropy"], rel=0.5)
    assert (out / "step_000002" / "meta.json").is_file()

# -----------------------------------------------------------------------------
# the pool in the release's training format (export_bench.py --format reasonmatch-lmdb)


def lmdb_pool(d):
    """A 4-pair pool: p0 and p1 same-size pairs (p1 also with dense matches, one repeating a well-spread match),
    p2 of two image sizes (64x48 and 32x32: resized), p3 without any verified match (skipped), and a test pair."""
    import cv2
    rng = np.random.default_rng(3)
    rows = []
    sizes = [((64, 48), (64, 48)), ((64, 48), (64, 48)), ((64, 48), (32, 32)), ((64, 48), (64, 48)),
             ((64, 48), (64, 48))]
    for i, (s1, s2) in enumerate(sizes):
        for k, (w, h) in ((1, s1), (2, s2)):
            y, x = np.mgrid[0:h, 0:w]  # smooth (resampling changes little) and different per image
            img = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, rng.integers(0, 255))], -1)
            cv2.imwrite(str(d / f"p{i}_{k}.jpg"), img.astype(np.uint8))
        kp1 = np.array([[3.25, 4.5], [10.0, 20.0], [50.5, 40.0], [7.0, 7.0]], np.float32)
        kp2 = np.array([[1.0, 2.0], [5.5, 6.25], [20.0, 30.0], [2.0, 3.0]], np.float32)
        match = np.array([2, 0, -1, -1] if i != 3 else [-1, -1, -1, -1], np.int32)  # kp1[0]<->kp2[2], kp1[1]<->kp2[0]
        dense1 = np.array([[3.25, 4.5], [30.0, 31.0]], np.float32) if i == 1 else np.zeros((0, 2), np.float32)
        dense2 = np.array([[20.0, 30.0], [8.0, 9.0]], np.float32) if i == 1 else np.zeros((0, 2), np.float32)
        np.savez(d / f"p{i}.npz", kp1=kp1, kp2=kp2, match=match, dense1=dense1, dense2=dense2)
        rows.append(dict(pair_id=f"src/s{i}/a-b", source="src", scene=f"s{i}", split="test" if i == 4 else "train",
                         image1=f"p{i}_1.jpg", image2=f"p{i}_2.jpg", width1=s1[0], height1=s1[1], width2=s2[0],
                         height2=s2[1], overlap=0.1 * (i + 1), delta_v=1 - 0.1 * (i + 1), bin=i + 1, npz=f"p{i}.npz"))
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_recipe_lmdb_export_read_back_by_the_format(tmp_path, capsys):
    import pickle

    import cv2
    import lmdb  # requirements.txt
    import export_bench
    pool = tmp_path / "pool"
    pool.mkdir()
    rows = lmdb_pool(pool)
    out = tmp_path / "train_lmdb"
    export_bench.main(["--pool", str(pool), "--split", "train", "--format", "reasonmatch-lmdb", "--out", str(out)])
    said = capsys.readouterr().out
    assert "3 train pairs" in said and "1 pair(s) of two image sizes: image 2 resized" in said
    assert "1 pair(s) without a verified match skipped" in said
    # the manifest MultiRawDataset takes: a JSON list of LMDB folders
    assert json.loads((tmp_path / "train_lmdb.json").read_text()) == [str(out.resolve())]
    # the reader, from the format: keys %08d -> pickled dict, __meta__ -> {"num_samples": N}; images via imdecode
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        assert pickle.loads(txn.get(b"__meta__")) == {"num_samples": 3}
        got = [pickle.loads(txn.get(f"{i:08d}".encode())) for i in range(3)]
        assert txn.get(b"00000003") is None
    env.close()

    def decode(b):
        return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    # p0: the two well-spread matches in match order; p1: + the dense match that is not a repeat
    want = {0: [(3.25, 4.5, 20.0, 30.0), (10.0, 20.0, 1.0, 2.0)],
            1: [(3.25, 4.5, 20.0, 30.0), (10.0, 20.0, 1.0, 2.0), (30.0, 31.0, 8.0, 9.0)],
            # p2: image 2 32x32 -> 64x48, x' = (x + 0.5) x 2 - 0.5, y' = (y + 0.5) x 1.5 - 0.5
            2: [(3.25, 4.5, 40.5, 45.25), (10.0, 20.0, 2.5, 3.25)]}
    for i, s in enumerate(got):
        row = rows[i]
        assert s["meta"]["pair_id"] == row["pair_id"] and s["meta"]["bin"] == row["bin"]
        assert s["meta"]["source"] == "src" and s["meta"]["scene"] == row["scene"]
        assert s["meta"]["delta_v"] == pytest.approx(row["delta_v"]) and s["overlap"] == pytest.approx(row["overlap"])
        m = [(d["x1"], d["y1"], d["x2"], d["y2"]) for d in s["matches"]]
        assert np.abs(np.array(m) - np.array(want[i])).max() <= 0.5
        a, b = decode(s["image1"]), decode(s["image2"])
        assert a.shape == b.shape == (48, 64, 3)  # the release asserts equal sizes
        assert s["image1"] == (pool / row["image1"]).read_bytes()  # the pool's files, unchanged
        if i < 2:
            assert s["image2"] == (pool / row["image2"]).read_bytes()
        else:  # resized: close to the original stretched to image 1's size
            ref = cv2.resize(cv2.imread(str(pool / row["image2"])), (64, 48), interpolation=cv2.INTER_LINEAR)
            assert s["meta"]["size2"] == [32, 32]
            assert np.abs(b.astype(float) - ref).mean() < 4  # JPEG and resampler differences only
    # a second export replaces the first; a folder that is not an export is refused
    export_bench.main(["--pool", str(pool), "--format", "reasonmatch-lmdb", "--out", str(out)])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="not an LMDB export"):
        export_bench.main(["--pool", str(pool), "--format", "reasonmatch-lmdb", "--out", str(tmp_path / "other")])

# -----------------------------------------------------------------------------
# two reader conventions of build_pool.py, checked against the datasets' own loaders


def test_recipe_re10k_principal_point_from_the_image_corner():
    import build_pool
    # RE10K's normalised cx = cy = 0.5 is the image centre; with pixel centres at integers (OpenCV) a 640 x 360
    # image spans [-0.5, 639.5] x [-0.5, 359.5], so its centre is (319.5, 179.5), not (320, 180)
    K = build_pool.re10k_intrinsics((0.8, 1.2, 0.5, 0.5), 640, 360)
    assert np.allclose(K, [[512, 0, 319.5], [0, 432, 179.5], [0, 0, 1]])
    # cx = 0 is the left edge of the first pixel: half a pixel left of its centre
    assert build_pool.re10k_intrinsics((1, 1, 0.0, 0.0), 640, 360)[:2, 2].tolist() == [-0.5, -0.5]


def test_recipe_uco3d_frame_of_another_size_is_an_error_not_a_resize(tmp_path):
    import cv2

    import build_pool
    video = str(tmp_path / "rgb_video.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for k in range(5):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()
    frame = build_pool.read_video_frame(video, 0.2, (64, 48))  # the annotation's size: read as it is
    assert frame.shape == (48, 64, 3)
    with pytest.raises(build_pool.BadInput, match=r"rgb_video.avi: frame at 0.2 s decodes to 64x48, the "
                                                  r"annotation's _image_size is 80x60") as e:
        build_pool.read_video_frame(video, 0.2, (80, 60))
    assert e.value.reason == "frame size mismatch"  # counted per reason, the frame skipped
