"""Mixed precision: a bf16 (or fp16) frozen base with float32 adapters. What must stay exact in
every dtype, on this library's models and on checkpoints transformers itself reads and writes.
(bf16 runs on this CPU; fp16 needs CUDA and is refused elsewhere. Resume and torchrun in bf16 are
in test_reliability.py, the copied method files on bf16 transformers models in test_contract.py.)"""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import adapters
import export
import methods
import models
import train
import training
from conftest import tiny_gpt, tiny_llama
from helpers import CONFIGS, FAST, ROOT, batch, run_steps

BF16 = torch.bfloat16


def bf16_model(family):
    return (tiny_llama if family == "llama" else tiny_gpt)().to(BF16)


def adapted_bf16(name, family="llama"):
    model = bf16_model(family)
    method = methods.get(name)
    torch.manual_seed(0)
    method.apply(model, method.Config(**CONFIGS[name]))
    return model, method


@pytest.mark.parametrize("name", methods.NAMES)
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_a_bf16_base_keeps_delta_w_zero_and_the_adapter_float32(name, family):
    base = bf16_model(family)
    model, method = adapted_bf16(name, family)
    x = batch(7)[0]
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # ΔW = 0 at init, bit for bit
    own = {k: v for k, v in model.state_dict().items() if k not in base.state_dict()}
    own.update((f"{n}.{k}", v) for n, m in method.layers(model).items() for k, v in m.named_buffers())
    assert own and all(v.dtype in (torch.float32, torch.bool) for v in own.values()), \
        {k: v.dtype for k, v in own.items() if v.dtype not in (torch.float32, torch.bool)}
    opt = run_steps(model, method)
    grads_and_moments = [t for state in opt.state.values() for t in state.values() if t.dim()]
    assert grads_and_moments and all(t.dtype == torch.float32 for t in grads_and_moments)  # master weights
    assert all(p.dtype == BF16 for n, p in model.named_parameters() if "lora_" not in n)  # the base stays bf16


@pytest.mark.parametrize("name", methods.NAMES)
def test_merge_in_bf16_adds_in_float32_and_rounds_once(name):
    model, method = adapted_bf16(name)
    run_steps(model, method)
    x = batch(7)[0]
    with torch.no_grad():
        unmerged = model(x).float()
    for n, m in method.layers(model).items():
        w0 = m.weight.detach().clone()
        want = (w0.float() + m.delta_weight()).to(BF16)
        m.merge()
        assert torch.equal(m.weight, want), n
        A, B = method.to_lora(model)[n]
        assert A.dtype == B.dtype == torch.float32
        torch.testing.assert_close(B @ A, m.delta_weight(), rtol=1e-5, atol=1e-7)
        m.unmerge()
        assert torch.equal(m.weight, w0)
    method.merge(model)
    with torch.no_grad():
        gap = (model(x).float() - unmerged).abs().max().item()
    assert gap < 0.05 * unmerged.abs().max().item()  # bf16's rounding of W0 + ΔW, nothing more


def test_mosara_and_sara_decompose_a_bf16_weight_in_float32_or_wider():
    model = bf16_model("llama")
    mosara, sara = methods.get("mosara"), methods.get("sara")
    mosara.apply(model, mosara.Config(heads=2))
    for m in mosara.layers(model).values():
        assert m.lora_U.dtype == m.lora_V.dtype == torch.float32
        w = m.weight.double()  # the frozen basis spans W0's top singular directions
        torch.testing.assert_close(m.lora_U.T.double() @ w @ m.lora_V.T.double(),
                                   torch.diag(torch.linalg.svdvals(w)[:m.lora_U.shape[1]]), rtol=2e-2, atol=2e-2)
    other = bf16_model("llama")
    sara.apply(other, sara.Config(threshold=0.3))
    for n, m in sara.layers(other).items():  # k from float64 singular values of the bf16 weight
        s = torch.linalg.svdvals(m.weight.double())
        assert m.lora_lam.shape[0] == int((s.cumsum(0) < 0.3 * s.sum()).sum()) + 1


def test_load_in_bf16_matches_transformers_in_bf16(tiny_checkpoint):
    from transformers import LlamaForCausalLM
    ours, _ = models.load(tiny_checkpoint, BF16)
    full, _ = models.load(tiny_checkpoint)
    assert {p.dtype for p in ours.parameters()} == {BF16}
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied after loading in place
    hf = LlamaForCausalLM.from_pretrained(tiny_checkpoint, dtype=BF16).eval()
    idx = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ours(idx).float(), hf(input_ids=idx).logits.float(), full(idx)
    scale = c.abs().max().item()
    assert (a - b).abs().max().item() < 0.02 * scale  # the same bf16 computation, up to kernel order
    assert (a - c).abs().max().item() < 0.05 * scale  # and close to float32


