"""What several test files share: running a script, comparing run directories, the contract tests'
small adapters and training loop. Fixtures are conftest.py's; checkpoint writers are checkpoints.py's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from safetensors.torch import load_file

import training

ROOT = Path(__file__).resolve().parents[1]
# train.py flags for a run of a few seconds on the tiny checkpoint (--steps is each test's own)
FAST = ["--batch-size", "2", "--seq-len", "512", "--log-every", "5", "--val-size", "2"]
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(*args, env=None):
    """`python *args` in the repository, its output captured."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def adapters_equal(a, b):
    a, b = load_file(Path(a) / "adapter.safetensors"), load_file(Path(b) / "adapter.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir()}


class Exploit:
    """Pickles into a call of open(marker, "w"): a file that is unpickled creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- contract tests' training

STEPS = 4
# small adapters on 32-wide models; Mo-SARA with one head, the only one that merges
CONFIGS = {"lora": {"r": 4}, "sara": {"threshold": 0.2}, "mosara": {"heads": 1}, "sora": {"rmax": 6, "lam": 0.5},
           "adalora": {"init_r": 6, "target_r": 4}, "alora": {"r": 4}, "salora": {"rmax": 6}}


def batch(seed, n=4, t=12):
    x = torch.randint(2, 97, (n, t), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def run_steps(model, method, steps=STEPS, seed=0):
    """training.train_step `steps` times, with a cosine schedule and the validation closure ALoRA needs."""
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))
    val_loss = training.val_closure(model, batch(seed + 100))
    model.train()
    for step in range(1, steps + 1):
        training.train_step(model, method, opt, sched, [batch(seed + step)], step, steps, val_loss=val_loss)
    model.eval()
    return opt
