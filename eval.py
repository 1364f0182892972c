"""Evaluate the base model and adapters on the same test set: one table row each.

    python eval.py --adapter out/lora out/sora            # accuracy on the built-in task's test split
    python eval.py --data test.json --limit 100 --json results.json
    python eval.py --data MATH_DIR --adapter out/sara       # a column per MATH_DIR/test_<set>.json
    python eval.py --task commonsense --limit 100 --adapter out/lora    # see benchmarks.py
    python eval.py --text prose.txt --adapter out/lora    # perplexity of a plain-text file
    python eval.py --data held_out.jsonl --adapter out/lora  # loss and perplexity of chats or texts
    python eval.py --adapter runs/* --limit 200 --markdown # also print the README's results table
    python eval.py --adapter out/lora --limit 20 --show 3  # and three completions per row
    python eval.py --plot figs --adapter runs/*           # figures (plots.py) instead of evaluating

Generation is greedy, batched, with the KV cache; adapters that reduce to LoRA are merged first,
so they run at the base model's speed.
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

import adapters
import benchmarks
import cli
import data
import files
import methods
import models
import plots

OWN_KINDS = ("messages", "text")  # --data files scored by their loss: chats (assistant turns) and texts
SEQ_LEN = 512  # the perplexity window where the model's context is longer


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--adapter", nargs="*", default=[], help="adapter directories written by train.py, or PEFT "
                   "LoRA adapters (default: none, the base model alone)")
    p.add_argument("--model", default=None, help="a .gguf file or HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", default=None, help="LLM-Adapters .json/.jsonl test file (accuracy), a "
                        'held-out .jsonl of {"messages": ...} chats or {"text": ...} texts (loss and perplexity: '
                        "a chat's assistant turns, every token of a text), or a directory of test_<set>.json "
                        "files (default: the built-in task)")
    source.add_argument("--task", choices=benchmarks.TASKS, default=None,
                        help="a paper benchmark (see benchmarks.py; default: none)")
    source.add_argument("--text", default=None, help="a plain-text file: report perplexity instead of accuracy "
                        "(default: none)")
    p.add_argument("--limit", type=int, default=None, help="N examples per test set, a seeded sample (the "
                   "built-in task: its first N); with perplexity, the first N windows of each text; default: all")
    p.add_argument("--prompt", choices=data.PROMPTS, default=None, help="prompt template (default: the one "
                   "the adapters were trained with, else the data's: chat for the built-in task, alpaca otherwise)")
    p.add_argument("--no-base", action="store_true", help="skip the base model's row")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated at once")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="the longest answer (default: 64 on the built-in task, 256 on LLM-Adapters data, 32 on "
                   "commonsense)")
    p.add_argument("--seq-len", type=int, default=None, help=f"perplexity window in tokens, at most the model's "
                   f"context (default: {SEQ_LEN}, or the model's context where it is shorter)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *models.DTYPES], default="auto", help="the model's dtype; adapters "
                   "keep float32 parameters (auto: the fastest of them on this device, measured)")
    p.add_argument("--show", type=int, default=None, metavar="N",
                   help="print the completions of the first N examples of each test set, for every row (default: none)")
    p.add_argument("--json", default=None, help="also write the rows to this file (default: no file)")
    p.add_argument("--markdown", action="store_true", help="also print the rows as the README's results table")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help=f"write the adapters' figures into DIR instead of evaluating (needs {plots.MATPLOTLIB}; "
                   "default: evaluate)")
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = benchmarks.default_max_new_tokens(args.data, args.task)
    scored = args.text or args.task == "shakespeare" or args.data and data.kind_of(args.data) in OWN_KINDS
    if args.plot:
        if scored or not args.adapter:
            raise ValueError("--plot draws the figures of the --adapter directories over test examples: "
                             "give at least one and leave out --text, --task shakespeare and chat or text data")
        plots.pyplot()  # a missing matplotlib fails before the model loads
    cli.positive(args, "batch_size", "max_new_tokens", "seq_len", "limit", "show")
    cli.check_device(args.device)
    if args.show and scored:
        raise ValueError("--show prints generated answers, and perplexity generates none: leave it out")
    if args.json:
        check_json(args.json)  # before the evaluation, not after it
    configs = {d: adapters.read_config(d) for d in args.adapter}  # fail before the model loads
    for d in args.adapter:  # and before the base row, whose results a bad summary would lose
        adapters.read_summary(d)
    args.prompt = args.prompt or trained_prompt(configs) or benchmarks.default_prompt(args.data, args.task)
    return args


def check_json(path):
    """Refuse a --json file that cannot be written, or whose writing would replace a file eval.py did
    not write: only its own results (a JSON list of rows) are replaced, never a link or another file."""
    files.writable(path, "--json")
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"--json {path} is a symbolic link, not a results file: give another file name")
    if path.exists() and not results_file(path):
        raise ValueError(f"--json {path} exists and is not a results file of eval.py (a JSON list of rows): "
                         "give another file name, or delete it")


def results_file(path):
    """Whether `path` holds what eval.py writes with --json: a list of rows (a few KB; a file of more
    than 64 MiB, such as a model's weights, is not read)."""
    try:
        if path.stat().st_size > 1 << 26:
            return False
        rows = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and {"name", "method", "sets"} <= r.keys() for r in rows)


