"""Preflight math and messages, the GGUF header reader, and the backend check."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.errors import BackendUnavailableError, ModelLoadError, PreflightError
from rbee.hive import preflight
from rbee.hive.gguf_header import kv_cache_bytes, read_gguf_metadata
from tests.hive.fakehub import write_small_gguf

GIB = 1024 ** 3
NODE = {"hostname": "blep", "backends": ["cpu"],
        "devices": [{"backend": "cpu", "index": 0, "name": "x", "memory_total_bytes": 8 * GIB, "memory_free_bytes": 4 * GIB}]}


def test_gguf_header_and_kv_cache(tmp_path: Path) -> None:
    meta = read_gguf_metadata(write_small_gguf(tmp_path / "m.gguf", tensor_bytes=1024))
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert "tokenizer.ggml.tokens" not in meta  # arrays are skipped
    # 2 layers x 1000 tokens x 2 kv heads x (16 + 16) x 2 bytes
    assert kv_cache_bytes(meta, 1000) == 2 * 1000 * 2 * 32 * 2
    # never more than the trained context
    assert kv_cache_bytes(meta, 100_000) == kv_cache_bytes(meta, 2048)
    assert kv_cache_bytes({"general.architecture": "x"}, 10) is None
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        read_gguf_metadata(bad)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes((tmp_path / "m.gguf").read_bytes()[:40])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf_metadata(truncated)


def test_memory_need_adds_weights_context_and_runtime() -> None:
    need = preflight.memory_need(1_000_000, 4096, 2_000_000)
    assert need.total == 1_000_000 + 2_000_000 + preflight.RUNTIME_OVERHEAD_BYTES and not need.kv_estimated
    rough = preflight.memory_need(1_000_000, 4096, None)
    assert rough.kv_cache == 4096 * preflight.FALLBACK_KV_BYTES_PER_TOKEN and rough.kv_estimated
    assert "~" in rough.explain() and "~" not in need.explain()


def test_the_kv_cache_grows_with_parallel() -> None:
    # The header's figure is one slot's cache (ctx_size tokens); the worker holds parallel of them.
    one = preflight.memory_need(1_000_000, 4096, 2_000_000)
    assert one.parallel == 1 and one.kv_cache == 2_000_000
    four = preflight.memory_need(1_000_000, 4096, 2_000_000, parallel=4)
    assert four.kv_per_slot == 2_000_000 and four.kv_cache == 8_000_000
    assert four.total == one.total + 3 * 2_000_000
    assert "context of 1 slot x 4096 tokens" in one.explain()
    assert "context of 4 slots x 4096 tokens 8 MiB" in four.explain()
    # Before the header is known: the rough figure per token, for ctx_size x parallel tokens.
    rough = preflight.memory_need(1_000_000, 1000, None, parallel=3)
    assert rough.kv_cache == 3 * 1000 * preflight.FALLBACK_KV_BYTES_PER_TOKEN and rough.kv_estimated
    totals = [preflight.memory_need(1_000_000, 4096, 2_000_000, parallel=n).total for n in (1, 2, 3, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    with pytest.raises(ValueError):
        preflight.memory_need(1_000_000, 4096, None, parallel=0)


def test_the_memory_message_counts_every_slot(tmp_path: Path) -> None:
    # Per slot the header's KV figure is capped at the trained context (2048 here); then x parallel.
    meta = read_gguf_metadata(write_small_gguf(tmp_path / "m.gguf", tensor_bytes=1024))
    per_slot = kv_cache_bytes(meta, 100_000)
    assert per_slot == kv_cache_bytes(meta, 2048)
    need = preflight.memory_need(int(1.4 * GIB), 100_000, per_slot, parallel=4)
    assert need.kv_cache == 4 * per_slot
    big = preflight.memory_need(int(1.4 * GIB), 4096, int(0.22 * GIB), parallel=4)
    with pytest.raises(PreflightError) as caught:
        preflight.check_memory(big, model="hf:org/m/m-Q8_0.gguf", free=int(2.0 * GIB), source="available RAM",
                               smaller=[("Q4_K_M", int(0.45 * GIB))])
    message, details = caught.value.message, caught.value.details
    assert "needs 2.5 GiB (model 1.4 GiB + context of 4 slots x 4096 tokens 0.9 GiB + runtime 0.2 GiB)" in message
    # The smaller quant is planned with the same slots: 0.45 + 0.88 + 0.25 GiB.
    assert "a Q4_K_M of this model needs 1.6 GiB" in message
    assert details["parallel"] == 4 and details["kv_cache_bytes"] == int(0.22 * GIB) * 4
    assert details["kv_cache_tokens"] == 4 * 4096 and details["ctx_size"] == 4096
    # The same model with one slot fits.
    preflight.check_memory(preflight.memory_need(int(1.4 * GIB), 4096, int(0.22 * GIB)), model="m",
                           free=int(2.0 * GIB), source="available RAM")


def test_memory_message_has_the_numbers_and_a_smaller_quant() -> None:
    need = preflight.memory_need(int(1.4 * GIB), 4096, int(0.25 * GIB))
    with pytest.raises(PreflightError) as caught:
        preflight.check_memory(need, model="hf:org/m/m-Q8_0.gguf", free=int(1.2 * GIB), source="available RAM",
                               smaller=[("Q4_K_M", int(0.45 * GIB)), ("F16", int(2.6 * GIB))])
    message = caught.value.message
    assert "needs 1.9 GiB" in message and "node has 1.2 GiB free" in message
    assert "a Q4_K_M of this model needs 0.9 GiB" in message and "F16" not in message
    assert caught.value.http_status == 409 and caught.value.details["free_bytes"] == int(1.2 * GIB)
    preflight.check_memory(need, model="m", free=2 * GIB, source="available RAM")  # fits: no error


def test_the_configured_limit_caps_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preflight.MEMORY_LIMIT_ENV, str(GIB))
    free, source = preflight.free_memory(reserved=256 * 1024 * 1024)
    assert free == GIB - 256 * 1024 * 1024 and "RBEE_MEMORY_LIMIT_BYTES" in source and "planned" in source
    monkeypatch.setenv(preflight.MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(PreflightError):
        preflight.free_memory(0)
    monkeypatch.delenv(preflight.MEMORY_LIMIT_ENV)
    free, source = preflight.free_memory(reserved=10 * GIB)
    assert free > 0 and source == "available RAM"


def test_disk_check(tmp_path: Path) -> None:
    preflight.check_disk(1024, tmp_path, model="m")
    with pytest.raises(PreflightError, match="not enough disk for m: the download needs"):
        preflight.check_disk(1 << 60, tmp_path, model="m")


def test_backend_and_device_checks_name_what_exists() -> None:
    assert preflight.check_backend("cpu", 0, NODE)["name"] == "x"
    with pytest.raises(BackendUnavailableError) as caught:
        preflight.check_backend("cuda", 0, NODE)
    assert "it has: cpu" in caught.value.message and caught.value.http_status == 400
    with pytest.raises(BackendUnavailableError, match="cpu device 1 does not exist"):
        preflight.check_backend("cpu", 1, NODE)
    with pytest.raises(BackendUnavailableError, match="'tpu'"):
        preflight.check_backend("tpu", 0, NODE)
