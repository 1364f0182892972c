"""Evaluate the base model and adapters on the same test set: one table row each.

    python eval.py --adapter out/lora out/sora            # accuracy on the built-in task's test split
    python eval.py --data test.json --limit 100 --json results.json
    python eval.py --text prose.txt --adapter out/lora    # perplexity of a plain-text file
    python eval.py --adapter runs/* --limit 200 --markdown # also print the README's results table
    python eval.py --plot figs --adapter runs/*           # figures (plots.py) instead of evaluating

Generation is greedy, batched, with the KV cache; adapters that reduce to LoRA are merged first,
so they run at the base model's speed.
"""
import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

import data
import methods
import models
import plots


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", nargs="*", default=[], help="adapter directories written by train.py, or PEFT LoRA adapters")
    p.add_argument("--model", default=None, help="a .gguf file or HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="LLM-Adapters .json/.jsonl test file (default: the built-in task)")
    p.add_argument("--text", default=None, help="a plain-text file: report perplexity instead of accuracy")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--no-base", action="store_true", help="skip the base model's row")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--markdown", action="store_true", help="also print the rows as the README's results table")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help=f"write the adapters' figures into DIR instead of evaluating (needs {plots.MATPLOTLIB})")
    args = p.parse_args(argv)
    if args.plot:
        if args.text or not args.adapter:
            raise ValueError("--plot draws the figures of the --adapter directories over the test examples: "
                             "give at least one and leave out --text")
        plots.pyplot()  # a missing matplotlib fails before the model loads
    for name in ("batch_size", "max_new_tokens", "seq_len"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.limit is not None and args.limit <= 0:
        raise ValueError("--limit must be positive")
    for d in args.adapter:  # fail before the model loads
        methods.read_config(d)
    return args


def accuracy(model, tok, examples, batch_size, max_new_tokens):
    """Share of examples whose generated answer matches the gold one."""
    order = sorted(examples, key=lambda ex: len(ex.question))  # similar lengths batch with less padding
    correct = 0
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        outs = model.generate([tok.prompt(ex.question) for ex in chunk], max_new_tokens, stop_tokens=tok.stop)
        correct += sum(data.is_correct(tok.decode(out), ex.answer) for ex, out in zip(chunk, outs))
    return correct / len(examples)


@torch.no_grad()
def perplexity(model, tok, text, seq_len):
    """exp(mean next-token loss) over consecutive windows of the text."""
    ids = tok.encode(text)
    if len(ids) < 2:
        raise data.DataError("the text file holds fewer than two tokens")
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, seq_len):
        chunk = torch.tensor([ids[s:s + seq_len + 1]])
        n = chunk.size(1) - 1
        total += model.loss(chunk[:, :-1], chunk[:, 1:]).item() * n
        count += n
    return math.exp(total / count)


def with_adapter(base, adapter_dir):
    """A copy of the base model with the adapter loaded (merged when the method allows)."""
    model = copy.deepcopy(base)
    methods.load_adapter(model, adapter_dir)
    trainable = sum(t.numel() for k, t in model.named_parameters() if "lora_" in k)
    name = methods.read_config(adapter_dir)["method"]
    try:
        methods.get(name).merge(model)
    except ValueError:  # input-dependent adapters (Mo-SARA with several heads) stay unmerged
        pass
    return model.eval(), trainable, name


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    base, tok = models.load(args.model)
    data.need_tokenizer(tok)
    base_params = sum(p.numel() for p in base.parameters())
    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise data.DataError(f"cannot read {args.text}: {e}") from None
    else:
        examples = data.load_split(args.data, "test")[:args.limit]
    if args.plot:
        model_name = Path(models.resolve(args.model)).stem
        for path in plots.write_all(args.plot, base, tok, args.adapter, examples, model_name):
            print(f"wrote {path}")
        return []

    candidates = ([] if args.no_base else [("base", None)]) + [(Path(d).name, d) for d in args.adapter]
    rows = []
    for name, adapter_dir in candidates:
        model, trainable, method = (base, 0, "base") if adapter_dir is None else with_adapter(base, adapter_dir)
        t = time.time()
        row = {"name": name, "method": method, "trainable_params": trainable,
               "share": 100 * trainable / base_params, **({} if adapter_dir is None else plots.run_facts(adapter_dir))}
        if args.text:
            row["perplexity"] = perplexity(model, tok, text, args.seq_len)
        else:
            row["accuracy"] = accuracy(model, tok, examples, args.batch_size, args.max_new_tokens)
            row["n"] = len(examples)
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        print_row(row, first=len(rows) == 1)
    if args.json:
        methods.write_json(args.json, rows)
    if args.markdown:
        print("\n".join(plots.markdown_table(rows)))
    return rows


def print_row(row, first):
    metric = "perplexity" if "perplexity" in row else "accuracy"
    if first:
        print(f"{'name':<16} {'method':<8} {'trainable':>10} {'% of base':>9} {metric:>10} {'seconds':>8}")
    value = f"{row['perplexity']:.3f}" if metric == "perplexity" else f"{100 * row['accuracy']:.1f}%"
    print(f"{row['name']:<16} {row['method']:<8} {row['trainable_params']:>10,} {row['share']:>9.4f} "
          f"{value:>10} {row['seconds']:>8}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, models.LoadError, data.DataError, methods.AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
