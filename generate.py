"""Generate text with the base model or an adapter, streamed to stdout as it is decoded.

    python generate.py "What is 17 + 25?"                        # the default model, in its chat template
    python generate.py --adapter out/sora "What is 17 + 25?"     # with an adapter (train.py's or a PEFT export)
    python generate.py --raw "Once upon a time"                   # a plain continuation, no template
    python generate.py --temperature 0.7 --top-k 50 --seed 1 "Write a haiku about rain"
    python generate.py --chat --adapter out/sora                  # a conversation: a line in, an answer out

stdout carries the generated text alone (the dtype and the template used go to stderr), so it pipes.
The prompt goes in the template the adapter was trained with (train.py records it: the model's chat
template, Alpaca's, or none for plain text), else in the model's chat template when it has one;
--raw sends it as it is. --temperature 0 (the default) decodes greedily, as eval.py does: the same
prompt gives the same text. Adapters that reduce to LoRA are merged first, as in eval.py.

--chat reads one user turn per line from stdin and streams each answer on its own line; the
conversation stays in the model's chat template, its oldest turns dropped when it outgrows the
model's context. Blank lines are skipped; end of input (Ctrl-D) or Ctrl-C ends the chat (status 0).
"""
import argparse
import codecs
import sys

import torch

import cli
import data
import eval as evaluate
import adapters
import models
import training


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("prompt", nargs="?", default=None, help="the text to answer or continue (leave it out with --chat)")
    p.add_argument("--adapter", default=None, help="an adapter directory written by train.py, or a PEFT LoRA "
                   "adapter (default: none, the base model alone)")
    p.add_argument("--model", default=None,
                   help="a .gguf file or HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--chat", action="store_true", help="a conversation: read a user turn per line from stdin")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without a template")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="at most this many tokens per answer; it ends sooner at the model's stop token (default: 256)")
    p.add_argument("--temperature", type=training.finite, default=0.0,
                   help="sampling temperature; 0 picks the likeliest token every time (default: 0, greedy)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k likeliest tokens only (default: among all of them)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling, for a repeatable draw (default: a new draw each run)")
    p.add_argument("--dtype", choices=["auto", *models.DTYPES], default="auto", help="the model's dtype; adapters "
                   "keep float32 parameters (auto: the fastest of them on this CPU, measured)")
    args = p.parse_args(argv)
    cli.positive(args, "max_new_tokens", "top_k")
    cli.non_negative(args, "temperature")
    if args.chat and args.prompt is not None:
        raise ValueError("--chat reads the user's turns from stdin: leave out the prompt")
    if args.chat and args.raw:
        raise ValueError("--chat keeps the conversation in the chat template: leave out --raw")
    if not args.chat and not args.prompt:
        raise ValueError('give a prompt (python generate.py "What is 2 + 3?"), or --chat for a conversation')
    if args.top_k is not None and args.temperature == 0:
        raise ValueError("--top-k limits sampling, and --temperature 0 does not sample: give a temperature above 0")
    args.meta = adapters.read_config(args.adapter) if args.adapter else None  # fail before the model loads
    return args


def note(*args):
    print(*args, file=sys.stderr, flush=True)


def load(args):
    """(model, tokenizer): the base model in --dtype, with the adapter loaded (and merged where it can
    be) when one is given."""
    dtype, why = models.pick_dtype(args.dtype, "cpu")
    note(f"dtype: {str(dtype).removeprefix('torch.')} ({why})")
    model, tok = models.load(args.model, dtype)
    data.need_tokenizer(tok)
    if args.adapter:
        adapters.check_adapter(model, args.adapter)
        model = evaluate.with_adapter(model, args.adapter)[0]
    return model, tok


def has_chat(tok):
    return tok.chat is not None or tok.template is not None


