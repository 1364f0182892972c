"""Export an adapter as a PEFT LoRA adapter, or a model as a Hugging Face checkpoint.

    python export.py --format peft --adapter out/sora --out peft/sora    # adapter_config.json + adapter_model.safetensors
    python export.py --format hf --out hf/smollm2                        # the base model (default: SmolLM2-135M-Instruct)
    python export.py --format merged --adapter out/sora --out hf/sora    # the model with the adapter merged in

then, with transformers and peft:

    base = AutoModelForCausalLM.from_pretrained("hf/smollm2")
    model = PeftModel.from_pretrained(base, "peft/sora")   # the same logits as this library's model

Every method but Mo-SARA with several heads reduces to a plain LoRA per module (`to_lora`), with its
own rank: the export carries each module's rank in PEFT's `rank_pattern` and folds every scale into
lora_B (alpha = r, so PEFT's alpha / r is 1). Modules pruned to rank 0 are left out. GPT-2's q/k/v
LoRAs of a layer become one LoRA of the fused c_attn (models.weights.hf_lora: exact, rank = the sum).
The output is written into a temporary sibling directory and renamed into place, so a failed export
leaves nothing behind; an existing non-empty --out is replaced only with --force, and never when it
is, holds or lies inside --adapter or --model.
"""
import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import cli
import methods
import models
from models.tokenizer import gguf_to_hf
from models.weights import gguf_fields, gguf_reader, hf_config, hf_lora, hf_state_dict

FORMATS = ("peft", "hf", "merged")
DEFAULT_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub name of the default model
# what a Hugging Face checkpoint directory ships besides its weights and config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", help="the directory to write")
    p.add_argument("--adapter", help="an adapter directory written by train.py (peft and merged)")
    p.add_argument("--model", default=None, help="a .gguf file or HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--base-name", default=None, help="base_model_name_or_path in adapter_config.json (default: "
                   f"{DEFAULT_HF_ID} for the default model, else the --model path)")
    p.add_argument("--dtype", choices=["auto", *models.DTYPES], default="auto", help="the dtype of the exported "
                   "weights (hf, merged: the merge adds ΔW in float32 and rounds once; auto: the fastest of them on this "
                   "CPU, measured); PEFT adapters stay float32")
    p.add_argument("--force", action="store_true", help="replace --out when it exists and is not empty")
    args = p.parse_args(argv)
    if args.format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if not args.out:
        raise ValueError("--out is required: the directory to write")
    if args.format in ("peft", "merged") and not args.adapter:
        raise ValueError(f"--format {args.format} needs --adapter DIR")
    if args.format == "hf" and args.adapter:
        raise ValueError("--format hf exports the model alone: use --format merged to merge --adapter")
    out = Path(args.out)
    for flag, source in (("--adapter", args.adapter), ("--model", args.model)):
        if source and Path(source).exists() and cli.overlaps(out, source):
            raise ValueError(f"--out {out} is, holds or lies inside {flag} {source}: replacing it would "
                             f"destroy what it reads from (--force or not)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out} exists and is not empty (add --force to replace it)")
    if args.adapter:
        methods.read_config(args.adapter)  # fail before the model loads
    return args


# ----------------------------------------------------------------------------- PEFT adapter

def peft_config(factors, base_name, fan_in_fan_out):
    """adapter_config.json for LoRA factors {HF module: (A, B)} whose scale is already in B.

    Target modules are full names, so no pruned module of the same kind is caught by a suffix;
    the most common rank is `r` and the others go to rank_pattern, with alpha = r everywhere."""
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: k for name, k in ranks.items() if k != r}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": pattern,
            "alpha_pattern": pattern, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "fan_in_fan_out": fan_in_fan_out, "inference_mode": True}


def write_peft(out, model, factors, base_name):
    """adapter_model.safetensors under PEFT's key names, and adapter_config.json."""
    from safetensors.torch import save_file

    factors = hf_lora({n: (A.detach().float(), B.detach().float()) for n, (A, B) in factors.items()})
    if not factors:
        raise ValueError("every module of the adapter is pruned to rank 0: there is no LoRA to export")
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()  # (r, in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()  # (out, r)
    methods.atomic_write(out / methods.PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    gpt2 = isinstance(model.cfg, models.GPTConfig)  # HF GPT-2's Conv1D stores weights (in, out)
    methods.write_json(out / methods.PEFT_CONFIG, peft_config(factors, base_name, gpt2))


# ----------------------------------------------------------------------------- Hugging Face checkpoint

def write_hf(out, model, source):
    """config.json + model.safetensors, and the tokenizer: copied from a checkpoint directory, or
    written from a GGUF file's vocabulary (with the bos/eos ids in config.json and generation_config.json)."""
    from safetensors.torch import save_file

    tensors = hf_state_dict(model)
    methods.atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = hf_config(model.cfg, model.lm_head.weight.dtype)
    path = Path(models.resolve(source))
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).exists():
                shutil.copyfile(path / name, out / name)
    else:
        fields = gguf_fields(gguf_reader(path))
        if "tokenizer.ggml.tokens" in fields:
            for name, obj in gguf_to_hf(fields).items():
                methods.write_json(out / name, obj)
        ids = {f"{k}_token_id": fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos")
               if f"tokenizer.ggml.{k}_token_id" in fields}
        config.update(ids)
        methods.write_json(out / "generation_config.json", ids)
    methods.write_json(out / "config.json", config)


# ----------------------------------------------------------------------------- the output directory

def write_dir(out, write):
    """write(tmp) into a new sibling directory, then rename it to `out` (replacing what is there)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = tmp.with_suffix(".old")
    try:
        tmp.chmod(methods.umask_mode(0o777))  # mkdtemp makes it private; the result is an ordinary directory
        write(tmp)
        if out.is_dir() and any(out.iterdir()):
            os.rename(out, old)  # rename(2) replaces only an empty directory
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if old.exists():
        shutil.rmtree(old)


def base_name(args):
    if args.base_name:
        return args.base_name
    return DEFAULT_HF_ID if args.model in (None, "", "default") else str(Path(args.model).resolve())


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype, why = models.pick_dtype(args.dtype, "cpu")  # the merge runs on the CPU
    print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})", flush=True)
    model, _ = models.load(args.model, dtype)
    method = None
    if args.adapter:
        model, meta = methods.load_adapter(model, args.adapter)
        method = methods.get(meta["method"])
    if args.format == "peft":
        factors = method.to_lora(model)  # Mo-SARA with several heads refuses here (ValueError)
        write_dir(args.out, lambda tmp: write_peft(tmp, model, factors, base_name(args)))
    else:
        if method is not None:
            method.merge(model)  # the same refusal for Mo-SARA
        write_dir(args.out, lambda tmp: write_hf(tmp, model, args.model))
    print(f"wrote {args.out} ({args.format})")


if __name__ == "__main__":
    cli.run(main)