def trained_prompt(configs):
    """The prompt template the adapters ({directory: config.json's content}) were trained with
    (train.py records it), so that every row of the table, the base model's too, sees the prompts the
    adapters learnt on."""
    for adapter_dir, c in configs.items():
        if c.get("train_args", {}).get("prompt") not in (None, *data.PROMPTS):
            raise adapters.AdapterError(f"{adapter_dir}/config.json is not an adapter config (its prompt is "
                                        f"none of {', '.join(data.PROMPTS)})")
    styles = {c.get("train_args", {}).get("prompt") for c in configs.values()} - {None}
    if len(styles) > 1:
        raise ValueError(f"the adapters were trained with different prompt templates ({', '.join(sorted(styles))}): "
                         "evaluate them separately or pass --prompt")
    return styles.pop() if styles else None


def accuracy(model, tok, examples, style, batch_size, max_new_tokens, show=0):
    """(share of examples whose generated answer matches the gold one, the completions of the
    first `show` examples)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].question))  # less padding
    correct, shown = 0, {}
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        outs = model.generate([data.prompt(tok, examples[i], style) for i in chunk], max_new_tokens,
                              stop_tokens=tok.stop)
        for i, out in zip(chunk, outs):
            completion = tok.decode(out)
            correct += data.is_correct(completion, examples[i].answer)
            if i < show:
                shown[i] = completion
    return correct / len(examples), [shown[i] for i in sorted(shown)]


def print_completions(set_name, examples, completions):
    for i, (ex, completion) in enumerate(zip(examples, completions), 1):
        verdict = "right" if data.is_correct(completion, ex.answer) else "wrong"
        print(f"  {set_name} #{i} ({verdict}, gold {ex.answer}) {ex.question!r}\n    -> {completion!r}")


@torch.no_grad()
def perplexity(model, held_out, batch_size):
    """exp(mean next-token loss) over {name: encoded (ids, targets) pairs}: the windows of a text
    (every token a target) or chats (their assistant turns): ({name: perplexity}, the perplexity over
    all of them, their mean loss per target token)."""
    per_set, total, count = {}, 0.0, 0
    for name, encoded in held_out.items():
        nll, n = 0.0, 0
        for s in range(0, len(encoded), batch_size):
            x, y = (t.to(model.lm_head.weight.device) for t in data.collate(encoded[s:s + batch_size]))
            k = int((y != -100).sum())
            nll += model.loss(x, y).item() * k
            n += k
        per_set[name] = math.exp(nll / n)
        total, count = total + nll, count + n
    return per_set, math.exp(total / count), total / count


def held_out_sets(args, tok):
    """{name: encoded pairs} to score by perplexity, or None where the data is answered (accuracy):
    --text, Shakespeare's held-out plays, or a --data file of chats or texts (its first --limit
    records; a text's first --limit windows)."""
    if args.text:
        try:
            texts = {Path(args.text).stem: Path(args.text).read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as e:
            raise data.DataError(f"cannot read {args.text}: {e}") from None
    elif args.task == "shakespeare":
        texts = benchmarks.shakespeare("test")
    elif args.data and data.kind_of(args.data) in OWN_KINDS:
        items = data.load_items(args.data)[:args.limit]
        return {Path(args.data).stem: data.encode_all(tok, items, args.seq_len)}
    else:
        return None
    return {name: data.chunks(tok, [text], args.seq_len)[:args.limit] for name, text in texts.items()}


def with_adapter(base, adapter_dir):
    """(a copy of the base model with the adapter loaded, merged when the method allows; its
    trainable count; its config.json)."""
    model, meta = adapters.load_adapter(copy.deepcopy(base), adapter_dir)
    trainable = sum(t.numel() for k, t in model.named_parameters() if "lora_" in k)
    method = methods.get(meta["method"])
    if method.can_merge(model) is None:  # an input-dependent adapter (Mo-SARA with several heads) runs unmerged
        method.merge(model)
    return model.eval(), trainable, meta


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, why = models.pick_dtype(args.dtype, device)
    print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})", flush=True)
    base, tok = models.load(args.model, dtype)
    data.need_tokenizer(tok)
    context = base.cfg.max_seq_len  # a window past it: GPT-2 has no such position, RoPE scores it regardless
    if args.seq_len is not None and args.seq_len > context:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context of {context} tokens")
    args.seq_len = args.seq_len or min(SEQ_LEN, context)
    for adapter_dir in args.adapter:  # a wrong adapter fails now, not after the rows before it
        adapters.check_adapter(base, adapter_dir)
    base_params = sum(p.numel() for p in base.parameters())
    texts = held_out_sets(args, tok)
    if texts is None:
        sets = benchmarks.sets(args.data, args.task, "test", args.limit)
    if args.plot:
        examples = [ex for examples in sets.values() for ex in examples]
        model_name = Path(models.resolve(args.model)).stem
        for path in plots.write_all(args.plot, base, tok, args.adapter, examples, model_name):
            print(f"wrote {path}")
        return []

    base.to(device)  # after the figures, which plots.py draws on the CPU
    candidates = ([] if args.no_base else [("base", None)]) + [(Path(d).name, d) for d in args.adapter]
    rows = []
    for name, adapter_dir in candidates:
        model, trainable, meta = (base, 0, None) if adapter_dir is None else with_adapter(base, adapter_dir)
        t = time.time()
        row = {"name": name, "method": meta["method"] if meta else "base", "trainable_params": trainable,
               "share": 100 * trainable / base_params, **(plots.run_facts(adapter_dir, meta) if meta else {})}
        shown = {}  # set -> the completions --show prints
        if texts:
            row["sets"], row["perplexity"], row["loss"] = perplexity(model, texts, args.batch_size)
        else:
            row["sets"] = {}
            for s, examples in sets.items():
                row["sets"][s], shown[s] = accuracy(model, tok, examples, args.prompt, args.batch_size,
                                                    args.max_new_tokens, args.show or 0)
            row["accuracy"] = sum(row["sets"].values()) / len(sets)  # the papers' Avg.: every set weighs the same
            row["n"] = sum(len(examples) for examples in sets.values())
        seconds = time.time() - t
        row["seconds"] = round(seconds, 1)
        if "n" in row:
            row["examples_per_s"] = round(row["n"] / seconds, 2)
        rows.append(row)
        print_row(row, first=len(rows) == 1)
        for s, completions in shown.items():
            print_completions(s, sets[s], completions)
    if args.json:
        check_json(args.json)  # again: the evaluation took a while, and the place may hold another file now
        files.write_json(args.json, rows)
    if args.markdown:
        print("\n".join(plots.markdown_table(rows)))
    return rows


