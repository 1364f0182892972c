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
LoRAs of a layer become one LoRA of the fused c_attn (adapters.hf_lora: exact, rank = the sum).
The output is written into a temporary sibling directory and renamed into place, so a failed export
leaves nothing behind; an existing non-empty --out is replaced only with --force, and never when it
is, holds or lies inside --adapter or --model.
"""
import argparse
import shutil
import sys
from pathlib import Path

import adapters
import cli
import files
import methods
import models
from models.tokenizer import gguf_to_hf
from models.weights import gguf_fields, gguf_reader, hf_config, hf_state_dict

FORMATS = ("peft", "hf", "merged")
DEFAULT_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub name of the default model
# what a Hugging Face checkpoint directory ships besides its weights and config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--format", metavar="{" + ",".join(FORMATS) + "}", help="what to write: a PEFT adapter, a "
                   "Hugging Face checkpoint of the model, or the model with the adapter merged (required)")
    p.add_argument("--out", help="the directory to write (required)")
    p.add_argument("--adapter", help="an adapter directory written by train.py (required by peft and merged)")
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
    files.check_replace(args.out, args.force, {"--adapter": args.adapter, "--model": args.model})
    if args.adapter:
        adapters.read_config(args.adapter)  # fail before the model loads
    return args


# ----------------------------------------------------------------------------- Hugging Face checkpoint

def write_hf(out, model, source):
    """config.json + model.safetensors, and the tokenizer: copied from a checkpoint directory, or
    written from a GGUF file's vocabulary (with the bos/eos ids in config.json and generation_config.json)."""
    from safetensors.torch import save_file

    tensors = hf_state_dict(model)
    files.atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = hf_config(model)
    path = Path(models.resolve(source))
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).exists():
                shutil.copyfile(path / name, out / name)
    else:
        fields = gguf_fields(gguf_reader(path))
        if "tokenizer.ggml.tokens" in fields:
            for name, obj in gguf_to_hf(fields).items():
                files.write_json(out / name, obj)
        ids = {f"{k}_token_id": fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos")
               if f"tokenizer.ggml.{k}_token_id" in fields}
        config.update(ids)
        files.write_json(out / "generation_config.json", ids)
    files.write_json(out / "config.json", config)


def base_name(args):
    if args.base_name:
        return args.base_name
    return DEFAULT_HF_ID if args.model in (None, "", "default") else str(Path(args.model).resolve())


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with files.hold(Path(args.out)):  # a train.py run writing into --out holds it too: one of them is refused
        export(args)


def export(args):
    dtype, why = models.pick_dtype(args.dtype, "cpu")  # the merge runs on the CPU
    print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})", flush=True)
    model, _ = models.load(args.model, dtype)
    method = None
    if args.adapter:
        model, meta = adapters.load_adapter(model, args.adapter)
        method = methods.get(meta["method"])
        reason = method.can_merge(model)  # Mo-SARA with several heads has no ΔW to export
        if reason:
            raise ValueError(f"{args.adapter}: {reason}; it cannot be exported as --format {args.format}")
    if args.format == "peft":
        factors = method.to_lora(model)
        files.write_dir(args.out, lambda tmp: adapters.write_peft(tmp, model, factors, base_name(args)))
    else:
        if method is not None:
            method.merge(model)
        files.write_dir(args.out, lambda tmp: write_hf(tmp, model, args.model))
    print(f"wrote {args.out} ({args.format})")


if __name__ == "__main__":
    cli.run(main)
