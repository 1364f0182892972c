"""Mixed precision: a bf16 (or fp16) frozen base with float32 adapters. What must stay exact in
every dtype, on this library's models and on checkpoints transformers itself reads and writes.
(bf16 runs on this CPU; fp16 needs CUDA or AVX512-FP16 and is refused elsewhere; --dtype auto is
tested with the matmul timings and CPU flags each test sets. Resume and torchrun in bf16 are
in test_reliability.py, the copied method files on bf16 transformers models in test_contract.py.)"""
import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import adapters
import bench
import cli
import eval as evaluate
import export
import methods
import models
import train
import training
from conftest import tiny_gpt, tiny_llama
from helpers import CONFIGS, FAST, batch, run_steps

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


def timings(fp32=1.0, bf16=1.0, fp16=1.0):
    """A stand-in for models.matmul_seconds: these seconds per dtype, whatever the device."""
    seconds = {torch.float32: fp32, BF16: bf16, torch.float16: fp16}
    return lambda dtype, device: seconds[dtype]


def test_auto_measures_and_says_what_it_chose_and_why(monkeypatch):
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(models, "matmul_seconds", timings(bf16=0.25))
    assert models.pick_dtype("auto", "cpu") == (BF16, "bf16 matmul 4.00x float32 on this CPU")
    monkeypatch.setattr(models, "matmul_seconds", timings(bf16=1 / 0.56))
    assert models.pick_dtype("auto", "cpu") == (
        torch.float32, "bf16 matmul 0.56x float32 on this CPU, below the 1.3x auto asks for")
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "avx512_fp16"})
    monkeypatch.setattr(models, "matmul_seconds", timings(bf16=1 / 0.56, fp16=1 / 1.5))
    assert models.pick_dtype("auto", "cpu") == (
        torch.float16, "bf16 matmul 0.56x, fp16 matmul 1.50x float32 on this CPU; fp16 trains with loss scaling")


@settings(max_examples=100, deadline=None)
@given(bf16=st.floats(0.1, 10), fp16=st.floats(0.1, 10), avx512_fp16=st.booleans())
def test_auto_takes_the_fastest_low_precision_from_1_3x_float32_and_fp16_only_clearly_ahead(bf16, fp16, avx512_fp16):
    flags = {"avx512f"} | ({"avx512_fp16"} if avx512_fp16 else set())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "cpu_flags", lambda: flags)
        mp.setattr(models, "matmul_seconds", timings(bf16=1 / bf16, fp16=1 / fp16))
        dtype, why = models.pick_dtype("auto", "cpu")
    assert ("fp16 matmul" in why) == avx512_fp16 and why.startswith("bf16 matmul")
    fp16 = fp16 if avx512_fp16 else 0.0  # not offered: never measured, never taken
    if max(bf16, fp16) < 1.3:
        assert dtype == torch.float32
    else:
        assert dtype == (torch.float16 if fp16 > 1.1 * bf16 else BF16)


def test_a_named_dtype_is_taken_as_asked_and_fp16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(models, "matmul_seconds", lambda dtype, device: pytest.fail("nothing to measure"))
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert models.pick_dtype("bf16", "cpu") == (BF16, "as asked")
    assert models.pick_dtype("fp32", "cpu") == (torch.float32, "as asked")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device or a CPU with AVX512-FP16"):
        models.pick_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="--dtype must be"):
        models.pick_dtype("int8", "cpu")
    assert models.pick_dtype("auto", "meta") == (torch.float32, "no low precision is measured on meta")
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512f", "avx512_fp16"})
    assert models.pick_dtype("fp16", "cpu") == (torch.float16, "as asked")


def test_matmul_seconds_times_a_real_matmul_in_each_dtype(real_matmul_seconds):
    for dtype in (torch.float32, BF16):
        assert 0 < real_matmul_seconds(dtype, torch.device("cpu"), repeats=1) < 60


def test_cpu_flags_are_this_machines_words():
    flags = models.cpu_flags()
    assert isinstance(flags, set) and all(f and " " not in f for f in flags)


def test_every_script_defaults_to_auto_and_says_its_choice_first(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "matmul_seconds", timings(bf16=0.5))
    why = "bf16 matmul 2.00x float32 on this CPU"
    run = tmp_path / "run"
    train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--out", str(run), *FAST, "--steps", "2"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"dtype: bfloat16 for the frozen base, float32 for the adapter ({why})"
    assert json.loads((run / "config.json").read_text())["recipe"].endswith("--dtype bf16")  # as resolved
    evaluate.main(["--model", str(tiny_checkpoint), "--adapter", str(run), "--limit", "1", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.splitlines()[0] == f"dtype: bfloat16 ({why})"
    export.main(["--format", "merged", "--adapter", str(run), "--model", str(tiny_checkpoint), "--out",
                 str(tmp_path / "merged")])
    assert capsys.readouterr().out.splitlines()[0] == f"dtype: bfloat16 ({why})"
    assert {t.dtype for t in load_file(tmp_path / "merged" / "model.safetensors").values()} == {BF16}
    monkeypatch.setitem(bench.SIZES, "tiny", (tiny_llama().cfg, "tiny_llama's shape"))
    res = bench.main(["--size", "tiny", "--memory", "--batch-size", "2", "--seq-len", "8", "--no-peft"])
    assert capsys.readouterr().out.splitlines()[0] == f"dtype: bfloat16 against float32 ({why})"
    assert res["dtype"]["dtype"] == "bfloat16"
    defaults = [train.parse_args(["--method", "lora"])[0], evaluate.parse_args([]), bench.parse_args([]),
                export.parse_args(["--format", "hf", "--out", str(tmp_path / "hf")])]
    assert [a.dtype for a in defaults] == ["auto"] * 4


def test_fp16_where_it_is_not_native_is_one_sentence_and_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    model = ["--model", str(tiny_checkpoint), "--dtype", "fp16"]
    for script, argv in ((train, ["--out", str(tmp_path / "x")]), (evaluate, ["--limit", "1"]),
                         (export, ["--format", "hf", "--out", str(tmp_path / "x")])):
        with pytest.raises(SystemExit) as stop:
            cli.run(lambda: script.main([*model, *argv]))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "fp16 needs a CUDA device or a CPU with AVX512-FP16" in err, script.__name__
    assert not (tmp_path / "x").exists()


def test_fp16_on_a_cpu_with_avx512_fp16_trains_with_a_gradient_scaler(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512f", "avx512_fp16"})
    scaled = []

    class Recorded(torch.amp.GradScaler):
        def scale(self, outputs):
            scaled.append(self._device)
            return super().scale(outputs)
    monkeypatch.setattr(torch.amp, "GradScaler", Recorded)
    summary = train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "run"), *FAST,
                          "--steps", "3", "--dtype", "fp16"])
    assert scaled == ["cpu"] * 3 and summary["val_loss"] > 0


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
