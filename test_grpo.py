"""Tests for tiny_model.py and grpo.py (CPU): /work/venv/bin/python -m pytest -q test_grpo.py"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import grpo
import tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


def grpo_fake_pool(d, n_pairs=4, seed=0):
    """A tiny pool in the contract's layout: random-block images, 20 points per image, 14 verified matches."""
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    rows = []
    for i in range(n_pairs):
        for k in (1, 2):
            a = (rng.random((15, 20, 3)) * 255).astype(np.uint8)
            Image.fromarray(a).resize((640, 480), Image.NEAREST).save(os.path.join(d, f"p{i}_{k}.jpg"))
        kp1 = (rng.uniform(0.02, 0.98, (20, 2)) * [640, 480]).astype(np.float32)
        kp2 = (rng.uniform(0.02, 0.98, (20, 2)) * [640, 480]).astype(np.float32)
        match = np.full(20, -1, np.int32)
        perm = rng.permutation(20)
        match[:14] = perm[:14]
        np.savez(os.path.join(d, f"p{i}.npz"), kp1=kp1, kp2=kp2, match=match,
                 cluster=(np.arange(20) % 5).astype(np.int32), cluster2=(np.arange(20) % 5).astype(np.int32),
                 dense1=kp1[:14], dense2=kp2[perm[:14]])
        rows.append(dict(pair_id=f"p{i}", source="scannet", scene=f"s{i}", scene_type="indoor",
                         split="test" if i == n_pairs - 1 else "train", image1=f"p{i}_1.jpg", image2=f"p{i}_2.jpg",
                         width1=640, height1=480, width2=640, height2=480, K1=np.eye(3).tolist(),
                         K2=np.eye(3).tolist(), overlap=0.5, delta_v=0.5, bin=1 + i % 2, npz=f"p{i}.npz",
                         R=np.eye(3).tolist(), t=[0, 0, 0], n_matches=14, n_dist1=6, n_dist2=6))
    with open(os.path.join(d, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def grpo_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    tiny_model.main(["--out", str(d / "tiny")])
    grpo_fake_pool(str(d / "pool"))
    return d


def grpo_common(env, out, *extra):
    return ["--model", str(env / "tiny"), "--pool", str(env / "pool"), "--out", str(out), "--group-size", "4",
            "--prompts-per-step", "2", "--max-new-tokens", "12", "--eval-every", "0", *extra]


def grpo_read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def grpo_sample_batch(env, n_prompts=2, G=3, seed=0):
    """Real prompts from the pool + random completions, as train_on sees them."""
    model, tok, ip = grpo.load_policy(str(env / "tiny"))
    rng = np.random.default_rng(seed)
    pairs = [p for p in grpo.read_pairs(str(env / "pool")) if p["split"] == "train"]
    samples = []
    for k in range(n_prompts):
        task, images = grpo.task_for_pair(pairs[k], str(env / "pool"), "L1", "sparse", rng, 640)
        enc = grpo.encode(tok, ip, task["prompt"], images)
        for g in range(G):
            ids = rng.integers(20, len(tok), size=int(rng.integers(3, 9))).tolist()  # no special tokens
            samples.append(dict(enc=enc, token_ids=ids, logprobs=[0.0] * len(ids), reward=float(rng.random())))
    return model, tok, samples

# -----------------------------------------------------------------------------


def test_grpo_tiny_model_loads_and_tokenizes_answers_compactly(grpo_env):
    model, tok, ip = grpo.load_policy(str(grpo_env / "tiny"))
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    answer = "<answer>\n1: C\n2: none\n3: A\n</answer>"
    ids = tok(answer, add_special_tokens=False).input_ids
    assert tok.decode(ids) == answer and len(ids) <= 20  # vs 36 bytes
    img = Image.new("RGB", (640, 480))
    enc = grpo.encode(tok, ip, "Match the points.", [img, img])
    n_pad = int(enc["mm_token_type_ids"].sum())
    assert n_pad == int(enc["image_grid_thw"].prod(-1).sum()) // 4 and 0 < n_pad <= 2 * 64
    assert (enc["input_ids"][0] == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == n_pad


def grpo_ref_loss_fp64(logp, old, ref, adv, mask, beta, eps, n_tok):
    total = 0.0
    B, T = logp.shape
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            ratio = torch.exp(logp[b, t] - old[b, t])
            unclipped = ratio * adv[b]
            clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * adv[b]
            kl = torch.exp(ref[b, t] - logp[b, t]) - (ref[b, t] - logp[b, t]) - 1
            total = total + (-torch.minimum(unclipped, clipped) + beta * kl)
    return total / n_tok


def test_grpo_loss_and_gradient_match_fp64_reference():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 7
    logp0 = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios outside the clip too
    ref = logp0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    n_tok = 40.0
    x32 = logp0.float().requires_grad_()
    loss32, stats = grpo.grpo_loss(x32, old.float(), ref.float(), adv.float(), mask.float(), 0.05, 0.2, n_tok)
    loss32.backward()
    x64 = logp0.clone().requires_grad_()
    loss64 = grpo_ref_loss_fp64(x64, old, ref, adv, mask, 0.05, 0.2, n_tok)
    loss64.backward()
    assert abs(loss32.item() - loss64.item()) < 1e-5
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-6)
    assert stats["clip_sum"] > 0  # the test exercises the clipped branch
    # beta = 0 ignores the reference entirely
    l0, _ = grpo.grpo_loss(x32, old.float(), None, adv.float(), mask.float(), 0.0, 0.2, n_tok)
    assert abs(l0.item() - grpo_ref_loss_fp64(x64, old, ref, adv, mask, 0.0, 0.2, n_tok).item()) < 1e-5


def test_grpo_group_advantages():
    adv = grpo.group_advantages([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5], 4)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)  # population std = 0.5
    assert torch.equal(adv[4:], torch.zeros(4))  # zero-variance group -> zero advantage


def test_grpo_chunked_logprobs_equal_naive_full_softmax(grpo_env):
    model, tok, samples = grpo_sample_batch(grpo_env)
    b = grpo.collate_samples(samples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        chunked = grpo.completion_logprobs(model, b, 0.7, chunk=3)                               # (B, T)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                       mm_token_type_ids=b["mm_token_type_ids"]).logits                         # (B, L, V)
    full = torch.log_softmax(logits.double() / 0.7, -1)
    for r, s in enumerate(samples):
        P = s["enc"]["input_ids"].shape[1]
        naive = full[r, torch.arange(P - 1, P - 1 + len(s["token_ids"])), s["token_ids"]]
        assert torch.allclose(chunked[r, :len(s["token_ids"])].double(), naive, atol=1e-5)


def test_grpo_gradient_same_for_micro_batch_1_and_full_batch(grpo_env):
    grads = []
    for mb in (1, 6):
        model, tok, samples = grpo_sample_batch(grpo_env)
        ref_model = grpo.load_policy(str(grpo_env / "tiny"))[0]
        torch.manual_seed(0)
        with torch.no_grad():  # make the policy differ from the reference so the KL term has a gradient
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        args = argparse.Namespace(
            group_size=3, micro_batch=mb, pad_id=tok.pad_token_id, temperature=1.0, kl_beta=0.1, clip_eps=0.2,
            ppo_epochs=1, debug_grad_dump="x", max_grad_norm=0, pasta_weight=0)
        model.train()
        grpo.train_on(samples, model, ref_model, None, args, "cpu", 1, lambda: torch.autocast("cpu", enabled=False))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    scale = max(g.abs().max() for g in grads[1].values())
    assert scale > 1e-4
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6 * max(1.0, float(scale))), n


def test_grpo_gradient_same_for_1_process_and_torchrun_2(grpo_env, tmp_path):
    extra = ["--toy-reward", "--kl-beta", "0.1", "--steps", "1"]
    one, two = tmp_path / "g1.pt", tmp_path / "g2.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(HERE, "grpo.py"),
                    *grpo_common(grpo_env, tmp_path / "a", *extra, "--micro-batch", "1", "--debug-grad-dump", str(one))],
                   check=True, cwd=HERE, env=env, capture_output=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun, "--nproc_per_node=2", os.path.join(HERE, "grpo.py"),
                    *grpo_common(grpo_env, tmp_path / "b", *extra, "--micro-batch", "8", "--debug-grad-dump", str(two))],
                   check=True, cwd=HERE, env=env, capture_output=True)
    g1, g2 = torch.load(one), torch.load(two)
    assert g1.keys() == g2.keys()
    scale = max(g.abs().max().item() for g in g1.values() if g is not None)
    assert scale > 1e-4  # the toy reward gives non-zero advantages
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n


