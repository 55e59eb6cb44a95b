/*
 * rbee_internal.h: the handle structs and helpers shared by rbee_core.c (runtime, model,
 * context, sequence lifetime) and rbee_generate.c (the token loop). Not in the cdef.
 */
#ifndef RBEE_INTERNAL_H
#define RBEE_INTERNAL_H

#include <stdatomic.h>

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

struct rbee_context {
    rbee_model * model;               /* borrowed */
    struct llama_context * lctx;      /* owned */
    struct llama_batch batch;         /* owned; n_batch tokens, one seq_id each */
    bool batch_allocated;
    uint32_t n_batch;
    uint32_t n_seq_max;
    uint32_t n_ctx_seq;
    rbee_sequence ** sequences;       /* owned array of n_seq_max borrowed pointers */
    /* The abort flag of the sequence being prefilled, read by llama.cpp between graph
     * nodes so that a long prompt can be abandoned mid-batch. */
    _Atomic(rbee_abort_flag *) prefill_abort;
};

struct rbee_sequence {
    rbee_context * ctx;               /* borrowed */
    int32_t seq_id;
    struct llama_sampler * chain;     /* owned; rebuilt per request; NULL on the greedy fast path */
    rbee_text_stream text;            /* owned buffers: UTF-8 carry, stop-string holdback */
    char * piece;                     /* owned scratch for llama_token_to_piece */
    int32_t piece_cap;
};

/* Monotonic milliseconds. */
double rbee_now_ms(void);

/* Forgets the last captured llama.cpp error (before a call whose failure we explain). */
void rbee_clear_last_error(void);

/* Tokenizes request text exactly as a generation feeds it (chat template when asked, BOS
 * as the model wants). On OK *tokens is malloc'd, owned by the caller. */
rbee_status rbee_tokenize_request(const rbee_model * model, const char * text, int32_t text_len, bool chat,
                                  llama_token ** tokens, int32_t * n_tokens);

#endif /* RBEE_INTERNAL_H */