def test_train_in_bf16_logs_the_choice_and_records_it(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train.main(["--method", "sora", "--model", str(tiny_checkpoint), "--out", str(out), *FAST,
                          "--steps", "6", "--dtype", "bf16"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "dtype: bfloat16 for the frozen base, float32 for the adapter (as asked)"
    assert summary["val_loss"] > 0 and json.loads((out / "config.json").read_text())["recipe"].endswith("--dtype bf16")
    assert {t.dtype for t in load_file(out / "adapter.safetensors").values()} == {torch.float32}


def test_auto_measures_this_machine_and_says_why():
    dtype, why = models.pick_dtype("auto", "cpu")
    assert dtype in (BF16, torch.float32) and "bf16 matmul ran" in why and "float32 rate" in why
    assert models.pick_dtype("bf16", "cpu") == (BF16, "as asked")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        models.pick_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="--dtype must be"):
        models.pick_dtype("int8", "cpu")


def test_fp16_on_a_cpu_is_one_sentence_and_exit_2(tiny_checkpoint, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "train.py", "--model", str(tiny_checkpoint), "--dtype", "fp16",
                        "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "fp16 needs a CUDA device" in r.stderr
    assert not (tmp_path / "x").exists()


def test_the_gradient_scaler_path_unscales_before_the_hooks():
    """fp16 runs on CUDA only; the scaler's place in train_step is checked here with a CPU scaler."""
    model, method = adapted_bf16("adalora")
    model.float()
    seen = []
    real = method.after_backward

    def spy(m, step, total):
        seen.append(max(p.grad.abs().max().item() for n, p in m.named_parameters() if p.grad is not None))
        real(m, step, total)
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    twin = copy.deepcopy(model)
    opt2 = torch.optim.AdamW(method.param_groups(twin, 1e-2, 0.0))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    method.after_backward = spy
    try:
        model.train(), twin.train()
        torch.manual_seed(0)  # the same dropout masks for both
        training.train_step(model, method, opt, sched, [batch(1)], 1, 4, scaler=scaler)
        torch.manual_seed(0)
        training.train_step(twin, method, opt2, sched2, [batch(1)], 1, 4)
    finally:
        method.after_backward = real
    assert seen[0] == pytest.approx(seen[1], rel=1e-4)  # the hooks see true gradients, not scaled ones
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_export_in_bf16_writes_what_transformers_reads(tiny_checkpoint, tmp_path):
    from transformers import LlamaForCausalLM
    run = tmp_path / "run"
    train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--out", str(run), *FAST, "--steps", "4"])
    export.main(["--format", "merged", "--adapter", str(run), "--model", str(tiny_checkpoint), "--dtype", "bf16",
                 "--out", str(tmp_path / "merged")])
    export.main(["--format", "peft", "--adapter", str(run), "--model", str(tiny_checkpoint), "--dtype", "bf16",
                 "--out", str(tmp_path / "peft")])
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {BF16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "peft" / adapters.PEFT_WEIGHTS).values()} == {torch.float32}
    ours, _ = models.load(tiny_checkpoint, BF16)
    ours, _ = adapters.load_adapter(ours, run)
    methods.get("lora").merge(ours)
    for k, v in ours.state_dict().items():  # export writes the weights merge made, bit for bit
        if k in tensors:
            assert torch.equal(tensors[k], v), k
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert hf.dtype == BF16
    idx = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.eval()(idx).float(), hf(input_ids=idx).logits.float()
    assert (a - b).abs().max().item() < 0.02 * a.abs().max().item()


def test_an_overflowed_fp16_step_is_skipped_whole_and_no_hook_sees_inf(monkeypatch):
    """GradScaler overflows routinely in fp16: AdaLoRA's EMAs must never fold in an inf (0 * inf = NaN)."""
    model, method = adapted_bf16("adalora")
    model.float().train()
    calls = []
    monkeypatch.setattr(method, "after_backward", lambda *a: calls.append("after_backward"))
    monkeypatch.setattr(method, "after_step", lambda *a, **k: calls.append("after_step"))
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # the scaled loss overflows float32
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss, figures = training.train_step(model, method, opt, sched, [batch(1)], 1, 4, scaler=scaler)
    assert figures == {} and calls == [] and scaler.get_scale() < 2.0 ** 127
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.isfinite(b).all() for b in model.buffers())