def test_grpo_learns_toy_reward(grpo_env, tmp_path):
    grpo.main(grpo_common(grpo_env, tmp_path, "--toy-reward", "--steps", "30", "--lr", "1e-2", "--warmup-steps", "1",
                          "--save-every", "100", "--kl-beta", "0"))
    rewards = [m["reward"] for m in grpo_read(tmp_path / "metrics.jsonl")]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.2 and last > 2 * first, (first, last)


def test_grpo_demo_run_kl0_dlogp_checkpoint_and_resume(grpo_env, tmp_path):
    """Uninterrupted run vs a run killed hard after step 3 (checkpoint at step 2) and resumed: identical rollouts,
    metrics and curriculum state; a half-written temp dir and a step dir without meta.json are ignored."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--steps", "6", "--save-every", "2", "--keep-last", "2"]
    grpo.main(grpo_common(grpo_env, a, *flags))
    ma = grpo_read(a / "metrics.jsonl")
    assert [m["step"] for m in ma] == [1, 2, 3, 4, 5, 6]
    assert ma[0]["kl"] == 0.0  # policy == reference before the first update
    assert all(m["dlogp"] < 1e-5 for m in ma)  # sampler and trainer agree (CPU fp32)
    assert sorted(os.listdir(a)) == ["args.json", "metrics.jsonl", "rollouts.jsonl", "step_000004", "step_000006"]
    assert grpo.latest_checkpoint(str(a)) == str(a / "step_000006")
    loaded = grpo.load_policy(str(a / "step_000006"))[0]  # from_pretrained of a checkpoint
    assert loaded.config.model_type == "qwen3_vl"

    r = subprocess.run([sys.executable, os.path.join(HERE, "grpo.py"), *grpo_common(grpo_env, b, *flags),
                        "--stop-after-step", "3"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 17, r.stderr[-2000:]
    assert len(grpo_read(b / "metrics.jsonl")) == 3 and grpo.latest_checkpoint(str(b)) == str(b / "step_000002")
    os.makedirs(b / "step_000004.tmp")  # a crash while writing step 4 ...
    (b / "step_000004.tmp" / "model.safetensors").write_bytes(b"garbage")
    os.makedirs(b / "step_000005")      # ... and a step dir that never got its meta.json
    assert grpo.latest_checkpoint(str(b)) == str(b / "step_000002")
    grpo.main(grpo_common(grpo_env, b, *flags, "--resume"))
    mb = grpo_read(b / "metrics.jsonl")
    drop = ("seconds",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in ma] == \
           [{k: v for k, v in m.items() if k not in drop} for m in mb]
    assert grpo_read(a / "rollouts.jsonl") == grpo_read(b / "rollouts.jsonl")
    assert json.load(open(a / "step_000006" / "curriculum.json")) == json.load(open(b / "step_000006" / "curriculum.json"))
    assert json.load(open(a / "step_000006" / "curriculum.json"))["steps"] == 6  # one update per step, not per prompt
    assert all(m["curriculum_events"] == [] for m in ma)
