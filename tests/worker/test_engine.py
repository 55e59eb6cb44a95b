"""The native engine on the real embedded Gemma-3 270M: correctness of the C token loop.

Greedy output is compared with llama-cpp-python's (the same llama.cpp, through another
binding): if the two agree token for token, our prefill, decode, sampling and
detokenization are right, not just fast.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import cffi
import llama_cpp
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from rbee.errors import BackendUnavailableError, BusyError, InvalidRequestError, ModelLoadError
from rbee.narration.events import Token
from rbee.requests import Message, SamplingParams
from rbee.worker.engine import (
    DEFAULT_CHUNK,
    AbortFlag,
    Engine,
    GenerationResult,
    available_backends,
    native_build_info,
)
from rbee.worker.engine_trio import open_generation
from rbee.worker.grammar import json_object_grammar, json_schema_grammar
from tests.worker.workers import (
    BOUNDED_ASK,
    BOUNDED_SCHEMA,
    CONVERSATION,
    CONVERSATION_RENDERED,
    JSON_OBJECT_ASK,
    fits_bounded_schema,
)

pytestmark = pytest.mark.model

THREADS = 2
N_CTX = 2048
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
# Longer than two prefill chunks (DEFAULT_CHUNK tokens, the reference's n_batch too).
LONG_PROMPT = "A list of the things I saw on my walk today: " + ", ".join(f"item {n}" for n in range(110)) + ","
# Found by trying prompts with greedy decoding: the model closes the JSON object and ends
# the document (one "\n", then <eos>).
EOS_PROMPT = '{"name": "John", "age": 30}'


@pytest.fixture(scope="module")
def engine(embedded_model: Path):
    with Engine.load(embedded_model, n_ctx=N_CTX, n_threads=THREADS) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def reference(embedded_model: Path):
    """llama-cpp-python on the same file, context size and threads, and a batch as large as
    our prefill chunk (a different split of the prompt can flip a near-tie)."""
    llm = llama_cpp.Llama(str(embedded_model), n_ctx=N_CTX, n_threads=THREADS, n_batch=DEFAULT_CHUNK,
                          verbose=False)
    yield llm
    llm.close()


def reference_text(llm: llama_cpp.Llama, prompt: str, max_tokens: int) -> tuple[str, str]:
    # reset(): llama-cpp-python otherwise keeps the previous prompt's matching prefix (the
    # BOS) and evaluates a shorter batch, whose different rounding can flip a near-tie.
    # Our exact-equality runs send cache_prompt=False and so evaluate the whole prompt too.
    llm.reset()
    choice = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]
    return choice["text"], choice["finish_reason"]


def run(engine: Engine, prompt: str, params: SamplingParams = GREEDY,
        **kwargs) -> tuple[list[tuple[int, str]], GenerationResult]:
    pieces: list[tuple[int, str]] = []
    # Exact-equality runs evaluate the whole prompt on an empty cache, as a fresh
    # llama.cpp context does.
    kwargs.setdefault("cache_prompt", False)
    if not kwargs["cache_prompt"]:
        engine.clear_cache()
    result = engine.generate(prompt, params, on_token=lambda i, t: pieces.append((i, t)), **kwargs)
    return pieces, result


def text_of(pieces: list[tuple[int, str]]) -> str:
    return "".join(t for _, t in pieces)


# ---- the C text layer alone (native/rbee_text.c): byte tables and properties -----------

NATIVE = Path(__file__).resolve().parents[2] / "native"


@pytest.fixture(scope="module")
def text_c(tmp_path_factory: pytest.TempPathFactory):
    """native/rbee_text.c compiled on its own (no llama.cpp), to feed it bytes directly."""
    import importlib.util

    ffi = cffi.FFI()
    ffi.cdef("""
        typedef enum { RBEE_STATUS_OK = 0, ... } rbee_status;
        typedef struct { char * pending; size_t pending_len; ...; } rbee_text_stream;
        void rbee_text_stream_init(rbee_text_stream * ts);
        void rbee_text_stream_free(rbee_text_stream * ts);
        rbee_status rbee_text_stream_reset(rbee_text_stream * ts, const char * const * stops, int32_t n_stop);
        rbee_status rbee_text_stream_push(rbee_text_stream * ts, const char * bytes, size_t len,
                                          size_t * emit_len, bool * stopped);
        void rbee_text_stream_consume(rbee_text_stream * ts, size_t n);
    """)
    ffi.set_source("_rbee_text_test", '#include "rbee_text.h"', sources=[str(NATIVE / "rbee_text.c")],
                   include_dirs=[str(NATIVE)], extra_compile_args=["-O1"])
    out = tmp_path_factory.mktemp("text_c")
    spec = importlib.util.spec_from_file_location("_rbee_text_test", ffi.compile(tmpdir=str(out)))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def feed(text_c, chunks: list[bytes], stops: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """Push chunks as the loop does; returns the emitted pieces and whether a stop matched."""
    ffi, lib = text_c.ffi, text_c.lib
    ts = ffi.new("rbee_text_stream *")
    lib.rbee_text_stream_init(ts)
    keep = [ffi.new("char[]", s.encode()) for s in stops]
    array = ffi.new("const char *[]", keep) if keep else ffi.NULL
    assert lib.rbee_text_stream_reset(ts, array, len(keep)) == lib.RBEE_STATUS_OK
    emit, stopped = ffi.new("size_t *"), ffi.new("bool *")
    pieces: list[str] = []
    try:
        for chunk in chunks:
            assert lib.rbee_text_stream_push(ts, chunk, len(chunk), emit, stopped) == lib.RBEE_STATUS_OK
            if emit[0]:
                pieces.append(ffi.unpack(ts.pending, emit[0]).decode("utf-8"))  # strict: must be valid
                lib.rbee_text_stream_consume(ts, emit[0])
            if stopped[0]:
                return pieces, True
        if ts.pending_len:  # end of generation: what was held back is plain text
            pieces.append(ffi.unpack(ts.pending, ts.pending_len).decode("utf-8"))
        return pieces, False
    finally:
        lib.rbee_text_stream_free(ts)


@pytest.mark.parametrize(("chunks", "pieces"), [
    ([b"\xf0\x9f", b"\x98", b"\x80!"], ["😀!"]),            # one character over three tokens
    ([b"a\xe2\x82", b"\xac"], ["a", "€"]),                   # the whole part leaves at once
    ([b"\xff", b"b"], ["\ufffd", "b"]),                       # never valid
    ([b"\x80abc"], ["\ufffdabc"]),                            # a lone continuation byte
    ([b"\xe2\x82A"], ["\ufffdA"]),                            # cut short: one U+FFFD (maximal subpart)
    ([b"\xed\xa0\x80"], ["\ufffd\ufffd\ufffd"]),                # a UTF-16 surrogate is not UTF-8
    ([b"\xc0\xaf"], ["\ufffd\ufffd"]),                          # overlong
    ([b"ok \xf0\x9f"], ["ok "]),                                # an unfinished character at the end is dropped
])
def test_text_layer_emits_only_whole_valid_characters(text_c, chunks: list[bytes], pieces: list[str]) -> None:
    assert feed(text_c, chunks) == (pieces, False)


@pytest.mark.parametrize(("chunks", "stops", "pieces", "stopped"), [
    ([b"Hello", b" wor", b"ld"], ("world",), ["Hello", " "], True),      # " wor" held until "ld" decides
    ([b"Hello", b" wor", b"k"], ("world",), ["Hello", " ", "work"], False),  # held, then released
    ([b"abc<|e", b"nd|>tail"], ("<|end|>",), ["abc"], True),
    ([b"xSTOP"], ("STOP", "x"), [], True),                                # the earliest match wins
    ([b"a", b"b"], ("",), ["a", "b"], False),                             # an empty stop string is ignored
    ([b"caf\xc3", b"\xa9!"], ("\u00e9!",), ["caf"], True),                 # stop over a split character
])
def test_text_layer_stop_strings(text_c, chunks, stops, pieces, stopped) -> None:
    assert feed(text_c, chunks, stops) == (pieces, stopped)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64), cuts=st.lists(st.integers(0, 64), max_size=8))
def test_text_layer_matches_python_replace_decoding_for_any_chunking(text_c, data: bytes, cuts: list[int]) -> None:
    data += b"."  # a final ASCII byte settles any unfinished character, as Python's decode does at the end
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    pieces, _ = feed(text_c, chunks)
    assert "".join(pieces) == data.decode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40), stop=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 200), max_size=8))
def test_text_layer_cuts_exactly_before_the_first_stop(text_c, text: str, stop: str, cuts: list[int]) -> None:
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces, stopped = feed(text_c, [data[a:b] for a, b in zip(bounds, bounds[1:])], (stop,))
    assert stopped == (stop in text)
    assert "".join(pieces) == (text[: text.index(stop)] if stop in text else text)


def test_build_info_and_backends() -> None:
    info = native_build_info()
    assert info["llama_cpp_python"] == llama_cpp.__version__
    assert info["backends"] == available_backends() and available_backends()[0] == "cpu"
    assert len(info["llama_cpp_commit"]) == 40 and "AVX" in info["system_info"]


def test_build_script_says_in_one_line_that_the_build_is_current() -> None:
    import json
    import subprocess
    import sys
    import sysconfig

    done = subprocess.run([sys.executable, str(NATIVE / "build.py")], capture_output=True, text=True, check=True)
    again = subprocess.run([sys.executable, str(NATIVE / "build.py")], capture_output=True, text=True, check=True)
    assert done.stdout.count("\n") == again.stdout.count("\n") == 1 and done.stdout.startswith("native: ")
    assert "is up to date" in again.stdout
    stamp = json.loads((Path(sysconfig.get_paths()["platlib"]) / "_rbee_native.build-info.json").read_text())
    assert stamp["llama_cpp_python"] == llama_cpp.__version__ and Path(stamp["lib_dir"]).name == "lib"


def test_model_properties(engine: Engine, embedded_model: Path) -> None:
    assert engine.model_path == embedded_model.resolve()
    assert (engine.backend, engine.device, engine.n_ctx, engine.n_threads) == ("cpu", 0, N_CTX, THREADS)
    assert engine.n_layers == 18 and 200_000_000 < engine.n_params < 300_000_000
    assert 0 < engine.size_bytes <= embedded_model.stat().st_size and "gemma3" in engine.description


@pytest.mark.parametrize("prompt", PROMPTS + [LONG_PROMPT])
def test_greedy_output_matches_llama_cpp_python(engine: Engine, reference: llama_cpp.Llama, prompt: str) -> None:
    expected, finish = reference_text(reference, prompt, GREEDY.max_tokens)
    pieces, result = run(engine, prompt)
    assert text_of(pieces) == expected
    assert finish == "length" and result.stop_reason == "max_tokens"
    assert [i for i, _ in pieces] == list(range(len(pieces))) and result.tokens_out == len(pieces)
    assert result.prompt_tokens == engine.count_tokens(prompt) == len(reference.tokenize(prompt.encode()))
    assert result.tokens_per_sec > 0 and 0 < result.prefill_ms <= result.time_to_first_token_ms
    assert result.decode_time_ms > 0


def test_stop_sequence_cuts_text_before_it_even_across_tokens(engine: Engine) -> None:
    full = text_of(run(engine, PROMPTS[0])[0])
    assert "country of France" in full  # " the capital of the country of France. ..."
    # " of" and " France" are separate tokens: " of" must be held back until it is clear
    # that " France" does (or does not) complete the stop string.
    pieces, result = run(engine, PROMPTS[0], SamplingParams(max_tokens=32, temperature=0.0, stop=("of France", "zzz")))
    assert result.stop_reason == "stop_sequence"
    assert text_of(pieces) == full[: full.index("of France")]
    assert result.tokens_out == len(pieces)


def test_held_back_text_is_flushed_when_no_stop_follows(engine: Engine) -> None:
    full = text_of(run(engine, PROMPTS[0])[0])
    # "of Germany" shares a prefix with the text (" of"), which is held and then released.
    pieces, result = run(engine, PROMPTS[0], SamplingParams(max_tokens=32, temperature=0.0, stop=("of Germany",)))
    assert (text_of(pieces), result.stop_reason) == (full, "max_tokens")


def test_end_of_generation_token_stops_with_eos(engine: Engine, reference: llama_cpp.Llama) -> None:
    expected, finish = reference_text(reference, EOS_PROMPT, 64)
    pieces, result = run(engine, EOS_PROMPT, SamplingParams(max_tokens=64, temperature=0.0))
    assert (result.stop_reason, finish) == ("eos", "stop")
    assert text_of(pieces) == expected and result.tokens_out == len(pieces) < 64


def test_abort_stops_within_one_token_and_the_next_request_is_served(engine: Engine) -> None:
    expected = text_of(run(engine, PROMPTS[2])[0])
    abort = AbortFlag()
    pieces: list[str] = []

    def on_token(i: int, text: str) -> None:
        pieces.append(text)
        if i == 2:
            abort.set()  # the loop must not decode (nor emit) anything after this

    result = engine.generate(PROMPTS[2], GREEDY, on_token=on_token, abort=abort)
    assert (result.stop_reason, result.tokens_out, len(pieces)) == ("cancelled", 3, 3)
    again, result = run(engine, PROMPTS[2])
    assert (text_of(again), result.stop_reason) == (expected, "max_tokens")


def test_abort_from_another_thread_ends_decode_promptly(engine: Engine) -> None:
    abort = AbortFlag()
    seen = threading.Event()
    t0 = time.monotonic()
    set_at: list[float] = []

    def cancel_soon() -> None:
        seen.wait()
        set_at.append(time.monotonic())
        abort.set()

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    result = engine.generate(PROMPTS[1], SamplingParams(max_tokens=500, temperature=0.0),
                             on_token=lambda i, t: seen.set(), abort=abort)
    canceller.join()
    per_token_s = result.decode_time_ms / 1e3 / max(1, result.tokens_out)
    assert result.stop_reason == "cancelled" and result.tokens_out < 500
    assert time.monotonic() - set_at[0] < 5 * per_token_s + 0.05, (per_token_s, t0)


def test_abort_during_a_long_prefill_stops_it(engine: Engine) -> None:
    prompt = "The history of the world is long. " * 100  # ~800 tokens, four prefill chunks
    started = time.monotonic()
    _, full = run(engine, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    full_s = time.monotonic() - started
    abort = AbortFlag()
    timer = threading.Timer(0.02, abort.set)
    timer.start()
    started = time.monotonic()
    _, cut = run(engine, prompt, SamplingParams(max_tokens=1, temperature=0.0), abort=abort)
    cut_s = time.monotonic() - started
    timer.join()
    assert (cut.stop_reason, cut.tokens_out) == ("cancelled", 0)
    assert cut_s < full_s * 0.6  # it ended at the first chunk boundary, not after the prompt
    # An abort flag set before the call: nothing is decoded at all.
    abort = AbortFlag()
    abort.set()
    assert run(engine, PROMPTS[0], abort=abort)[1].stop_reason == "cancelled"
    assert text_of(run(engine, PROMPTS[0])[0]).startswith(" the capital of the country of France")


def test_pieces_are_whole_utf8_characters(engine: Engine, reference: llama_cpp.Llama) -> None:
    # Mathematical Fraktur letters are 4-byte characters the vocabulary spells with byte
    # tokens, so whole characters only exist once several tokens are joined.
    prompt = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝔱𝔢𝔵𝔱: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝔱𝔢𝔵𝔱: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝔱𝔢𝔵𝔱:"
    # llama-cpp-python's create_completion runs past max_tokens to finish a character, so
    # the reference is its first 32 greedy tokens, joined as bytes, cut at the last whole one.
    reference.reset()
    tokens = []
    for token in reference.generate(reference.tokenize(prompt.encode(), add_bos=True, special=True), temp=0.0):
        tokens.append(token)
        if len(tokens) == GREEDY.max_tokens:
            break
    expected = reference.detokenize(tokens).decode("utf-8", errors="ignore")
    pieces, result = run(engine, prompt)
    assert text_of(pieces) == expected
    assert all(t and "\ufffd" not in t and t.encode("utf-8").decode("utf-8") == t for _, t in pieces)
    assert any(ord(c) > 0xFFFF for _, t in pieces for c in t)
    assert result.tokens_out < GREEDY.max_tokens  # several byte tokens became one piece

    emoji, _ = run(engine, "Emoji for happy: 😀, sad: 😢, angry:")
    assert any(ord(c) > 0xFFFF for _, t in emoji for c in t)


def test_chat_template_is_applied(engine: Engine) -> None:
    plain, chat = engine.count_tokens("hello"), engine.count_tokens("hello", chat=True)
    assert chat > plain + 4  # <start_of_turn>user ... <end_of_turn> <start_of_turn>model
    _, result = run(engine, "hello", SamplingParams(max_tokens=4, temperature=0.0), chat=True)
    assert result.prompt_tokens == chat


def test_messages_render_with_the_chat_template_and_generate(engine: Engine) -> None:
    # The embedded Gemma-3 270M GGUF has no tokenizer.chat_template: llama.cpp's built-in
    # "gemma" template for its architecture is used.
    assert engine.chat_template_builtin and engine.chat_template == "gemma"
    assert engine.render_chat(CONVERSATION) == CONVERSATION_RENDERED
    assert engine.render_chat(CONVERSATION, add_assistant=False) == CONVERSATION_RENDERED.removesuffix(
        "<start_of_turn>model\n")
    # The prompt tokens are the rendered conversation's: both turns (BOS once).
    n = engine.count_tokens(CONVERSATION)
    assert n == engine.count_tokens(CONVERSATION_RENDERED) > engine.count_tokens(CONVERSATION[-1:]) + 15
    pieces, result = run(engine, CONVERSATION, SamplingParams(max_tokens=8, temperature=0.0))
    assert result.prompt_tokens == n and result.tokens_out >= 1
    # Token for token what the rendered text as a raw prompt gives.
    raw, raw_result = run(engine, CONVERSATION_RENDERED, SamplingParams(max_tokens=8, temperature=0.0))
    assert text_of(pieces) == text_of(raw) and raw_result.prompt_tokens == n
    # One user message is what chat=True makes of a prompt; a long one renders whole.
    assert engine.count_tokens([Message("user", "hello")]) == engine.count_tokens("hello", chat=True)
    long = "bees " * 200
    assert engine.render_chat([Message("user", long)]) == (
        f"<start_of_turn>user\n{long.strip()}<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(InvalidRequestError):
        engine.count_tokens([])


def test_json_object_grammar_gives_json_that_ends_with_eos(engine: Engine) -> None:
    pieces, result = run(engine, JSON_OBJECT_ASK, SamplingParams(max_tokens=60, temperature=0.0, seed=7),
                         grammar=json_object_grammar())
    assert result.stop_reason == "eos"
    assert isinstance(json.loads(text_of(pieces)), dict)


def test_json_schema_grammar_gives_json_that_fits_the_schema(engine: Engine) -> None:
    grammar = json_schema_grammar(BOUNDED_SCHEMA)
    for params in (SamplingParams(max_tokens=60, temperature=0.0, seed=7),
                   SamplingParams(max_tokens=60, temperature=0.7, seed=7, presence_penalty=0.5)):
        pieces, result = run(engine, BOUNDED_ASK, params, grammar=grammar)
        assert result.stop_reason == "eos", text_of(pieces)
        assert fits_bounded_schema(json.loads(text_of(pieces))), text_of(pieces)


def test_a_grammar_llama_cpp_refuses_fails_that_request_alone(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.check_grammar("root ::= undefined-rule", field="response_format")
    assert caught.value.details[0]["field"] == "response_format" and "grammar" in caught.value.message
    engine.check_grammar(json_object_grammar())
    # While another stream runs: only the bad one fails, at its start.
    long = engine.submit(PROMPTS[3], SamplingParams(max_tokens=40, temperature=0.0))
    bad = engine.submit("hi", SamplingParams(max_tokens=4), grammar="root ::= (")
    with pytest.raises(InvalidRequestError) as refused:
        bad.wait(30)
    assert "RBEE_STATUS_GRAMMAR_FAILED" in refused.value.message
    assert long.wait(60).stop_reason == "max_tokens" and long.result.tokens_out == 40
    assert engine.busy_slots == 0


def test_presence_and_frequency_penalties_reach_the_sampler(engine: Engine) -> None:
    def greedy(**penalty: float) -> str:
        return text_of(run(engine, PROMPTS[2], SamplingParams(max_tokens=24, temperature=0.0, **penalty))[0])

    plain = greedy()
    assert "a man of many talents, and he was a man of many talents" in plain  # it repeats itself
    # Penalising what already appeared (once, or per occurrence) steers it off the repetition.
    presence, frequency = greedy(presence_penalty=2.0), greedy(frequency_penalty=2.0)
    assert plain != presence and plain != frequency and presence != frequency
    assert "many talents" not in presence and "many talents" not in frequency
    # A negative presence penalty favours what appeared: it repeats at once.
    assert greedy(presence_penalty=-2.0).count("beautiful") >= 4


def test_no_max_tokens_runs_until_the_context_is_full(embedded_model: Path) -> None:
    with Engine.load(embedded_model, n_ctx=64, n_threads=THREADS, n_slots=1) as small:
        unlimited = SamplingParams(max_tokens=None, temperature=0.0)
        pieces, result = run(small, PROMPTS[3], unlimited)
        assert result.stop_reason == "max_tokens"
        assert result.prompt_tokens + result.tokens_out == 64 == len(pieces) + result.prompt_tokens
        # ... or until the end of generation.
        assert run(small, EOS_PROMPT, unlimited)[1].stop_reason == "eos"
        # A prompt that fills the context leaves no room.
        small.check_fits(63, unlimited)
        with pytest.raises(InvalidRequestError):
            small.check_fits(64, unlimited)
        with pytest.raises(InvalidRequestError):
            small.generate("word " * 80, unlimited, on_token=None)


def test_sampling_with_seed_is_reproducible(engine: Engine) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.9, seed=42, repeat_penalty=1.1)
    first, second = run(engine, PROMPTS[2], params)[0], run(engine, PROMPTS[2], params)[0]
    assert text_of(first) == text_of(second) != ""


def test_missing_and_corrupt_model_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelLoadError, match=str(missing)):
        Engine.load(missing)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ModelLoadError, match=str(garbage)):
        Engine.load(garbage)
    # Right magic, garbage after it: this failure comes from llama.cpp itself.
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(ModelLoadError, match=str(corrupt)) as caught:
        Engine.load(corrupt)
    assert "RBEE_STATUS_MODEL_LOAD_FAILED" in caught.value.message


def test_missing_backend_fails_fast_naming_what_is_available(embedded_model: Path) -> None:
    for backend in ("cuda", "metal", "vulkan"):
        with pytest.raises(BackendUnavailableError, match="available: cpu"):
            Engine.load(embedded_model, backend=backend)


def test_invalid_requests_are_rejected_with_field_details(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as too_long:
        engine.generate("word " * 3000, GREEDY, on_token=lambda i, t: None)
    assert too_long.value.details[0]["field"] == "max_tokens"
    with pytest.raises(InvalidRequestError) as too_many:
        engine.generate("hi", SamplingParams(max_tokens=N_CTX), on_token=lambda i, t: None)
    assert "exceeds the context" in too_many.value.message
    # Bad params never reach the engine: building them is refused (rbee.requests).
    with pytest.raises(InvalidRequestError) as bad:
        SamplingParams(max_tokens=0, temperature=-1, top_p=2.0)
    assert {d["field"] for d in bad.value.details} == {"max_tokens", "temperature", "top_p"}
    for stop in (("",), ("a\x00b",), tuple("abcdefghijklmnopq")):
        with pytest.raises(InvalidRequestError) as bad_stop:
            SamplingParams(stop=stop)
        assert [d["field"].split("[")[0] for d in bad_stop.value.details] == ["stop"]
    # The engine is still fine afterwards.
    assert run(engine, PROMPTS[0], SamplingParams(max_tokens=2, temperature=0.0))[1].stop_reason == "max_tokens"


def test_on_token_exception_propagates_and_leaves_the_engine_usable(engine: Engine) -> None:
    def explode(i: int, text: str) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(PROMPTS[0], GREEDY, on_token=explode)
    assert run(engine, PROMPTS[0], SamplingParams(max_tokens=2, temperature=0.0))[1].tokens_out == 2


def test_open_generation_streams_consecutive_tokens(engine: Engine) -> None:
    expected = text_of(run(engine, PROMPTS[1])[0])

    async def main() -> tuple[list[Token], GenerationResult | None]:
        with trio.fail_after(30):
            async with open_generation(engine, PROMPTS[1], GREEDY) as generation:
                tokens = [token async for token in generation]
            return tokens, generation.result

    tokens, result = trio.run(main)
    assert all(isinstance(t, Token) for t in tokens)
    assert [t.i for t in tokens] == list(range(len(tokens)))
    assert "".join(t.t for t in tokens) == expected
    assert result is not None and result.tokens_out == len(tokens) and result.stop_reason == "max_tokens"


def test_cancel_scope_exit_mid_stream_stops_the_loop(engine: Engine) -> None:
    expected = text_of(run(engine, PROMPTS[2])[0])

    async def main() -> tuple[int, int, float, GenerationResult | None, str]:
        with trio.fail_after(60):
            with trio.CancelScope() as scope:
                async with open_generation(engine, PROMPTS[2], SamplingParams(max_tokens=500, temperature=0.0)) as gen:
                    async for token in gen:
                        if token.i == 2:
                            # What the loop had produced when the flag is about to be set
                            # (nothing else runs on this thread before `finally` sets it).
                            produced = token.i + 1 + len(gen._events)
                            cancelled_at = time.monotonic()
                            scope.cancel()
            left_after = time.monotonic() - cancelled_at
            # Served at once, and the KV cache was cleared: the same greedy text again.
            async with open_generation(engine, PROMPTS[2], GREEDY) as again:
                text = "".join([t.t async for t in again])
            return token.i, produced, left_after, gen.result, text

    last_i, produced, left_after, result, text = trio.run(main)
    assert last_i == 2 and result is not None and result.stop_reason == "cancelled"
    # Within one token: at most the token being decoded when the flag was set (+1 for the
    # few microseconds between the snapshot above and the flag).
    assert result.tokens_out <= produced + 2
    per_token_s = result.decode_time_ms / 1e3 / result.tokens_out
    assert left_after < 3 * per_token_s + 0.5 and text == expected


def test_leaving_the_block_early_and_a_full_engine(engine: Engine) -> None:
    async def main() -> GenerationResult | None:
        with trio.fail_after(60):
            async with open_generation(engine, PROMPTS[0], SamplingParams(max_tokens=500, temperature=0.0)) as gen:
                # The blocking one-shot loop needs the engine to itself.
                with pytest.raises(BusyError):
                    await trio.to_thread.run_sync(lambda: engine.generate("x", GREEDY, on_token=lambda i, t: None))
                async with contextlib.AsyncExitStack() as stack:
                    for _ in range(engine.n_slots - 1):  # every other slot
                        await stack.enter_async_context(open_generation(engine, PROMPTS[1], GREEDY))
                    assert engine.busy_slots == engine.n_slots
                    with pytest.raises(BusyError, match=f"all {engine.n_slots} slots"):
                        async with open_generation(engine, PROMPTS[0], GREEDY):
                            pass  # pragma: no cover
                async for token in gen:
                    break
            return gen.result

    result = trio.run(main)
    assert result is not None and result.stop_reason == "cancelled" and result.tokens_out < 500
    assert engine.busy_slots == 0


def test_open_generation_rejects_bad_requests_before_streaming(engine: Engine) -> None:
    async def main() -> None:
        with trio.fail_after(30):
            with pytest.raises(InvalidRequestError):
                async with open_generation(engine, "word " * 3000, GREEDY):
                    pass  # pragma: no cover
            with pytest.raises(InvalidRequestError):
                async with open_generation(engine, "hi", SamplingParams(max_tokens=N_CTX)):
                    pass  # pragma: no cover
            async with open_generation(engine, "hi", SamplingParams(max_tokens=1, temperature=0.0)) as gen:
                assert len([t async for t in gen]) <= 1

    trio.run(main)


def test_all_compute_runs_on_the_engines_one_thread(engine: Engine) -> None:
    # One OpenMP pool per engine (rbee/worker/native_thread.py): whoever calls, the loop
    # (and so on_token) runs on the engine's own thread.
    seen: set[int] = set()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    engine.generate("hi", params, on_token=lambda i, t: seen.add(threading.get_ident()))
    caller = threading.Thread(target=lambda: engine.generate("hi", params,
                                                             on_token=lambda i, t: seen.add(threading.get_ident())))
    caller.start()
    caller.join()
    trio.run(trio.to_thread.run_sync, lambda: engine.generate("hi", params,
                                                              on_token=lambda i, t: seen.add(threading.get_ident())))
    assert len(seen) == 1 and threading.get_ident() not in seen


def test_close_during_a_generation_stops_it_then_frees(embedded_model: Path) -> None:
    async def main() -> GenerationResult | None:
        own = Engine.load(embedded_model, n_ctx=512, n_threads=THREADS)
        with trio.fail_after(60):
            async with open_generation(own, PROMPTS[0], SamplingParams(max_tokens=400, temperature=0.0)) as gen:
                async for token in gen:
                    if token.i == 1:
                        own.close()  # blocks until the loop has stopped, then frees everything
                        break
        own.close()  # idempotent
        with pytest.raises(InvalidRequestError, match="closed"):
            own.count_tokens("hi")
        return gen.result

    result = trio.run(main)
    assert result is not None and result.stop_reason == "cancelled" and result.tokens_out < 400
