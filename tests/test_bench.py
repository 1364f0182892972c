"""bench.py's pieces on tiny models: FLOP counts against hand counts and torch's FlopCounterMode,
the memory counter against known allocations, peft's twin against our logits, the whole run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import bench
import methods
from conftest import tiny_gpt, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# tiny_llama: dim 32, 2 layers, 4 heads of 8, 2 KV heads, SwiGLU 48, vocab 97 (tied head)
LINEAR_PARAMS = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 48) + 97 * 32  # q k v o gate up down, head


def test_step_flops_is_the_hand_count():
    batch, seq = 2, 8
    attention = 6 * 32 * seq * (seq + 1) * 2 * batch  # 6 dim T (T + 1) per layer and sequence
    assert bench.step_flops(tiny_llama(), batch, seq) == 4 * LINEAR_PARAMS * batch * seq + attention
    assert LINEAR_PARAMS == 18464


def test_a_frozen_step_runs_4N_matmul_flops_per_token_and_the_head_once_more():
    """What torch counts for the frozen-base step's matmuls: forward and input gradients, no weight
    gradients (6N would mean the bench's frozen step trains the weights), and the LM head's logits
    recomputed in the loss's backward (2 x vocab x dim per token)."""
    model = tiny_llama()
    batch = bench.random_batch(model.cfg, 3, 8, CPU)
    step = bench.frozen_variant(model, batch).step
    with FlopCounterMode(display=False) as counter:
        step()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm))
    assert matmuls == (4 * LINEAR_PARAMS + 2 * 97 * 32) * 3 * 8


def test_adapter_flops_is_the_hand_count():
    lora = methods.get("lora")
    model = lora.apply(tiny_llama(), lora.Config(r=4))
    per_token = 2 * 4 * ((32 + 32) + (32 + 16))  # q (32 -> 32) and v (32 -> 16) in 2 layers
    assert bench.adapter_flops(model, lora, 10) == 6 * 10 * per_token


def test_transient_peak_counts_what_is_alive_at_once():
    def fn():
        a = torch.ones(256, 1024)  # 1 MiB
        b = torch.ones(512, 1024)  # 2 MiB, while a is alive
        del a, b
        torch.ones(512, 1024)  # 2 MiB alone: not a new peak

    assert bench.transient_peak(fn, CPU) == 3 * 2 ** 20


def test_tensor_bytes_counts_a_shared_storage_once():
    w = torch.zeros(10, 10)
    assert bench.tensor_bytes([w, w[0], w.view(100), torch.zeros(5)]) == 400 + 20


def test_share_base_shares_tensors_but_not_modules(tiny_model):
    copy = bench.share_base(tiny_model)
    assert all(a is b for a, b in zip(copy.parameters(), tiny_model.parameters()))
    lora = methods.get("lora")
    lora.apply(copy, lora.Config())
    assert lora.layers(copy) and not lora.layers(tiny_model)


def test_interleaving_starts_each_repeat_one_variant_later():
    calls = []
    times = bench.interleaved({n: (lambda n=n: calls.append(n)) for n in "abc"}, 3, CPU)
    assert "".join(calls) == "abc" "bca" "cab"
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


@pytest.mark.parametrize("name", methods.NAMES)
def test_every_method_variant_trains_and_holds_its_state(name):
    model = tiny_llama()
    v = bench.method_variant(model, name, bench.random_batch(model.cfg, 2, 8, CPU))
    peak = bench.transient_peak(v.step, CPU)
    assert peak > 0 and v.trainable > 0
    kept = bench.tensor_bytes(v.keeps())
    assert kept > bench.tensor_bytes([*model.parameters(), *model.buffers()])  # adapter + AdamW state
    assert not any(p.requires_grad for p in model.parameters())  # the shared base stays frozen


def test_the_frozen_step_reaches_the_first_layer_on_either_family():
    for model in (tiny_llama(), tiny_gpt()):
        grads = []
        v = bench.frozen_variant(model, bench.random_batch(model.cfg, 2, 8, CPU))
        first = next(m for m in v.model.modules() if isinstance(m, nn.Linear))
        first.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0]))
        v.step()
        assert grads and grads[0].abs().sum() > 0


def test_transformers_twin_has_our_logits_and_peft_trains_on_it():
    model = tiny_llama()
    hf = bench.hf_llama(model)
    idx = bench.random_batch(model.cfg, 2, 16, CPU)[0]
    assert bench.logit_gap(model, hf, idx) < 1e-5
    assert bench.logit_gap(model, bench.hf_llama(tiny_llama(seed=1)), idx) > 1e-3  # other weights show
    v = bench.peft_variant(bench.hf_llama(tiny_llama()), bench.random_batch(model.cfg, 2, 8, CPU))
    assert v.trainable == 2 * 8 * ((32 + 32) + (32 + 16))  # peft's LoRA r=8 on q and v: ours
    v.step()
    v.step()
    lora_B = [p for n, p in v.model.named_parameters() if "lora_B" in n]
    assert lora_B and all(p.abs().sum() > 0 for p in lora_B)  # B starts at zero: it trained


def test_without_peft_the_bench_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    assert bench.peft_versions() is None