def prompt_style(args, tok):
    """(template, why): "raw", "chat" or "alpaca" for a single prompt."""
    if args.raw:
        return "raw", "--raw"
    trained = args.meta.get("train_args", {}) if args.meta else {}
    if "prompt" in trained:  # train.py records the template, None for plain text
        return trained["prompt"] or "raw", "the adapter was trained with it"
    return ("chat", "the model's") if has_chat(tok) else ("raw", "the model has no chat template")


def prompt_ids(tok, text, style):
    if style == "raw":
        return tok.encode(text)
    return data.prompt(tok, data.Example(question=text, response="", answer=""), style)


class Stream:
    """Token ids in, text out as soon as it is whole: each token's bytes go through an incremental
    UTF-8 decoder, so a character split over tokens is written once, complete; the text written is
    tok.decode of the ids (invalid bytes as U+FFFD)."""

    def __init__(self, tok, out):
        self.tok, self.out, self.pieces = tok, out, []
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, row, token):  # generate()'s on_token; one prompt, so row is 0
        self.write(self.utf8.decode(self.tok.enc.decode_single_token_bytes(token)))

    def write(self, piece):
        if piece:
            self.pieces.append(piece)
            self.out.write(piece)
            self.out.flush()

    def close(self):
        """Flush what is left (bytes of an unfinished character) and end the line; the whole text."""
        self.write(self.utf8.decode(b"", final=True))
        self.out.write("\n")
        self.out.flush()
        return "".join(self.pieces)


def answer(model, tok, ids, args, out):
    """Generate from prompt `ids`, streaming the text to `out`; returns it."""
    stream = Stream(tok, out)
    try:
        model.generate([ids], args.max_new_tokens, args.temperature, args.top_k, tok.stop, on_token=stream)
    except KeyboardInterrupt:
        stream.close()  # the line ends where the answer stopped
        raise
    return stream.close()


def conversation_ids(tok, messages, room):
    """Token ids of the conversation, ending where the assistant's answer starts: at most `room` of
    them, its oldest exchanges (a user turn and its answer) dropped from `messages` until it fits."""
    while True:
        ids = tok.encode_chat(tok.render(messages, add_generation_prompt=True))
        if len(ids) <= room:
            return ids
        if len(messages) == 1:
            raise ValueError(f"this message takes {len(ids)} tokens with its template, more than the {room} "
                             "the model's context leaves beside --max-new-tokens: shorten it")
        del messages[:2]
        note("(the conversation outgrew the model's context: its oldest exchange was dropped)")


def chat(model, tok, args, stdin, out):
    """The conversation loop; returns the messages kept."""
    if not has_chat(tok):
        raise ValueError("this model has no chat template, so --chat cannot hold a conversation: "
                         "give a single prompt instead")
    if args.meta and args.meta.get("train_args", {}).get("prompt", "chat") != "chat":
        note("(the adapter was trained without the chat template; --chat uses it all the same)")
    room, messages = model.cfg.max_seq_len - args.max_new_tokens, []
    if room <= 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room in the model's context of "
                         f"{model.cfg.max_seq_len} tokens for the conversation: lower it")
    try:
        while True:
            if stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            kept = messages[:]
            messages.append({"role": "user", "content": line.rstrip("\r\n")})
            try:
                ids = conversation_ids(tok, messages, room)
                messages.append({"role": "assistant", "content": answer(model, tok, ids, args, out)})
            except ValueError as e:  # this turn is too long, or the template refuses it: the chat goes on
                note(f"error: {e}")
                messages[:] = kept
    except KeyboardInterrupt:
        note("")  # the terminal's line ends; the chat ends as at the end of input
    return messages


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model, tok = load(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.chat:
        return chat(model, tok, args, sys.stdin, sys.stdout)
    style, why = prompt_style(args, tok)
    note(f"template: {'none' if style == 'raw' else style} ({why})")
    return answer(model, tok, prompt_ids(tok, args.prompt, style), args, sys.stdout)


if __name__ == "__main__":
    cli.run(main)
