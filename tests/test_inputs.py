"""Bad input is refused where it enters, naming it, in one sentence: non-finite numbers (flags,
method Configs, a model's config and weights), values that would train nothing or end at rank 0,
record fields of the wrong type, a PEFT scale that overflows, a tokenizer larger than its model's
embeddings, a summary.json of the wrong shape, a --device that is no device, and a chat template
that would never end."""
import dataclasses
import json
import math
import shutil
import struct
import typing

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

import adapters
import bench
import data
import eval as evaluate
import generate
import methods
import models
import planted
import train
import training
from checkpoints import write_gguf
from conftest import tiny_llama
from helpers import FAST, FUZZ, run, write_jsonl

USER_ERRORS = (ValueError, FloatingPointError, models.LoadError, data.DataError, adapters.AdapterError)


def one_line_error(r):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    return r.stderr


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **change):
    c = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**c, **change}))


# ----------------------------------------------------------------------------- non-finite numbers

def float_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if float in (hints[f.name], *typing.get_args(hints[f.name]))]


@pytest.mark.parametrize("name", methods.NAMES)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_a_non_finite_value_as_it_is_parsed(name, value, capsys):
    """train.py's float flags, the run's and the method's, stop at parsing with argparse's exit 2,
    naming the flag: none reaches a run to surface as a non-finite loss."""
    method = methods.get(name)
    for field in float_fields(training.RunConfig) + float_fields(method.Config):
        flag = "--" + field.replace("_", "-")
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--method", name, f"{flag}={value}"])
        assert e.value.code == 2
        assert f"argument {flag}: '{value}' is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("parse,argv", [(planted.parse_args, ["--noise", "nan"]), (planted.parse_args, ["--lr", "inf"]),
                                        (generate.parse_args, ["--temperature", "inf", "hi"]),
                                        (generate.parse_args, ["--temperature", "nan", "hi"])])
def test_the_other_scripts_float_flags_refuse_non_finite_values(parse, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and "is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("name", methods.NAMES)
@given(value=st.sampled_from([math.nan, math.inf, -math.inf]), data_=st.data())
def test_a_method_config_refuses_a_non_finite_field_naming_it(name, value, data_):
    """Every method file's Config, built in Python as its Usage block does, refuses NaN and ±inf in
    any float field with a sentence that names the field."""
    method = methods.get(name)
    field = data_.draw(st.sampled_from(float_fields(method.Config)))
    with pytest.raises(ValueError, match=field):
        method.Config(**{field: value})


def test_lora_alpha_zero_is_refused_with_exit_2(tmp_path, tiny_checkpoint):
    """alpha 0 scales the update and both gradients to nothing: the run would train nothing."""
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        methods.get("lora").Config(alpha=0)
    r = run("train.py", "--model", str(tiny_checkpoint), *FAST, "--steps", "2", "--out", str(tmp_path / "o"),
            "--alpha", "0")
    assert "alpha must be a positive number, got 0.0" in one_line_error(r)
    assert not (tmp_path / "o").exists()


def test_alora_refuses_a_prune_per_round_that_leaves_no_rank():
    """prune_per_round is checked against the total rank (r x modules) where that is known: at apply."""
    alora = methods.get("alora")
    model = tiny_llama()  # 2 layers x (q, v): 4 modules, 2 ranks each, 8 in all
    with pytest.raises(ValueError, match="below the total rank, r x modules = 8"):
        alora.apply(model, alora.Config(r=2, prune_per_round=8))
    assert not alora.layers(model)  # nothing was wrapped
    alora.apply(model, alora.Config(r=2, prune_per_round=7))
    assert len(alora.layers(model)) == 4


# ----------------------------------------------------------------------------- a model's config and weights

@pytest.mark.parametrize("change,message", [
    ({"rope_theta": math.nan}, "rope_theta must be a positive finite number, got nan"),
    ({"rms_norm_eps": -1e-5}, "norm_eps must be a positive finite number, got -1e-05"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "RoPE factor must be a positive finite number, got 0"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}}, "high_freq_factor must exceed its low_freq_factor"),
    ({"num_attention_heads": -4}, "n_heads must be a positive integer, got -4"),
    ({"num_key_value_heads": -2}, "n_kv_heads must be a positive integer, got -2"),
    ({"hidden_size": "32"}, "dim must be a positive integer, got '32'"),
    ({"max_position_embeddings": "512"}, "max_seq_len must be a positive integer, got '512'"),
    ({"intermediate_size": 48.0}, "hidden_dim must be a positive integer, got 48.0"),
    ({"num_key_value_heads": 3}, "do not divide its width"),
    ({"tie_word_embeddings": "yes"}, "tie_embeddings must be true or false"),
])
def test_a_config_value_the_model_cannot_run_with_is_refused_naming_it(tmp_path, tiny_checkpoint, change, message):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(path, **change)
    with pytest.raises(models.LoadError, match=message):
        models.load(path)


