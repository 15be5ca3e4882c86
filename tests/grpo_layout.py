"""grpo.py's machinery in widematch/ (issue 29): the helpers import no stage script, and the stages that share
model loading and prompt encoding with the trainer no longer import the trainer."""
import glob
import json
import os
import subprocess
import sys

import grpo

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = ("widematch.model_io", "widematch.dist", "widematch.checkpoint", "widematch.metrics")


def imported_scripts(*modules):
    """The repo's top-level scripts that importing `modules` in a fresh interpreter loads."""
    scripts = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py")))
    code = (f"import importlib, json, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\n"
            f"print(json.dumps([s for s in {scripts!r} if s in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.splitlines()[-1])


def test_grpo_helpers_import_no_stage_script_and_stages_not_the_trainer():
    assert imported_scripts(*HELPERS) == []
    assert "grpo" not in imported_scripts("tiny_model", "evaluate")  # they share widematch/, not the trainer
    # the old names stay importable from grpo.py, and are the helpers' own objects
    from widematch import checkpoint, model_io
    assert grpo.encode is model_io.encode and grpo.load_policy is model_io.load_policy
    assert grpo.latest_checkpoint is checkpoint.latest_checkpoint and grpo.collate_samples is model_io.collate_samples
