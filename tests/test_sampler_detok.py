"""The engine's parts that need no model: the batched sampler (per-row settings, seeds drawn as if alone,
top-k, top-p, on CUDA too) and the incremental detokenizer (the text of a full decode, a short window per
token, stop strings and incomplete characters held back).

python -m pytest tests/test_sampler_detok.py -q
"""

from __future__ import annotations

import pytest
import torch

from nvlm.inference.detok import Detokenizer
from nvlm.inference.sampler import RowSettings, sample, sample_next


def _logits(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def test_rows_with_their_own_seeds_draw_what_they_draw_alone():
    logits = _logits(4)
    temps, top_p = [0.0, 0.9, 1.3, 0.7], [1.0, 0.9, 1.0, 0.5]
    gens = [None, _gen(7), _gen(8), None]
    rows = RowSettings.of(temps, top_p, [0, 0, 0, 0], gens, logits.device)
    draws = [sample(logits.clone(), rows) for _ in range(20)]
    g1, g2 = _gen(7), _gen(8)
    for step in range(20):
        assert int(draws[step][0]) == int(logits[0].argmax())  # the greedy row
        assert int(draws[step][1]) == int(sample_next(logits[1:2].clone(), True, 0.9, 0.9, g1)[0])
        assert int(draws[step][2]) == int(sample_next(logits[2:3].clone(), True, 1.3, 1.0, g2)[0])
    assert len({int(d[2]) for d in draws}) > 1  # it really samples


def test_top_k_and_top_p_limit_the_draws():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3))
    rows = RowSettings.of([1.0, 1.0, 1.0], [1.0, 0.6, 1.0], [2, 0, 0], [_gen(1)] * 3, logits.device)
    seen: list[set[int]] = [set(), set(), set()]
    for _ in range(300):
        for i, t in enumerate(sample(logits.clone(), rows).tolist()):
            seen[i].add(t)
    assert seen == [{0, 1}, {0, 1}, {0, 1, 2, 3}]


def test_top_k_past_the_vocabulary_keeps_every_token():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    rows = RowSettings.of([1.0], [1.0], [55883], [_gen(1)], logits.device)
    assert {int(sample(logits.clone(), rows)) for _ in range(300)} == {0, 1, 2, 3}


def test_one_generator_for_all_rows_draws_them_together():
    """generate(seed=…) over a batch: one stream, drawn as one multinomial over the rows (as before)."""
    logits = _logits(3, seed=2)
    g = _gen(5)
    got = sample(logits.clone(), RowSettings.of([0.8] * 3, [1.0] * 3, [0] * 3, [g] * 3, logits.device))
    want = torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=_gen(5)).squeeze(-1)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seeded_rows_sample_on_cuda_and_repeat():
    logits = _logits(3).cuda()

    def draw() -> torch.Tensor:
        gens = [_gen(3, "cuda"), None, _gen(4, "cuda")]  # each seeded row's stream lives on the logits' device
        return sample(logits.clone(), RowSettings.of([0.9] * 3, [0.95] * 3, [0] * 3, gens, logits.device))

    a, b = draw(), draw()
    assert a.device.type == "cuda" and a[0] == b[0] and a[2] == b[2]


class _CountingTokenizer:
    """A tokenizer stand-in: id i is the UTF-8 byte i; records how many ids each decode call gets."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_text_equals_a_full_decode_and_decodes_a_short_window():
    text = "héllo wörld ✓ " * 40
    ids = list(text.encode())
    tok = _CountingTokenizer()
    d = Detokenizer(tok, [], [])
    for i in ids:
        d.add(i)
    d.flush()
    assert d.text == text
    assert max(tok.calls) <= 4  # a window of at most one character's bytes + 1, at any answer length


def test_stop_strings_cut_and_hold_back_and_incomplete_characters_wait():
    tok = _CountingTokenizer()
    d = Detokenizer(tok, ["END"], [0])
    for i in b"ab EN":
        d.add(i)
    assert d.text == "ab EN" and d.safe_len() == 3  # "EN" may still become "END"
    d.add("é".encode()[0])  # half a character: not text yet
    assert d.text == "ab EN" and not d.finished
    d.add("é".encode()[1])
    assert d.text == "ab ENé" and d.safe_len() == len("ab ENé")
    for i in b"xEND tail":
        d.add(i)
    assert d.finished and d.text == "ab ENéx"
    e = Detokenizer(tok, [], [0])
    e.add("é".encode()[0])
    e.add(0)  # eos: what is held back is the answer's end, as a full decode shows it
    assert e.finished and e.text == "\ufffd"
