/*
 * rbee_core.h: rbee's native token loop over llama.cpp.
 *
 * The shape follows llama.h: opaque handles, *_default_params(), every fallible call
 * returns an rbee_status, and ownership is written next to each function.
 *
 *   rbee_model     one loaded GGUF (weights, vocabulary, chat template) on one backend/device
 *   rbee_context   one llama_context over a model: a KV cache holding up to n_seq_max
 *                  sequences (seq_id 0 .. n_seq_max-1)
 *   rbee_sequence  one stream of generation in a context: its own seq_id, sampler chain,
 *                  stop strings, UTF-8 carry buffer and abort flag
 *
 * Today the worker drives one sequence at a time (rbee_sequence_generate runs the whole
 * prefill + decode loop for that sequence). Serving several streams from one batched
 * llama_decode adds a scheduler over several rbee_sequence objects of the same context;
 * the per-sequence state already lives in rbee_sequence, not in the context.
 *
 * Threading: a model, context or sequence is used by one thread at a time, except
 * rbee_abort_flag_set / rbee_abort_flag_is_set, which any thread may call at any time.
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
    RBEE_STATUS_SEQUENCE_BUSY = 9,       /* seq_id already has a live rbee_sequence */
    RBEE_STATUS_SAMPLER_FAILED = 10,     /* a llama_sampler_init_* returned NULL */
    RBEE_STATUS_MEMORY_FAILED = 11,      /* llama_memory_seq_rm refused to clear the sequence */
    RBEE_STATUS_DECODE_NO_SLOT = 12,     /* llama_decode returned 1: no KV slot for the batch */
    RBEE_STATUS_DECODE_FAILED = 13,      /* llama_decode returned a negative error */
    RBEE_STATUS_CALLBACK_FAILED = 14     /* the token callback asked to stop with an error */
} rbee_status;

