/*
 * rbee_core.h: rbee's native token loop over llama.cpp.
 *
 * The shape follows llama.h: opaque handles, *_default_params(), every fallible call
 * returns an rbee_status, and ownership is written next to each function.
 *
 *   rbee_model     one loaded GGUF (weights, vocabulary, chat template) on one backend/device
 *   rbee_context   one llama_context over a model: a KV cache shared by n_seq_max
 *                  sequences, and the step that advances all of them with one llama_decode
 *   rbee_sequence  one slot of a context (seq_id 0 .. n_seq_max-1), owned by the context.
 *                  Everything one stream needs lives here, never in the context: its
 *                  tokens (and which of them are cached in the KV cells), sampler chain,
 *                  stop strings, UTF-8 carry, abort flag, status, error text and figures.
 *
 * Continuous batching, driven by the caller as llama.h is: rbee_context_submit puts a
 * request on a free sequence (the one whose cached tokens share the longest prefix with
 * the prompt); each rbee_context_step builds ONE llama_batch with one token of every
 * decoding sequence plus up to n_chunk prompt tokens of sequences still in prefill
 * (chunked prefill: a long prompt never stalls the others for more than one chunk),
 * calls llama_decode once, samples every sequence that got logits and hands back what
 * happened as events in a caller-provided array. A finished sequence is read
 * (rbee_sequence_get_result) and handed back with rbee_sequence_release.
 *
 * Threading: one thread drives a context (submit, step, release, free). Any thread may
 * call rbee_sequence_cancel, rbee_context_abort and the abort-flag functions at any time.
 * This header is also the cffi cdef: keep it free of preprocessor logic below the marker.
 */
#ifndef RBEE_CORE_H
#define RBEE_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* --- cdef start --- */

typedef enum rbee_status {
    RBEE_STATUS_OK = 0,
    RBEE_STATUS_INVALID_ARGUMENT = 1,    /* a NULL handle, a negative size, a bad parameter */
    RBEE_STATUS_OUT_OF_MEMORY = 2,       /* malloc failed */
    RBEE_STATUS_BACKEND_UNAVAILABLE = 3, /* backend not compiled in, or no such device */
    RBEE_STATUS_MODEL_LOAD_FAILED = 4,   /* llama_model_load_from_file returned NULL */
    RBEE_STATUS_CONTEXT_FAILED = 5,      /* llama_init_from_model or llama_batch_init failed */
    RBEE_STATUS_NO_CHAT_TEMPLATE = 6,    /* chat requested but llama.cpp cannot apply the model's template */
    RBEE_STATUS_TOKENIZE_FAILED = 7,     /* llama_tokenize failed (or produced no token) */
    RBEE_STATUS_PROMPT_TOO_LONG = 8,     /* prompt tokens + max_tokens exceed the sequence's context */
    RBEE_STATUS_SEQUENCE_BUSY = 9,       /* no sequence of the context is free */
    RBEE_STATUS_SAMPLER_FAILED = 10,     /* a llama_sampler_init_* returned NULL */
    RBEE_STATUS_MEMORY_FAILED = 11,      /* llama_memory_seq_rm refused to clear the sequence */
    RBEE_STATUS_DECODE_NO_SLOT = 12,     /* llama_decode returned 1: no KV slot for the batch */
    RBEE_STATUS_DECODE_FAILED = 13,      /* llama_decode returned a negative error */
    RBEE_STATUS_CALLBACK_FAILED = 14,    /* the token callback asked to stop with an error */
    RBEE_STATUS_GRAMMAR_FAILED = 15      /* llama.cpp refused the grammar (llama_sampler_init_grammar gave
                                          * NULL), or the grammar allows no token where one must follow */
} rbee_status;

