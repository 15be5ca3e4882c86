#!/usr/bin/env bash
# The whole widematch pipeline end to end on the embedded synthetic data with a tiny random Qwen3-VL,
# on CPU, in a few minutes. Every step leaves its output on disk so you can open it:
#   demo_data/  synthetic scenes in ScanNet / COLMAP / CO3D layouts + the tiny model
#   pool/       verified correspondence pool (pairs.jsonl + one .npz per pair)
#   tasks/      matching tasks with the points drawn on the images (train.jsonl, test.jsonl)
#   runs/grpo/  GRPO checkpoints (step_%06d/) and rollouts.jsonl
#   eval/       predictions, metrics.json per model, report.md, plots
#   human/      index.html: the widest tasks as a page people answer (README, Human baseline)
# Usage: bash demo.sh        (PYTHON=/path/to/python bash demo.sh to pick an interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-$(command -v python || command -v python3)}"
step() { echo; echo "=== $* ==="; }

step "1/6 render synthetic scenes in real dataset layouts"
$PY synthetic.py --out demo_data

step "2/6 build the verified correspondence pool"
$PY build_pool.py --scannet demo_data/scannet --colmap demo_data/colmap --co3d demo_data/co3d --out pool

step "3/6 make matching tasks (test split for evaluation, train split for inspection)"
# 3-5 points per task: the range the tiny model is warmed up and trained on (demo.sh's grpo.py line); the
# benchmark's own default is 4-12 (drop the two flags for real models).
# 640 px: the CPU demo's image size (the benchmark default is the paper's 1024).
$PY make_tasks.py --pool pool --out tasks --split test --n-min 3 --n-max 5 --max-side 640
$PY make_tasks.py --pool pool --out tasks --split train --n-min 3 --n-max 5 --max-side 640

step "4/6 build the tiny Qwen3-VL and teach it the answer format (random mappings)"
$PY tiny_model.py --out demo_data/tiny-qwen3vl --pool pool

step "5/6 GRPO with the dual-level curriculum (online tasks from the pool's train split)"
# grpo.py's defaults are the paper's 8B recipe (G 32, 5120 tokens, lr 1e-6, 1024 px, ...): the tiny model's here.
# metrics.jsonl and curves.png (redrawn at every eval) are in runs/grpo/.
$PY grpo.py --model demo_data/tiny-qwen3vl --pool pool --out runs/grpo \
    --group-size 4 --prompts-per-step 4 --micro-batch 8 --max-new-tokens 48 --lr 1e-3 --max-side 640 \
    --n-min 3 --n-max 5 --steps 40 --save-every 10 --eval-every 10 --eval-tasks 6 --no-grad-checkpointing

step "6/6 evaluate the base model, the trained checkpoint and the classical baselines"
# 48 new tokens: what the tiny model is trained to (the grpo.py line above); the evaluation default is the paper's 5120.
$PY evaluate.py demo_data/tiny-qwen3vl runs/grpo --tasks tasks/test.jsonl --out eval --baseline sift random none --show 4 \
    --max-new-tokens 48

step "the human-baseline page: the widest tasks, to answer by hand in a browser"
$PY human.py --tasks tasks/test.jsonl --out human

echo
echo "demo done: open eval/report.md (plots and side-by-side pictures are next to it); human/index.html to try the tasks"
