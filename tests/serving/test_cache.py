"""The response cache: keys that name the model's content, digests, the memory backend."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ensemble_ops.config import ModelSpec
from ensemble_ops.serving.cache import (
    DigestStore,
    MemoryCache,
    cache_key,
    is_deterministic,
    model_identity,
)
from ensemble_ops.serving.cache.backend import decode_completion, encode_completion
from ensemble_ops.serving.engine import ChatMessage, Completion, GenerationParams

PARAMS = GenerationParams(max_tokens=4, temperature=0.0, top_p=1.0)
ANSWER = Completion("hi", "length", 1, 4, engine_s=0.5, time_to_first_token_s=0.1)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestKeys:
    def test_deterministic_requests(self) -> None:
        """Temperature 0 or a seed makes a request cacheable; sampling does not."""
        assert is_deterministic(PARAMS)
        assert is_deterministic(GenerationParams(4, 0.8, 1.0, seed=3))
        assert not is_deterministic(GenerationParams(4, 0.8, 1.0))

    def test_key_holds_the_identity_the_prompt_and_every_parameter(self) -> None:
        """Another model identity, prompt, message list or any parameter is another key;
        the same request is the same key (in any process: it is a content digest)."""
        base = cache_key("id", "p", (), PARAMS)
        assert base == cache_key("id", "p", (), PARAMS)
        assert len(base) == 64
        others = {
            cache_key("id2", "p", (), PARAMS),
            cache_key("id", "q", (), PARAMS),
            cache_key("id", None, (ChatMessage("user", "p"),), PARAMS),
            cache_key("id", None, (ChatMessage("system", "p"),), PARAMS),
            cache_key("id", "p", (), GenerationParams(5, 0.0, 1.0)),
            cache_key("id", "p", (), GenerationParams(4, 0.0, 0.9)),
            cache_key("id", "p", (), GenerationParams(4, 0.0, 1.0, seed=1)),
            cache_key("id", "p", (), GenerationParams(4, 0.0, 1.0, stop=("x",))),
        }
        assert base not in others
        assert len(others) == 8

    def test_identity_holds_the_content_and_the_settings_that_change_output(
        self, demo_dir: Path
    ) -> None:
        """Same bytes and context: same identity whatever the member's name or queue;
        other bytes or another context size: another identity."""
        spec = ModelSpec(name="a", path=demo_dir / "demo-tiny.gguf", n_ctx=256)
        same = spec.model_copy(update={"name": "b", "queue_size": 3, "parallel": 2})
        assert model_identity(spec, "0" * 64) == model_identity(same, "0" * 64)
        assert model_identity(spec, "0" * 64) != model_identity(spec, "1" * 64)
        bigger = spec.model_copy(update={"n_ctx": 512})
        assert model_identity(spec, "0" * 64) != model_identity(bigger, "0" * 64)

    def test_answers_round_trip_through_bytes(self) -> None:
        """An answer encodes to JSON bytes and back whole; anything else decodes to None."""
        assert decode_completion(encode_completion(ANSWER)) == ANSWER
        assert decode_completion(b"not json") is None
        assert decode_completion(b'{"text": "x"}') is None  # another release's layout


class TestDigestStore:
    def test_sha256_of_the_content(self, tmp_path: Path) -> None:
        """The digest is the file's SHA-256."""
        model = tmp_path / "m.gguf"
        model.write_bytes(b"GGUF" + bytes(range(256)) * 100)
        import hashlib

        expected = hashlib.sha256(model.read_bytes()).hexdigest()
        assert DigestStore(tmp_path / "d.json").digest(model) == expected

    def test_remembered_by_path_size_and_mtime_across_stores(self, tmp_path: Path) -> None:
        """A later store (a restart) reads the digest from the file instead of hashing: the
        recorded digest is returned while size and mtime match, and a changed file is
        hashed again."""
        model = tmp_path / "m.gguf"
        model.write_bytes(b"one")
        store_file = tmp_path / "d.json"
        first = DigestStore(store_file).digest(model)
        entries = json.loads(store_file.read_text())
        record = entries[str(model.resolve())]
        assert record["sha256"] == first
        # Plant a marker digest: only a store that trusts the record returns it.
        record["sha256"] = "f" * 64
        store_file.write_text(json.dumps(entries))
        assert DigestStore(store_file).digest(model) == "f" * 64
        model.write_bytes(b"two!")  # another size (and mtime): hashed again
        os.utime(model, ns=(1, 1))
        assert DigestStore(store_file).digest(model) not in (first, "f" * 64)

    def test_an_unwritable_store_keeps_digests_in_memory(self, tmp_path: Path) -> None:
        """A store file that cannot be written (a read-only file system) is no error."""
        model = tmp_path / "m.gguf"
        model.write_bytes(b"x")
        blocker = tmp_path / "file"
        blocker.write_text("")
        store = DigestStore(blocker / "sub" / "d.json")  # a parent that is a file
        assert store.digest(model) == store.digest(model)

    def test_deleted_files_leave_the_store(self, tmp_path: Path) -> None:
        """Entries of files that no longer exist are dropped at the next write."""
        store_file = tmp_path / "d.json"
        gone, kept = tmp_path / "gone.gguf", tmp_path / "kept.gguf"
        gone.write_bytes(b"a")
        kept.write_bytes(b"b")
        store = DigestStore(store_file)
        store.digest(gone)
        gone.unlink()
        store.digest(kept)
        assert list(json.loads(store_file.read_text())) == [str(kept.resolve())]


class TestMemoryCache:
    async def test_entries_expire(self) -> None:
        """An entry is gone after ttl_s."""
        clock = _Clock()
        cache = MemoryCache(10, ttl_s=5.0, timer=clock)
        await cache.put("k", ANSWER)
        clock.now = 4.9
        assert await cache.get("k") == ANSWER
        clock.now = 5.1
        assert await cache.get("k") is None

    async def test_bounded_lru(self) -> None:
        """Past max_entries the least recently used entry goes."""
        cache = MemoryCache(2, ttl_s=60.0)
        await cache.put("a", ANSWER)
        await cache.put("b", ANSWER)
        await cache.get("a")
        await cache.put("c", ANSWER)
        assert [await cache.get(k) for k in "abc"] == [ANSWER, None, ANSWER]
        assert len(cache) == 2

    async def test_one_process_always_claims_and_is_always_up(self) -> None:
        """Within a process single flight is the ensemble's: a claim always wins, there
        is nobody to wait for, and memory never goes down."""
        cache = MemoryCache(2, ttl_s=60.0)
        assert await cache.claim("k")
        assert await cache.claim("k")
        assert await cache.wait_for("k") is None
        health = await cache.health()
        assert (health.backend, health.up) == ("memory", True)