def test_the_whole_run_writes_every_figure(tmp_path, tiny_checkpoint):
    out = tmp_path / "bench.json"
    res = bench.main(["--model", str(tiny_checkpoint), "--quick", "--repeats", "1", "--svd-size", "16",
                      "--gemm-size", "64", "--threads", "1", "--alora-run", "--dtype", "bf16", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    keys = [f"{n}_step_over_frozen_step" for n in methods.NAMES] + [
        f"{n}_memory_over_frozen_memory" for n in methods.NAMES] + [
        "merged_forward_over_base_forward", "ours_over_peft_step", "ours_over_peft_memory",
        "sora_step_over_adalora_step", "frozen_step_fraction_of_gemm", "lora_step_fraction_of_gemm",
        "sara_init_over_full_svd", "mosara_init_over_full_svd", "alora_run_over_lora_run"]
    assert all(res[k] > 0 for k in keys)
    a = res["alora_round"]  # 4 modules (q, v x 2 layers) of rank 8
    assert (a["live_ranks"], a["least_scored"], a["most_scored"], a["k2"], a["rounds"], a["val_size"]) == (
        32, 4, 12, 3, 8, 16)
    assert a["exact_round_s"] == 65 * a["forward_s"] and 1 < a["candidates_run_over_steps"] < a["capped_run_over_steps"]
    run = res["alora_run"]  # train.py's defaults: 150 steps, rounds at 15, 18, ..., 36
    assert run["steps"] == 150 and [r["step"] for r in run["rounds"]] == list(range(15, 37, 3))
    assert all(4 <= r["scored"] <= 12 for r in run["rounds"])  # from 2 n_A up to max_exact
    assert set(res["steps"]) == {"frozen", "peft", *methods.NAMES}
    assert res["steps"]["peft"]["trainable_params"] == res["steps"]["lora"]["trainable_params"]
    assert res["init"]["random"]["shapes"] == ["16x16"] and res["init"]["model"]["matrices"] == 4  # q, v x 2 layers
    assert set(res["targets"]) == set(bench.TARGETS) - {"frozen_fp32_peak_mb"}  # the default model's figure
    low = res["dtype"]  # the bf16 comparison, side by side with float32 in the same run
    assert low["dtype"] == "bfloat16" and set(low["steps"]) == set(res["steps"])
    assert all(low[f"{n}_low_over_fp32_step"] > 0 and low[f"{n}_low_over_fp32_memory"] > 0 for n in res["steps"])
    assert low["ours_over_peft_low_step"] > 0 and low["gemm_gflops"] > 0 and 0 < low["frozen_step_fraction_of_gemm"]
    assert set(low["generate_tokens_per_s"]) == {"float32", "bfloat16"}
    assert set(low["load"]) == {"none", "fp32", "bf16"} and all(v["peak_rss_mb"] > 0 for v in low["load"].values())
    assert "bfloat16 base, float32 adapter:" in bench.report(res)


def test_a_size_builds_a_random_shape_and_peft_can_be_left_out(monkeypatch):
    cfg = tiny_llama().cfg
    monkeypatch.setitem(bench.SIZES, "tiny", (cfg, "tiny_llama's shape"))
    res = bench.main(["--size", "tiny", "--quick", "--repeats", "1", "--svd-size", "8", "--gemm-size", "32",
                      "--no-peft", "--dtype", "bf16"])
    assert res["setup"]["model"] == "tiny_llama's shape" and res["setup"]["peft"] == "left out"
    assert "peft" not in res["steps"] and "ours_over_peft_step" not in res
    assert set(res["targets"]) == set(bench.TARGETS) - {"ours_over_peft_step", "ours_over_peft_memory",
                                                        "ours_over_peft_low_step", "ours_over_peft_low_memory",
                                                        "alora_run_over_lora_run",  # only with --alora-run
                                                        "frozen_fp32_peak_mb"}
    assert "load" not in res["dtype"]  # a random shape: nothing to load
    assert res["frozen_step_gflop"] == bench.step_flops(tiny_llama(), 4, 64) / 1e9


def test_memory_alone_times_nothing_and_shows_the_memory_goals(monkeypatch, capsys):
    monkeypatch.setitem(bench.SIZES, "tiny", (tiny_llama().cfg, "tiny_llama's shape"))
    res = bench.main(["--size", "tiny", "--memory", "--dtype", "bf16", "--batch-size", "2", "--seq-len", "8",
                      "--no-peft"])
    assert set(res["steps"]) == set(res["dtype"]["steps"]) == {"frozen", *methods.NAMES}
    assert not any("median_s" in v for v in [*res["steps"].values(), *res["dtype"]["steps"].values()])
    assert "alora_round" not in res and "gemm" not in res and "load" not in res["dtype"]
    assert set(res["targets"]) == {f"{n}_low_over_fp32_memory" for n in ("frozen", *methods.NAMES)}
    frozen = res["dtype"]["frozen_low_over_fp32_memory"]
    assert frozen == res["dtype"]["steps"]["frozen"]["peak_bytes"] / res["steps"]["frozen"]["peak_bytes"]
    line = next(line for line in capsys.readouterr().out.splitlines() if "frozen peak memory, --dtype / fp32" in line)
    assert line.split()[-4:] == [f"{frozen:.3f}", "<=", "0.6", "met" if frozen <= 0.6 else "MISSED"]


def test_bad_input_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "bench.py", "--repeats", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: --repeats must be positive, got 0"