@pytest.mark.parametrize("change,message", [({"num_attention_heads": -4}, "n_heads must be"),
                                            ({"max_position_embeddings": "512"}, "max_seq_len must be")])
def test_a_bad_model_config_is_one_line_from_the_scripts(tmp_path, tiny_checkpoint, change, message):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(path, **change)
    assert message in one_line_error(run("train.py", "--model", str(path), *FAST, "--steps", "2",
                                         "--out", str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
    assert message in one_line_error(run("eval.py", "--model", str(path), "--limit", "1"))


def test_a_weight_holding_nan_is_refused_naming_it(tmp_path, tiny_checkpoint):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = math.nan
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(models.LoadError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight holds NaN"):
        models.load(path)


def test_a_weight_that_overflows_the_dtype_it_is_loaded_in_is_refused(tmp_path, tiny_checkpoint):
    """Finite is checked in the dtype the model runs in: 1e5 is a float32 number and inf in float16."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"][0] = 1e5
    save_file(tensors, str(path / "model.safetensors"))
    models.load(path)
    with pytest.raises(models.LoadError, match=r"model\.norm\.weight holds NaN or infinite values \(in float16\)"):
        models.load(path, torch.float16)


def test_a_safetensors_weight_relabelled_as_integers_is_refused(tmp_path, tiny_checkpoint):
    """The same bytes under an I32 header: read as integers they would load as absurd floats."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].view(torch.int32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(models.LoadError, match=r"q_proj\.weight is stored as torch\.int32, not as floats"):
        models.load(path)


def relabel_gguf_tensor(path, name, type_id):
    """Rewrite the type of tensor `name` in a GGUF file's tensor infos (name, n_dims, dims, type, offset)."""
    blob = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = blob.index(key) + len(key)
    n_dims = struct.unpack_from("<I", blob, at)[0]
    at += 4 + 8 * n_dims
    struct.pack_into("<I", blob, at, type_id)
    path.write_bytes(bytes(blob))


def test_a_gguf_weight_relabelled_as_integers_is_refused(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(vocab_size=270))
    models.load(path)
    relabel_gguf_tensor(path, "blk.0.attn_v.weight", gguf.GGMLQuantizationType.I32)
    with pytest.raises(models.LoadError, match=r"blk\.0\.attn_v\.weight is stored as I32"):
        models.load(path)


def test_a_special_token_past_the_embeddings_is_refused_before_anything_is_written(tmp_path, tiny_checkpoint):
    """A tokenizer whose special token has an id the embedding lacks is refused when both are
    loaded: train.py leaves no --out (no empty log.jsonl), eval.py runs no row."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tj = json.loads((path / "tokenizer.json").read_text())
    tj["added_tokens"][-1]["id"] = 300  # the model has 259 embeddings
    (path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(models.LoadError, match="ids up to 300, past the model's 259 embeddings"):
        models.load(path)
    out = tmp_path / "o"
    assert "past the model's 259 embeddings" in one_line_error(
        run("train.py", "--model", str(path), *FAST, "--steps", "2", "--out", str(out)))
    assert not out.exists()
    r = run("eval.py", "--model", str(path), "--limit", "1")
    assert "past the model's 259 embeddings" in one_line_error(r) and "base" not in r.stdout


# ----------------------------------------------------------------------------- data, adapters, summaries

@pytest.mark.parametrize("key,value", [("output", 5), ("output", ["x"]), ("output", {"a": 1}), ("input", 3.5)])
def test_a_record_whose_text_field_is_not_a_string_is_refused(tmp_path, key, value):
    records = [{"instruction": "add", "input": "", "output": "4", "answer": "4"}] * 2
    records = [records[0], {**records[1], key: value}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(data.DataError, match=f"record 2's '{key}' is not a string"):
        data.load_items(path)


def test_a_record_without_output_or_input_still_reads(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "add 2 and 2", "answer": "4", "input": None}])
    assert data.load_items(path)[0].answer == "4"


def write_peft(path, alpha, r=2):
    path.mkdir()
    (path / adapters.PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                         "target_modules": ["q_proj"]}))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, 32, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(32, r, generator=g)
    save_file(tensors, str(path / adapters.PEFT_WEIGHTS))
    return path


def test_a_peft_alpha_whose_scale_overflows_is_refused(tmp_path):
    """lora_alpha 1e308 is a finite number whose scale makes ΔW's entries overflow: refused as the
    adapter loads; an ordinary alpha loads with ΔW finite."""
    with pytest.raises(adapters.AdapterError, match="lora_alpha / r gives .* the scale 5e\\+307"):
        adapters.load_adapter(tiny_llama(), write_peft(tmp_path / "huge", 1e308))
    model, _ = adapters.load_adapter(tiny_llama(), write_peft(tmp_path / "plain", 16))
    assert all(m.delta_weight().isfinite().all() for m in methods.get("lora").layers(model).values())


@pytest.mark.parametrize("summary,message", [
    ("3", "not a run summary"),
    ("[" * 100_000 + "]" * 100_000, "is not JSON"),
    (json.dumps({"seconds": "12.5", "steps": 2}), "seconds is not of the type"),
    (json.dumps({"total_rank": 1.5}), "total_rank is not of the type"),
])
def test_an_adapters_summary_is_checked_before_any_row_runs(tmp_path, tiny_checkpoint, summary, message, capsys):
    out = tmp_path / "run"
    train.main(["--method", "lora", "--model", str(tiny_checkpoint), *FAST, "--steps", "2", "--out", str(out)])
    (out / "summary.json").write_text(summary)
    capsys.readouterr()
    with pytest.raises(adapters.AdapterError, match=message):
        evaluate.main(["--model", str(tiny_checkpoint), "--adapter", str(out), "--limit", "1", "--markdown"])
    assert "base" not in capsys.readouterr().out


@pytest.mark.parametrize("dim", ["1", "2", "7"])
def test_planted_refuses_a_dim_below_the_largest_planted_rank(dim):
    with pytest.raises(ValueError, match=f"--dim must be at least 8, the largest planted rank, got {dim}"):
        planted.parse_args(["--dim", dim])


@pytest.mark.parametrize("device", ["cpux", "meta"])
def test_bench_refuses_a_device_this_machine_lacks(device):
    with pytest.raises(ValueError, match=f"--device {device} is not a device here"):
        bench.parse_args(["--device", device])


# ----------------------------------------------------------------------------- chat templates

NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def with_template(src, dst, template):
    path = copy_checkpoint(src, dst)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return path


def test_a_chat_template_that_would_never_end_is_refused_naming_it(tmp_path, tiny_checkpoint):
    path = with_template(tiny_checkpoint, tmp_path / "ckpt", NESTED)
    _, tok = models.load(path)
    with pytest.raises(ValueError, match=f"the chat template in {path}.* does more than 1,000,000 steps"):
        tok.render([{"role": "user", "content": "hi"}])
    r = run("generate.py", "--model", str(path), "hi")  # its stderr says the dtype and the template first
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: the chat template in") and "1,000,000 steps" in r.stderr


@pytest.mark.parametrize("template", [
    "{% for x in [1] recursive %}{{ loop([1, 2]) }}{% endfor %}",  # a recursive loop that never bottoms out
    "{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}",  # repeats whose total is 10**8
    "{{ 10 ** 100000000 }}",  # an integer power of 10**8 digits
    "{% for m in messages %}{% for i in range(100000) %}{{ range(100000)|join }}{% endfor %}{% endfor %}",
])
def test_every_kind_of_unbounded_template_work_is_refused(tmp_path, tiny_checkpoint, template):
    _, tok = models.load(with_template(tiny_checkpoint, tmp_path / "ckpt", template))
    with pytest.raises(ValueError, match="the chat template in"):
        tok.render([{"role": "user", "content": "hi"}])


@FUZZ
@given(n=st.integers(0, 40), m=st.integers(0, 40), messages=st.integers(1, 5))
def test_a_template_within_the_budget_renders_as_written(tmp_path, tiny_checkpoint, n, m, messages):
    """Counting the work changes nothing a template renders: loops over ranges, over the messages
    (with loop.last), filtered loops and repeats give what plain Python gives."""
    template = ("{% for i in range(n) %}{% for j in range(m) if j % 2 == 0 %}x{% endfor %}|{% endfor %}"
                "{% for msg in messages %}{{ msg.content * 2 }}{% if loop.last %}.{% endif %}{% endfor %}")
    path = tmp_path / "ckpt"
    if not path.exists():
        with_template(tiny_checkpoint, path, template)
    _, tok = models.load(path)
    msgs = [{"role": "user", "content": f"m{k}"} for k in range(messages)]
    expected = ("x" * len(range(0, m, 2)) + "|") * n + "".join(f"m{k}" * 2 for k in range(messages)) + "."
    assert tok.render_template(messages=msgs, n=n, m=m) == expected