def print_row(row, first):
    """One table row; with several test sets, a column each and then their average (or, for
    perplexity, the perplexity over all of them), as the papers' tables have."""
    metric = "perplexity" if "perplexity" in row else "accuracy"
    sets = row["sets"] if len(row["sets"]) > 1 else {}
    columns = [*sets, "all" if metric == "perplexity" else "avg"] if sets else [metric]
    values = [*sets.values(), row[metric]]
    shown = [f"{v:.3f}" if metric == "perplexity" else f"{100 * v:.1f}%" for v in values]
    if "loss" in row:  # the mean loss per target token, as train.py's val loss reads
        columns, shown = [*columns, "loss"], [*shown, f"{row['loss']:.4f}"]
    widths = [max(7, len(c)) for c in columns]
    if first:
        heads = " ".join(f"{c:>{w}}" for c, w in zip(columns, widths))
        print(f"{'name':<16} {'method':<8} {'trainable':>10} {'% of base':>9} {heads} {'seconds':>8}")
    cells = " ".join(f"{v:>{w}}" for v, w in zip(shown, widths))
    print(f"{row['name']:<16} {row['method']:<8} {row['trainable_params']:>10,} {row['share']:>9.4f} "
          f"{cells} {row['seconds']:>8}", flush=True)


if __name__ == "__main__":
    cli.run(main)