typedef enum rbee_stop_reason {
    RBEE_STOP_NONE = 0,          /* the loop did not finish (an error status was returned) */
    RBEE_STOP_MAX_TOKENS = 1,    /* max_tokens generated, or (max_tokens -1) the sequence's context is full */
    RBEE_STOP_SEQUENCE = 2,      /* a stop string appeared; neither it nor what follows was emitted */
    RBEE_STOP_EOS = 3,           /* the model sampled an end-of-generation token (llama_vocab_is_eog) */
    RBEE_STOP_CANCELLED = 4      /* rbee_sequence_cancel (or the one-shot loop's abort flag) */
} rbee_stop_reason;

typedef struct rbee_model rbee_model;
typedef struct rbee_context rbee_context;
typedef struct rbee_sequence rbee_sequence;
typedef struct rbee_abort_flag rbee_abort_flag;

/* The stable name of a status ("RBEE_STATUS_DECODE_FAILED"); a static string. */
const char * rbee_status_name(rbee_status status);

/* The last error llama.cpp/ggml logged in this process (empty if none); a static buffer
 * overwritten by later errors, so copy it at once. */
const char * rbee_last_error(void);

/* ---- runtime / build information ---------------------------------------------------- */

/* llama.cpp's version string, the llama.cpp commit and llama-cpp-python version this
 * module was compiled against ("unknown" when the build could not tell), and the system
 * info (SIMD features, OpenMP ...); static strings. */
const char * rbee_llama_version(void);
const char * rbee_llama_commit(void);
const char * rbee_llama_cpp_python_version(void);
const char * rbee_system_info(void);

/* The ggml backend registries compiled into this libllama ("CPU", "CUDA", "MTL", ...). */
int32_t rbee_backend_count(void);
const char * rbee_backend_name(int32_t index);  /* NULL when out of range */
/* Devices of the named registry (case-insensitive); -1 when no such registry. */
int32_t rbee_backend_device_count(const char * backend_name);

/* ---- abort flag --------------------------------------------------------------------- */

/* A flag that any thread may set. Owned by the caller: rbee_abort_flag_free releases it;
 * it must outlive every call it is given to. */
rbee_status rbee_abort_flag_create(rbee_abort_flag ** out);
void rbee_abort_flag_free(rbee_abort_flag * flag);
void rbee_abort_flag_set(rbee_abort_flag * flag);
void rbee_abort_flag_clear(rbee_abort_flag * flag);
bool rbee_abort_flag_is_set(const rbee_abort_flag * flag);

/* ---- model -------------------------------------------------------------------------- */

/* How far a model load has got: the share of the weights' bytes read so far (0..1, 1 once
 * all are), called on the loading thread (llama_model_params.progress_callback). Return
 * false to stop the load: rbee_model_load then fails with RBEE_STATUS_MODEL_LOAD_FAILED. */
typedef bool (*rbee_load_progress_fn)(float progress, void * user_data);

typedef struct rbee_model_params {
    const char * backend;   /* "cpu", "cuda" or "metal" */
    int32_t device;         /* index among that backend's devices (ignored for "cpu") */
    int32_t n_gpu_layers;   /* layers to offload, -1 = all (ignored for "cpu") */
    rbee_load_progress_fn progress;  /* NULL: no progress reports */
    void * progress_user_data;       /* passed to progress as is; borrowed for the load */
} rbee_model_params;

typedef struct rbee_model_info {
    int32_t n_layers;
    int32_t n_ctx_train;
    int32_t n_vocab;
    uint64_t n_params;
    uint64_t size_bytes;
    bool has_chat_template;  /* the GGUF carries one (else chat uses llama.cpp's built-in for the arch, or chatml) */
    char description[128];
} rbee_model_info;

/* One message of a conversation, as llama_chat_message: NUL-terminated UTF-8 strings. */
typedef struct rbee_chat_message {
    const char * role;       /* "system", "user" or "assistant" */
    const char * content;
} rbee_chat_message;

rbee_model_params rbee_model_default_params(void);

/* Loads the GGUF at path. On RBEE_STATUS_OK *out is a new model owned by the caller
 * (free it with rbee_model_free after every context over it). */
