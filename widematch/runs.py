"""One model's output directory of an evaluation (evaluate.py and its --reasonmatch route): its name, the run.json
guard against mixing settings, the resumable predictions file; and the dtype a local model runs in.
"""

import json
import re
import sys
from pathlib import Path


def model_name(path):
    """A readable, filesystem-safe name from a checkpoint path or hub id: runs/grpo/step_000010 ->
    grpo_step_000010 (the run name disambiguates steps of different runs), demo_data/tiny-qwen3vl ->
    tiny-qwen3vl, Qwen/Qwen3-VL-8B-Instruct -> Qwen_Qwen3-VL-8B-Instruct."""
    p = Path(path)
    if re.fullmatch(r"step_\d+", p.name) and p.parent.name:
        name = f"{p.parent.name}_{p.name}"
    elif p.exists():
        name = p.resolve().name
    else:  # hub id owner/name
        name = str(path).strip("/").replace("/", "_")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._") or "model"


def unique_names(names):
    """Suffix -2, -3, ... onto repeated names, keeping order."""
    seen, out = {}, []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def read_predictions(path):
    """Rows already in a predictions file. A truncated last line (a run killed mid-write) is dropped and the
    file rewritten without it, so appending continues on a clean line; a bad line elsewhere is an error."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                sys.exit(f"evaluate.py: error: {path} line {i + 1} is corrupt (not the last line; delete the file)")
            path.write_text("".join(lines[:-1]))
            break
    else:
        if lines and not lines[-1].endswith("\n"):  # complete JSON but cut before its newline
            with open(path, "a") as f:
                f.write("\n")
    return rows


def check_run_info(model_dir, info, keys=None):
    """Refuse to resume into predictions that were made with different settings (only `keys` compared, if given:
    re-scored answers replace their predictions whatever changed, but never a model's)."""
    p = model_dir / "run.json"
    if p.exists():
        old = json.loads(p.read_text())
        diff = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k) and (keys is None or k in keys))
        if diff:
            sys.exit(f"evaluate.py: error: {p} was made with other settings ({', '.join(diff)}); "
                     f"use another --out or delete {model_dir}")
    model_dir.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(info, indent=2) + "\n")


def model_dtype(args):
    """--dtype, with auto = bfloat16 when the model goes to GPUs (--device cuda*, or --device-map with a GPU
    visible), float32 on CPU."""
    if args.dtype != "auto":
        return args.dtype
    import torch
    on_gpu = args.device.startswith("cuda") or (args.device_map and torch.cuda.is_available())
    return "bfloat16" if on_gpu else "float32"