typedef enum rbee_stop_reason {
    RBEE_STOP_NONE = 0,          /* the loop did not finish (an error status was returned) */
    RBEE_STOP_MAX_TOKENS = 1,
    RBEE_STOP_SEQUENCE = 2,      /* a stop string appeared; neither it nor what follows was emitted */
    RBEE_STOP_EOS = 3,           /* the model sampled an end-of-generation token (llama_vocab_is_eog) */
    RBEE_STOP_CANCELLED = 4      /* the abort flag was set */
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

/* A flag the token loop reads before every decode step. Owned by the caller:
 * rbee_abort_flag_free releases it; it must outlive every generate call it is given to. */
rbee_status rbee_abort_flag_create(rbee_abort_flag ** out);
void rbee_abort_flag_free(rbee_abort_flag * flag);
void rbee_abort_flag_set(rbee_abort_flag * flag);
void rbee_abort_flag_clear(rbee_abort_flag * flag);
bool rbee_abort_flag_is_set(const rbee_abort_flag * flag);

/* ---- model -------------------------------------------------------------------------- */

typedef struct rbee_model_params {
    const char * backend;   /* "cpu", "cuda" or "metal" */
    int32_t device;         /* index among that backend's devices (ignored for "cpu") */
    int32_t n_gpu_layers;   /* layers to offload, -1 = all (ignored for "cpu") */
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

rbee_model_params rbee_model_default_params(void);

/* Loads the GGUF at path. On RBEE_STATUS_OK *out is a new model owned by the caller
 * (free it with rbee_model_free after every context over it). */
rbee_status rbee_model_load(const char * path, const rbee_model_params * params, rbee_model ** out);
void rbee_model_free(rbee_model * model);
rbee_status rbee_model_get_info(const rbee_model * model, rbee_model_info * out);

/* Number of tokens `text` becomes, exactly as rbee_sequence_generate would feed it
 * (BOS as the model wants; with chat, wrapped in the model's chat template as one user
 * message with the assistant prompt appended). */
rbee_status rbee_model_count_tokens(const rbee_model * model, const char * text, int32_t text_len,
                                    bool chat, int32_t * n_tokens_out);

/* ---- context ------------------------------------------------------------------------ */

typedef struct rbee_context_params {
    uint32_t n_ctx;      /* total KV cells; each sequence gets n_ctx / n_seq_max */
    uint32_t n_batch;    /* prompt tokens per llama_decode during prefill */
    uint32_t n_seq_max;  /* sequences this context can hold at once */
    int32_t n_threads;   /* threads for decode and prefill */
    int32_t flash_attn;  /* -1 auto, 0 off, 1 on */
} rbee_context_params;

rbee_context_params rbee_context_default_params(void);

/* On RBEE_STATUS_OK *out is a new context owned by the caller; it borrows `model`,
 * which must outlive it. Free every sequence of a context before the context. */
rbee_status rbee_context_create(rbee_model * model, const rbee_context_params * params, rbee_context ** out);
void rbee_context_free(rbee_context * ctx);
/* KV cells available to one sequence. */
uint32_t rbee_context_n_ctx_seq(const rbee_context * ctx);

/* ---- sequence ----------------------------------------------------------------------- */

/* On RBEE_STATUS_OK *out is a new sequence owned by the caller, bound to seq_id in ctx
 * (which must outlive it). One live sequence per seq_id. */
rbee_status rbee_sequence_create(rbee_context * ctx, int32_t seq_id, rbee_sequence ** out);
void rbee_sequence_free(rbee_sequence * seq);

typedef struct rbee_generate_params {
    const char * prompt;       /* UTF-8, prompt_len bytes, need not be NUL-terminated */
    int32_t prompt_len;
    bool chat;                 /* wrap the prompt in the model's chat template */
    int32_t max_tokens;        /* >= 1 */
    float temperature;         /* 0 = greedy */
    float top_p;
    int32_t top_k;
    float min_p;
    float repeat_penalty;      /* 1.0 = off */
    uint32_t seed;             /* 0xFFFFFFFF (LLAMA_DEFAULT_SEED) = random */
    const char * const * stop; /* n_stop NUL-terminated UTF-8 strings, borrowed for the call */
    int32_t n_stop;
    rbee_abort_flag * abort;   /* read before every decode step; may be NULL */
    int32_t notify_fd;         /* -1 = none; else after each on_token one byte is written to this
                                * (non-blocking) fd, outside any lock of the caller's, so that an
                                * event loop wakes up without the callback making a syscall */
} rbee_generate_params;

typedef struct rbee_generation_result {
    int32_t prompt_tokens;
    int32_t tokens_generated;  /* tokens sampled (an end-of-generation token is not counted) */
    int32_t pieces_emitted;    /* calls of the token callback */
    rbee_stop_reason stop_reason;
    double prefill_ms;         /* tokenize + prompt decode */
    double time_to_first_token_ms; /* from the call until the first piece was handed over */
    double decode_ms;          /* from the end of prefill to the end of the loop */
    double tokens_per_sec;     /* tokens_generated / decode_ms */
    double sample_ms;          /* of decode_ms: sampling + detokenizing + stop-string checks */
    double callback_ms;        /* of decode_ms: inside on_token (the cost of delivery) */
} rbee_generation_result;

/* Called once per piece of whole UTF-8 text; `text` (len bytes, not NUL-terminated) is
 * borrowed for the call. Return 0 to go on, non-zero to stop with RBEE_STATUS_CALLBACK_FAILED. */
typedef int (*rbee_token_callback)(void * user_data, int32_t index, const char * text, size_t len);

/* A token callback that discards every piece: the bare loop, for warm-up and benchmarks. */
int rbee_discard_token(void * user_data, int32_t index, const char * text, size_t len);

rbee_generate_params rbee_generate_default_params(void);

/* Runs one request on this sequence: clears its KV cells, tokenizes, prefills in batches
 * of n_batch, then samples/decodes until max_tokens, a stop string, end of generation or
 * the abort flag. Blocking; calls on_token from the calling thread. `out` is filled even
 * when an error status is returned (with what was measured so far). The sequence's KV
 * cells are cleared again before returning. */
rbee_status rbee_sequence_generate(rbee_sequence * seq, const rbee_generate_params * params,
                                   rbee_token_callback on_token, void * user_data,
                                   rbee_generation_result * out);

/* --- cdef end --- */

#ifdef __cplusplus
}
#endif

#endif /* RBEE_CORE_H */