rbee_status rbee_model_load(const char * path, const rbee_model_params * params, rbee_model ** out);
void rbee_model_free(rbee_model * model);
rbee_status rbee_model_get_info(const rbee_model * model, rbee_model_info * out);

/* Number of tokens `text` becomes, exactly as rbee_context_submit would feed it
 * (BOS as the model wants; with chat, wrapped in the model's chat template as one user
 * message with the assistant prompt appended). */
rbee_status rbee_model_count_tokens(const rbee_model * model, const char * text, int32_t text_len,
                                    bool chat, int32_t * n_tokens_out);

/* The chat template chat and messages are rendered with: the GGUF's tokenizer.chat_template,
 * or (has_chat_template false) the name of llama.cpp's built-in template used instead
 * ("gemma", "chatml"); a string owned by the model. */
const char * rbee_model_chat_template(const rbee_model * model);

/* Renders n_messages messages with the model's chat template (llama_chat_apply_template),
 * with add_ass the assistant's turn opened at the end. Writes at most `length` bytes to buf
 * (no NUL added) and returns the total bytes of the rendering: call again with a bigger
 * buffer when that is more than `length`. A negative value is -rbee_status on failure
 * (RBEE_STATUS_NO_CHAT_TEMPLATE: a template llama.cpp does not know). */
int32_t rbee_model_apply_chat_template(const rbee_model * model, const rbee_chat_message * messages,
                                       int32_t n_messages, bool add_ass, char * buf, int32_t length);

/* Whether llama.cpp parses `grammar` (GBNF, start symbol "root") for this model's
 * vocabulary: RBEE_STATUS_OK or RBEE_STATUS_GRAMMAR_FAILED (rbee_last_error says why). */
rbee_status rbee_model_check_grammar(const rbee_model * model, const char * grammar);

/* ---- context ------------------------------------------------------------------------ */

typedef struct rbee_context_params {
    uint32_t n_ctx_seq;  /* tokens one sequence may hold (prompt + generated); the KV cache
                          * holds n_ctx_seq * n_seq_max cells, shared by all sequences */
    uint32_t n_seq_max;  /* sequences (slots) this context serves at once */
    uint32_t n_chunk;    /* prompt tokens per step, over all sequences in prefill */
    int32_t n_threads;   /* threads for decode and prefill */
    int32_t flash_attn;  /* -1 auto, 0 off, 1 on */
} rbee_context_params;

rbee_context_params rbee_context_default_params(void);

/* On RBEE_STATUS_OK *out is a new context owned by the caller, with n_seq_max sequences
 * of its own; it borrows `model`, which must outlive it. */
rbee_status rbee_context_create(rbee_model * model, const rbee_context_params * params, rbee_context ** out);
/* Frees the context and its sequences (no sequence pointer may be used afterwards). */
void rbee_context_free(rbee_context * ctx);
/* Tokens one sequence may hold (n_ctx_seq). */
uint32_t rbee_context_n_ctx_seq(const rbee_context * ctx);
uint32_t rbee_context_n_seq_max(const rbee_context * ctx);
uint32_t rbee_context_n_chunk(const rbee_context * ctx);
/* Sequences now in prefill or decode (submitted, not yet finished). */
int32_t rbee_context_n_active(const rbee_context * ctx);
/* Sequences free for a submit. */
int32_t rbee_context_n_free(const rbee_context * ctx);

/* Forgets the cached prompt prefix of every free sequence (their KV cells are removed):
 * memory back, and a known-empty cache for comparisons with a fresh llama.cpp context. */
rbee_status rbee_context_clear_cache(rbee_context * ctx);

/* Any thread: make a running llama_decode return at its next graph node and fail every
 * later step. For shutdown only (a stream is cancelled with rbee_sequence_cancel). */
void rbee_context_abort(rbee_context * ctx);

/* ---- requests and steps ------------------------------------------------------------ */

