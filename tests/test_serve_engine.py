"""The continuous-batching engine without HTTP: per-request output equals ``model.generate`` whatever else is
in the batch (D, X, H; requests arriving at different steps), seeded sampling, cancellation, the bounded queue.

python -m pytest tests/test_serve_engine.py -q
"""

from __future__ import annotations

import time

import pytest
from conftest import picture, set_gates

from nvlm.data.chat import chat_prompt
from nvlm.serve.engine import Engine, QueueFull, SamplingParams


def _wait(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def _record_batch_sizes(model):
    sizes = []
    orig = model.forward

    def forward(*args, **kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        sizes.append((tuple(ids.shape), "position_ids" in kwargs))  # decoding steps count positions, prefills not
        return orig(*args, **kwargs)

    model.forward = forward
    return sizes


PROMPTS = [
    (chat_prompt("Describe.", 1), [picture(150, 100)]),
    (chat_prompt("Hi", 0), []),
    (chat_prompt("Compare the two.", 2), [picture(120, 60, 1), picture(50, 50, 2)]),
    (chat_prompt("What is 2+2?", 0), []),
    (chat_prompt("One more", 1), [picture(60, 140, 3)]),
]


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_engine_equals_generate_with_staggered_arrivals(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)  # the blocks really change the output
    budgets = [14, 9, 12, 6, 10]
    want = [model.generate(processor, p, im, max_new_tokens=n) for (p, im), n in zip(PROMPTS, budgets)]
    sizes = _record_batch_sizes(model)
    engine = Engine(model, processor, max_batch=3, max_queue=8).start()
    try:

        def submit(i):
            return engine.submit(*PROMPTS[i], SamplingParams(max_tokens=budgets[i]))

        with engine.hold():  # r0 and r1 arrive together: one batched prefill
            reqs = [submit(0), submit(1)]
        _wait(lambda: len(reqs[0].output_ids) >= 3)  # r2 joins a batch already 3 steps into decoding
        reqs.append(submit(2))
        _wait(lambda: len(reqs[2].output_ids) >= 2)
        reqs += [submit(3), submit(4)]  # the batch is full: they wait until rows leave
        got = [r.result() for r in reqs]
    finally:
        engine.close()
    assert got == want
    assert [len(r.output_ids) for r in reqs] == budgets  # tiny random models never hit EOS this early
    decode_sizes = [shape[0] for shape, cached in sizes if cached]
    assert max(decode_sizes) == 3 and min(decode_sizes) == 1  # rows really joined and left mid-flight
    prefill_sizes = [shape[0] for shape, cached in sizes if not cached]
    assert max(prefill_sizes) >= 2  # new requests were prefilled together


def test_engine_seeded_sampling_and_stop_strings_match_generate(build_model):
    model, processor = build_model("H")
    set_gates(model, 0.5)
    p, im = PROMPTS[0]
    want = model.generate(processor, p, im, max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, seed=7)
    ref = model.generate(processor, p, im, max_new_tokens=12)
    stop = ref[3:5]  # a stop string that greedy decoding reaches
    want_stop = model.generate(processor, p, im, max_new_tokens=12, stop=[stop])
    engine = Engine(model, processor).start()
    try:
        a = engine.submit(p, im, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7))
        b = engine.submit(*PROMPTS[3], SamplingParams(max_tokens=12, temperature=1.0))  # unseeded neighbour
        c = engine.submit(p, im, SamplingParams(max_tokens=12, stop=(stop,)))
        pieces = [e.text for e in c]
        assert a.result() == want and b.result()
        assert "".join(pieces) == want_stop == c.text and c.finish_reason == "stop"
    finally:
        engine.close()


def test_cancel_frees_the_slot_within_one_step(build_model):
    model, processor = build_model("X")
    engine = Engine(model, processor, max_batch=1, max_queue=1).start()
    try:
        long = engine.submit(*PROMPTS[0], SamplingParams(max_tokens=400))
        waiting = engine.submit(*PROMPTS[1], SamplingParams(max_tokens=5))
        with pytest.raises(QueueFull):  # one running, one waiting: the next is refused at once
            engine.submit(*PROMPTS[3], SamplingParams(max_tokens=5))
        _wait(lambda: len(long.output_ids) >= 4)
        at_cancel = len(long.output_ids)
        long.cancel()
        assert waiting.result()  # the freed slot is reused
        assert long.finish_reason == "cancelled"
        assert len(long.output_ids) <= at_cancel + 1  # at most the step already under way
        assert len(waiting.output_ids) == 5
        assert engine.in_flight == 0
    finally:
        engine.close()


def test_bad_request_raises_and_engine_keeps_serving(build_model):
    model, processor = build_model("D")
    engine = Engine(model, processor).start()
    try:
        with pytest.raises(ValueError, match="placeholder"):
            engine.submit(chat_prompt("x", 1), [])  # one <image>, no image
        with pytest.raises(ValueError, match="context"):
            engine.submit(chat_prompt("x", 0), [], SamplingParams(max_tokens=10**6))
        assert engine.generate(*PROMPTS[1], max_tokens=4) == model.generate(processor, *PROMPTS[1], max_new_tokens=4)
    finally:
        engine.close()
    assert not engine.healthy


def test_preempted_requests_resume_and_equal_generate(build_model):
    """A KV budget too small for every row: the newest rows are sent back and prefilled again with what they
    had generated; every answer is still model.generate's."""
    model, processor = build_model("X")
    set_gates(model, 0.5)
    jobs = [PROMPTS[1], PROMPTS[3], PROMPTS[0]]
    want = [model.generate(processor, p, im, max_new_tokens=24) for p, im in jobs]
    longest = max(len(processor.encode(p, im).input_ids) for p, im in jobs)
    # all three rows fit when they are prefilled, not four steps later
    engine = Engine(model, processor, max_batch=3, max_kv_tokens=3 * (longest + 4)).start()
    try:
        with engine.hold():
            reqs = [engine.submit(p, im, SamplingParams(max_tokens=24)) for p, im in jobs]
        got = [r.result() for r in reqs]
        with pytest.raises(ValueError, match="KV budget"):
            engine.submit(PROMPTS[0][0], PROMPTS[0][1], SamplingParams(max_tokens=3 * longest + 12))
    finally:
        engine.close()
    assert got == want
    assert engine.metrics.counts["num_preemptions"] >= 1
    assert "nvlm:num_preemptions_total" in engine.metrics.render(0, 0, 0)


def test_rows_with_their_own_settings_in_one_batch(build_model):
    """Greedy, seeded and top-k rows decoded together: each gets what it gets alone."""
    model, processor = build_model("D")
    p, im = PROMPTS[1]
    want_greedy = model.generate(processor, p, im, max_new_tokens=10)
    want_seeded = model.generate(processor, p, im, max_new_tokens=10, do_sample=True, temperature=0.8, seed=3)
    engine = Engine(model, processor).start()
    try:
        with engine.hold():
            seeded = engine.submit(p, im, SamplingParams(max_tokens=10, temperature=0.8, seed=3))
            greedy = engine.submit(p, im, SamplingParams(max_tokens=10))
            top1 = engine.submit(p, im, SamplingParams(max_tokens=10, temperature=5.0, top_k=1))
        assert seeded.result() == want_seeded and greedy.result() == want_greedy
        assert top1.result() == want_greedy  # top-k 1 is greedy at any temperature
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ["D", "H"])
def test_encoder_cache_skips_the_vision_tower_for_a_repeated_image(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    image = picture(150, 100)
    jobs = [(chat_prompt(q, 1), [image]) for q in ("Describe.", "What color?", "Describe.")]
    want = [model.generate(processor, p, im, max_new_tokens=6) for p, im in jobs]
    other_job = (chat_prompt("Describe.", 1), [picture(150, 100, seed=5)])
    want_other = model.generate(processor, *other_job, max_new_tokens=6)
    towers = []
    model.vision.register_forward_pre_hook(lambda _m, args: towers.append(args[0].shape[0]))
    engine = Engine(model, processor, prefix_cache=False).start()  # a prefix hit would skip the images too
    try:
        got = [engine.generate(p, im, max_tokens=6) for p, im in jobs]
        other = engine.generate(*other_job, max_tokens=6)
    finally:
        engine.close()
    assert got == want
    assert other == want_other
    assert len(towers) == 2  # the first image once, the other image once; the repeats never
    counts = engine.metrics.counts
    assert (counts["encoder_cache_queries"], counts["encoder_cache_hits"]) == (4, 2)
    assert engine.metrics.gauges["encoder_cache_bytes"] > 0
    assert "nvlm:encoder_cache_hits_total 2" in engine.metrics.render(0, 0, 0)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_prefix_cache_reuses_prompt_blocks_and_keeps_greedy_output(build_model, arch):
    """Requests sharing a system prompt and an image reuse the first one's KV blocks; another image shares none
    of the blocks its cross-attention (X/H) or its image tokens (D) see; every answer is model.generate's."""
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    system = "You are a careful assistant who answers briefly. " * 3
    first, other = picture(150, 100), picture(150, 100, seed=5)
    jobs = [
        (chat_prompt("Describe.", 1, system), [first]),
        (chat_prompt("What color is it?", 1, system), [first]),
        (chat_prompt("Describe.", 1, system), [other]),
        (chat_prompt("Hi", 0, system), []),
    ]
    want = [model.generate(processor, p, im, max_new_tokens=6) for p, im in jobs]
    engine = Engine(model, processor).start()
    try:
        got, hits = [], []
        for p, im in jobs:
            got.append(engine.generate(p, im, max_tokens=6))
            hits.append(engine.metrics.counts["prefix_cache_hits"])
    finally:
        engine.close()
    assert got == want
    gained = [b - a for a, b in zip([0] + hits, hits)]
    prompt = len(processor.encode(*jobs[1]).input_ids)
    assert gained[0] == 0 and gained[1] >= prompt // 2  # the system prompt and the image's tokens
    assert (gained[2] == 0) == (arch != "D")  # D shares the text before the image; X/H nothing
    computed = engine.metrics.counts["prefill_tokens_computed"]
    assert computed == sum(len(processor.encode(p, im).input_ids) for p, im in jobs) - sum(gained)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_chunked_prefill_interleaves_with_decoding_and_equals_generate(build_model, arch):
    """A prompt longer than max_prefill_tokens is prefilled a chunk per step while the running row keeps
    decoding; both answers are model.generate's."""
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    short, long = PROMPTS[1], PROMPTS[2]
    want = [model.generate(processor, p, im, max_new_tokens=n) for (p, im), n in ((short, 30), (long, 8))]
    sizes = _record_batch_sizes(model)
    engine = Engine(model, processor, max_prefill_tokens=16).start()
    try:
        a = engine.submit(*short, SamplingParams(max_tokens=30))
        _wait(lambda: len(a.output_ids) >= 2)
        b = engine.submit(*long, SamplingParams(max_tokens=8))
        got = [a.result(), b.result()]
    finally:
        engine.close()
    assert got == want
    steps = [("decode" if shape[1] == 1 else "chunk", shape[1]) for shape, _ in sizes]
    chunks = [i for i, (kind, _) in enumerate(steps) if kind == "chunk"][1:]  # after the short prompt's prefill
    assert len(chunks) >= 3 and max(steps[i][1] for i in chunks) <= 16 + processor.tokens_per_tile
    assert all(steps[i + 1][0] == "decode" for i in chunks[:-1])  # a decoding step after every chunk
