/*
 * rbee_internal.h: the handle structs and helpers shared by rbee_core.c (runtime, model,
 * context, sequence lifetime) and rbee_generate.c (submit, step, the one-shot loop). Not in the cdef.
 */
#ifndef RBEE_INTERNAL_H
#define RBEE_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>

#include "ggml-backend.h"
#include "llama.h"
#include "rbee_core.h"
#include "rbee_text.h"

struct rbee_model {
    struct llama_model * model;        /* owned */
    const struct llama_vocab * vocab;  /* borrowed from model */
    const char * chat_template;        /* borrowed from model, or a static built-in name */
    bool chat_template_builtin;        /* the GGUF had none: chat_template is llama.cpp's built-in */
    ggml_backend_dev_t devices[2];     /* NULL-terminated list handed to llama (must outlive the load) */
};

/* Where a sequence is in its life. */
typedef enum rbee_seq_state {
    RBEE_SEQ_FREE = 0,      /* no request; its cells may still hold a cached prefix */
    RBEE_SEQ_PREFILL = 1,   /* prompt tokens left to evaluate */
    RBEE_SEQ_DECODE = 2,    /* one sampled token waits to be evaluated each step */
    RBEE_SEQ_FINISHED = 3   /* ended (FINISHED event sent); waits for rbee_sequence_release */
} rbee_seq_state;

struct rbee_sequence {
    rbee_context * ctx;               /* borrowed: the context owns the sequence */
    int32_t seq_id;
    rbee_seq_state state;
    atomic_int cancel;                /* set by rbee_sequence_cancel from any thread */
    uint64_t submitted;               /* submit order: prefill goes oldest first */
    /* tokens[0 .. n_cached) have KV cells in the cache for this seq_id (at positions
     * 0 .. n_cached-1); tokens[n_cached .. n_prompt) are prompt tokens still to evaluate. */
    llama_token * tokens;             /* owned; n_ctx_seq entries */
    int32_t n_cached;
    int32_t n_prompt;
    llama_token next;                 /* DECODE: the sampled token to evaluate next */
    int32_t row;                      /* this step: the batch row whose logits are ours, or -1 */
    int32_t chunk;                    /* this step: prompt tokens of ours in the batch */
    int32_t max_tokens;
    bool has_penalty;                 /* the chain has a penalties sampler: it must see the prompt */
    struct llama_sampler * chain;     /* owned; rebuilt per request; NULL on the greedy fast path */
    struct llama_sampler * grammar;   /* owned; the request's grammar sampler, or NULL. Kept beside the
                                       * chain, not in it, as llama-server does (common_sampler's grmr):
                                       * it sees only generated tokens, and is applied to the whole
                                       * vocabulary only when the token the chain picked breaks it */
    llama_token_data * cand;          /* owned: n_vocab candidates, for sampling with a grammar */
    rbee_text_stream text;            /* owned buffers: UTF-8 carry, stop-string holdback */
    char * piece;                     /* owned scratch for llama_token_to_piece */
    int32_t piece_cap;
    char * out;                       /* owned: the text of this step's PIECE event */
    size_t out_cap;
    int32_t notify_fd;
    bool notify_pending;
    rbee_status status;
    char error[256];
    rbee_generation_result result;
    double t_submit, t_prefilled, t_first_piece;
};

struct rbee_context {
    rbee_model * model;               /* borrowed */
    struct llama_context * lctx;      /* owned */
    struct llama_batch batch;         /* owned; n_chunk + n_seq_max rows */
    bool batch_allocated;
    uint32_t n_chunk;
    uint32_t n_seq_max;
    uint32_t n_ctx_seq;
    rbee_sequence * sequences;        /* owned array of n_seq_max */
    uint64_t clock;                   /* ticks per submit: submitted */
    atomic_bool aborted;              /* rbee_context_abort: shutdown */
};

/* Monotonic milliseconds. */
double rbee_now_ms(void);

/* Forgets the last captured llama.cpp error (before a call whose failure we explain). */
void rbee_clear_last_error(void);

/* Tokenizes a request's prompt exactly as a generation feeds it (the messages or, with
 * chat, the prompt as one user message through the chat template; BOS as the model wants).
 * On OK *tokens is malloc'd, owned by the caller. */
rbee_status rbee_tokenize_request(const rbee_model * model, const rbee_generate_params * params,
                                  llama_token ** tokens, int32_t * n_tokens);

#endif /* RBEE_INTERNAL_H */
