"""Smoke tests for bench.py (CPU, < 30 s): the equivalence checks on tiny shapes, no timing thresholds.
    /work/venv/bin/python -m pytest -q test_bench.py"""
import numpy as np
import pytest
import torch

import bench


def test_bench_logprobs_chunked_equals_naive():
    # T larger than grpo's chunk, so several chunks (and the padded last row) are exercised
    T = bench._default_chunk() + 37
    rows = bench.compare_logprobs(T, hidden=16, batch_size=2, prompt_len=8, vocab=300, device=torch.device("cpu"))
    assert [r["mode"] for r in rows] == ["train", "no_grad"]
    for r in rows:
        assert {"chunked_mb", "naive_mb", "mem_ratio", "chunked_s", "naive_s", "max_abs_diff"} <= set(r)
        assert r["max_abs_diff"] <= 1e-4 and r["T"] == T
    assert rows[0]["grad_rel_diff"] <= 1e-3


def test_bench_logprobs_mismatch_is_loud(monkeypatch):
    real = bench.naive_logprobs
    monkeypatch.setattr(bench, "naive_logprobs", lambda m, b, t: real(m, b, t) + 0.01)
    with pytest.raises(bench.Mismatch):
        bench.compare_logprobs(20, hidden=8, vocab=50, device=torch.device("cpu"), modes=("no_grad",))


@pytest.fixture(scope="module")
def bench_pool_pairs(tmp_path_factory):
    data = bench.make_synthetic(str(tmp_path_factory.mktemp("bench") / "d"), frames=3, image_scale=0.25)
    return bench.load_pool_pairs(data, max_pairs=6)


def test_bench_pool_naive_agrees_with_build_pool(bench_pool_pairs):
    params = dict(bench.POOL_PARAMS, depth_step=4)
    r = bench.compare_pool(bench_pool_pairs, params)
    assert {"pairs", "accepted", "rejected", "speedup", "naive_pairs_s", "vectorised_pairs_s"} <= set(r)
    assert r["pairs"] == len(bench_pool_pairs) == 6
    assert r["valid_diff"] == 0 and r["max_count_diff"] <= 2
    # match counts of the two versions agree closely on the pair with the most matches
    f1, f2 = max(bench_pool_pairs, key=lambda p: bench.build_pool.match_rgbd(p[0], p[1], params)["counts"]["match"])
    fast = bench.build_pool.match_rgbd(f1, f2, params)["counts"]
    slow = bench.naive_match_rgbd(f1, f2, params)
    assert slow["match"] > 0 and abs(fast["match"] - slow["match"]) <= 2


def test_bench_pool_decision_mismatch_is_loud(bench_pool_pairs, monkeypatch):
    real = bench.naive_match_rgbd

    def broken(f1, f2, params):  # accepts everything
        return dict(real(f1, f2, params), match=10 ** 6)
    monkeypatch.setattr(bench, "naive_match_rgbd", broken)
    params = dict(bench.POOL_PARAMS, depth_step=4, min_matches=10 ** 5)
    with pytest.raises(bench.Mismatch):
        bench.compare_pool(bench_pool_pairs[:2], params)


def test_bench_rollout_shared_prefill_same_tokens(tmp_path):
    path = bench.build_model_dir("tiny", str(tmp_path / "tiny"))
    model, tok, ip = bench.grpo.load_policy(path)
    bench.never_stop(model, tok)
    enc = bench.bench_prompt(tok, ip, side=128)
    row, = bench.compare_rollout(model, tok, enc, G=3, lengths=[4])
    assert row["generated"] == 3 * 4  # never_stop: every completion runs to its length
    assert {"shared_prefill", "repeated_prefill", "prefill_ratio", "shared_tok_s", "saved"} <= set(row)