typedef struct rbee_generate_params {
    const char * prompt;       /* UTF-8, prompt_len bytes, need not be NUL-terminated */
    int32_t prompt_len;
    bool chat;                 /* wrap the prompt in the model's chat template (one user message) */
    const rbee_chat_message * messages; /* n_messages > 0: the prompt is this conversation rendered
                                * with the model's chat template, the assistant's turn opened
                                * (prompt and chat are then ignored); copied by submit */
    int32_t n_messages;
    int32_t max_tokens;        /* >= 1, or -1: until end of generation or the sequence's context is full */
    float temperature;         /* 0 = greedy */
    float top_p;
    int32_t top_k;
    float min_p;
    float repeat_penalty;      /* 1.0 = off */
    float frequency_penalty;   /* OpenAI's: minus this times the token's count so far; 0 = off */
    float presence_penalty;    /* OpenAI's: minus this once a token appeared; 0 = off */
    const char * grammar;      /* GBNF (start symbol "root") the output must follow; NULL or "" = none */
    uint32_t seed;             /* 0xFFFFFFFF (LLAMA_DEFAULT_SEED) = random */
    const char * const * stop; /* n_stop NUL-terminated UTF-8 strings, copied by submit */
    int32_t n_stop;
    bool cache_prompt;         /* reuse the longest cached prefix of the prompt (default true) */
    int32_t notify_fd;         /* -1 = none; else one byte is written to this (non-blocking) fd
                                * after every step that gave this sequence an event, from C and
                                * outside any lock of the caller's: at the start of the next step
                                * (so the caller has handled the events first) or by
                                * rbee_context_flush_notify. An event loop wakes up without the
                                * caller making a syscall per token. */
} rbee_generate_params;

rbee_generate_params rbee_generate_default_params(void);

/* Number of prompt tokens of a request, exactly as rbee_context_submit feeds them (the
 * raw prompt, the prompt as one user message with chat, or the rendered messages). */
rbee_status rbee_model_count_request_tokens(const rbee_model * model, const rbee_generate_params * params,
                                            int32_t * n_tokens_out);

/* Puts a request on a free sequence: tokenizes it (as rbee_model_count_request_tokens counts),
 * checks that prompt + max_tokens fit n_ctx_seq (max_tokens -1: that one token fits; it
 * then may generate until the context is full), copies the stop strings, builds the
 * sampler (and the grammar sampler, RBEE_STATUS_GRAMMAR_FAILED when llama.cpp refuses the
 * grammar) and picks the free sequence whose cached tokens share the longest prefix with
 * the prompt (with cache_prompt; among equals, and without it, the one caching least, then
 * the lowest seq_id). The shared cells are
 * kept, the rest of that sequence's cells removed; at least the last prompt token is
 * always evaluated again. The request runs from the next step on.
 * On RBEE_STATUS_OK *out is that sequence (owned by the context); on an error no sequence
 * changed. RBEE_STATUS_SEQUENCE_BUSY: no sequence is free. */
rbee_status rbee_context_submit(rbee_context * ctx, const rbee_generate_params * params, rbee_sequence ** out);

typedef enum rbee_event_kind {
    RBEE_EVENT_PIECE = 1,     /* text: whole UTF-8, no stop string in it */
    RBEE_EVENT_PREFILL = 2,   /* a prompt chunk was evaluated: done of total prompt tokens */
    RBEE_EVENT_FINISHED = 3   /* the sequence ended: read it, then rbee_sequence_release it */
} rbee_event_kind;

typedef struct rbee_event {
    rbee_event_kind kind;
    int32_t seq_id;
    rbee_sequence * seq;
    int32_t index;            /* PIECE: the piece's index in its stream (0, 1, ...); PREFILL: tokens done */
    int32_t total;            /* PREFILL: the prompt's tokens (cached ones included) */
    const char * text;        /* PIECE: len bytes, borrowed until the next step or release */
    size_t len;
} rbee_event;

/* The most events one step can write: two per sequence (a piece and its end). */
int32_t rbee_context_max_events(const rbee_context * ctx);

