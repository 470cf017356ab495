"""Per-token CPU overhead of the grammar libraries a structured-output sampler could use (llguidance, xgrammar,
outlines-core), measured side by side on one JSON schema (nesting, an enum, an array of objects).

A 32k byte-level BPE vocabulary is trained on the Python standard library's sources (the offline stand-in for a
real LLM's vocabulary); each library then masks the next token's logits, a random allowed token is taken (an
untrained model), and the matcher advances, for 5 answers of up to 200 tokens. Only the libraries' own calls are
timed (mask + apply + advance), plus the schema's compile time.

    pip install llguidance xgrammar outlines-core   # into an environment that already has torch
    python scripts/grammar_overhead.py [--vocab 32000]
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "kind": {"enum": ["invoice", "receipt", "form"]},
        "total": {"type": "number"},
        "items": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 10}, "qty": {"type": "integer"}},
                "required": ["name", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "kind", "total", "items"],
    "additionalProperties": False,
}


def train_tokenizer(vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:400]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train(files, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    hf.save_pretrained(out)
    return hf


N_RUNS = 5
rng = random.Random(0)
tok = None  # set by main()
V = 0


def run(name, make, step):
    state = make()
    tokens = 0
    t_sum = 0.0
    outs = []
    for r in range(N_RUNS):
        st = make() if r else state
        logits = torch.randn(V)
        ids = []
        for _ in range(200):
            allowed, spent = step(st, logits.clone(), ids)
            t_sum += spent
            if allowed is None:
                break
            ids.append(allowed)
            tokens += 1
        outs.append(tok.decode(ids))
    ok = 0
    for o in outs:
        try:
            d = json.loads(o)
            ok += d["kind"] in ("invoice", "receipt", "form")
        except Exception:
            pass
    print(f"{name:14s} per token {t_sum / tokens * 1e6:8.1f} us   tokens {tokens}   parsed {ok}/{N_RUNS}")
    print("   e.g.", outs[0][:120])


def llg():
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok = llguidance.hf.from_tokenizer(tok)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    llguidance.LLMatcher(lltok, grammar)
    print("llguidance compile ms", (time.perf_counter() - t0) * 1e3)

    def make():
        m = llguidance.LLMatcher(lltok, grammar)
        return m, lt.allocate_token_bitmask(1, V)

    def step(st, logits, ids):
        m, bm = st
        if m.is_stopped():
            return None, 0.0
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask(m, bm, 0)
        lt.apply_token_bitmask_inplace(logits.unsqueeze(0), bm)
        spent = time.perf_counter() - t0
        allowed = torch.isfinite(logits).nonzero().flatten().tolist()
        t = rng.choice(allowed)
        if t == tok.eos_token_id:
            return None, spent
        t0 = time.perf_counter()
        m.consume_token(t)
        spent += time.perf_counter() - t0
        return t, spent

    run("llguidance", make, step)


def xgr():
    import xgrammar as x

    info = x.TokenizerInfo.from_huggingface(tok, vocab_size=V)
    t0 = time.perf_counter()
    compiled = x.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    print("xgrammar compile ms", (time.perf_counter() - t0) * 1e3)

    def make():
        return x.GrammarMatcher(compiled), x.allocate_token_bitmask(1, V)

    def step(st, logits, ids):
        m, bm = st
        if m.is_terminated():
            return None, 0.0
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(bm)
        x.apply_token_bitmask_inplace(logits.unsqueeze(0), bm)
        spent = time.perf_counter() - t0
        allowed = torch.isfinite(logits).nonzero().flatten().tolist()
        t = rng.choice(allowed)
        if t == tok.eos_token_id:
            return None, spent
        t0 = time.perf_counter()
        m.accept_token(t)
        spent += time.perf_counter() - t0
        return t, spent

    run("xgrammar", make, step)


def olc():
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    vocab = {}
    for s, i in tok.get_vocab().items():
        if i == tok.eos_token_id or s in tok.all_special_tokens:
            continue
        vocab.setdefault(tok.convert_tokens_to_string([s]), []).append(i)
    t0 = time.perf_counter()
    index = Index(regex, Vocabulary(tok.eos_token_id, vocab))
    print("outlines-core compile ms", (time.perf_counter() - t0) * 1e3)

    def make():
        return Guide(index)

    def step(g, logits, ids):
        if g.is_finished():
            return None, 0.0
        t0 = time.perf_counter()
        allowed = g.get_tokens()
        mask = torch.full((V,), float("-inf"))
        mask[torch.tensor(allowed)] = 0
        logits += mask
        spent = time.perf_counter() - t0
        t = rng.choice(allowed)
        if t == tok.eos_token_id:
            return None, spent
        t0 = time.perf_counter()
        g.advance(t)
        spent += time.perf_counter() - t0
        return t, spent

    run("outlines-core", make, step)


def main() -> None:
    global tok, V
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(args.vocab, Path(d))
    V = len(tok)
    print(f"vocabulary {V}; schema {json.dumps(SCHEMA)[:80]}…")
    for f in (llg, xgr, olc):
        try:
            f()
        except ImportError as e:
            print(f"{f.__name__}: not installed ({e})")


if __name__ == "__main__":
    main()
