"""The byte-bounded LRU behind the encoder and prefix caches: least recently used out first, the bound held,
an entry larger than the bound not kept, a replaced entry counted once.

python -m pytest tests/test_serve_lru.py -q
"""

from __future__ import annotations

from nvlm.serve.lru import ByteLRU


def test_evicts_least_recently_used_within_the_bound():
    lru: ByteLRU[bytes] = ByteLRU(10, len)
    assert lru.put("a", b"1234") and lru.put("b", b"1234")
    assert lru.get("a") == b"1234"  # "a" is now the most recent
    assert lru.put("c", b"1234")  # 12 bytes > 10: the least recent ("b") leaves
    assert "b" not in lru and "a" in lru and "c" in lru and lru.bytes == 8
    assert not lru.put("big", b"x" * 11) and "big" not in lru and lru.bytes == 8
    assert lru.put("a", b"12") and lru.bytes == 6  # replaced, not counted twice
    assert lru.get("missing") is None