/* Advances every active sequence by one llama_decode: cancelled sequences end (their KV
 * cells freed, nobody else touched), then one batch holds one token of every decoding
 * sequence plus up to n_chunk prompt tokens of sequences in prefill (oldest submit
 * first); every sequence that got logits is sampled.
 * Returns the number of events written to events[0 .. n_events), or -n when n_events is
 * smaller than the n this step may need (nothing was done: call again with room for n).
 * 0 means nothing is active. *status is OK, or the error of a failed llama_decode: every
 * sequence of that step then ends with that status and the same error text. */
int32_t rbee_context_step(rbee_context * ctx, rbee_event * events, int32_t n_events, rbee_status * status);

/* Writes the wake-up byte of every sequence whose events are not yet signalled (call it
 * when the driving thread is about to sleep instead of stepping). */
void rbee_context_flush_notify(rbee_context * ctx);

/* ---- sequence ----------------------------------------------------------------------- */

typedef struct rbee_generation_result {
    int32_t prompt_tokens;
    int32_t prompt_tokens_cached; /* of prompt_tokens, taken from the KV cache, not evaluated */
    int32_t tokens_generated;  /* tokens sampled (an end-of-generation token is not counted) */
    int32_t pieces_emitted;    /* PIECE events */
    rbee_stop_reason stop_reason;
    double prefill_ms;         /* from submit to the end of the prompt's evaluation */
    double time_to_first_token_ms; /* from submit until the first piece was handed over */
    double decode_ms;          /* from the end of prefill to the end of the stream */
    double tokens_per_sec;     /* tokens_generated / decode_ms */
    double sample_ms;          /* of decode_ms: sampling + detokenizing + stop-string checks */
    double callback_ms;        /* rbee_context_generate only: inside on_token */
} rbee_generation_result;

int32_t rbee_sequence_id(const rbee_sequence * seq);
/* Any thread, any time, idempotent: the sequence ends with RBEE_STOP_CANCELLED at the next
 * step boundary (within one prefill chunk), its KV cells freed. */
void rbee_sequence_cancel(rbee_sequence * seq);
/* After its FINISHED event: RBEE_STATUS_OK, or the error that ended it. */
rbee_status rbee_sequence_status(const rbee_sequence * seq);
/* The sequence's own error text (empty when none); valid until its release. */
const char * rbee_sequence_error(const rbee_sequence * seq);
/* Its figures (also while it runs: what was measured so far). */
rbee_status rbee_sequence_get_result(const rbee_sequence * seq, rbee_generation_result * out);
/* Hands a finished sequence back to the context (its cells stay cached for prefix reuse).
 * RBEE_STATUS_INVALID_ARGUMENT if it has not finished. */
rbee_status rbee_sequence_release(rbee_sequence * seq);

/* ---- the one-shot loop ------------------------------------------------------------- */

/* Called once per piece of whole UTF-8 text; `text` (len bytes, not NUL-terminated) is
 * borrowed for the call. Return 0 to go on, non-zero to stop with RBEE_STATUS_CALLBACK_FAILED. */
typedef int (*rbee_token_callback)(void * user_data, int32_t index, const char * text, size_t len);

/* A token callback that discards every piece: the bare loop, for warm-up and benchmarks. */
int rbee_discard_token(void * user_data, int32_t index, const char * text, size_t len);

/* A thin loop over the step API: submit, step until this request ends, release. Only on a
 * context with no other active sequence (else RBEE_STATUS_SEQUENCE_BUSY). `abort` (may be
 * NULL) cancels it. `out` is filled even when an error status is returned. */
rbee_status rbee_context_generate(rbee_context * ctx, const rbee_generate_params * params, rbee_abort_flag * abort,
                                  rbee_token_callback on_token, void * user_data, rbee_generation_result * out);

/* --- cdef end --- */

#ifdef __cplusplus
}
#endif

#endif /* RBEE_CORE_H */
