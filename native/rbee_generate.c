/*
 * rbee_generate.c: the token loop of one sequence: sampler chain, prefill in batches,
 * sample / detokenize / decode until a stop condition. See rbee_sequence_generate in
 * rbee_core.h for the contract.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rbee_internal.h"

/* Adds `s` (owned from now on) to the chain; NULL means its init failed. */
static bool chain_add(struct llama_sampler * chain, struct llama_sampler * s) {
    if (s == NULL) {
        return false;
    }
    llama_sampler_chain_add(chain, s); /* the chain owns s from here */
    return true;
}

/* Builds the request's sampler chain in llama.cpp's usual order. Greedy without a
 * penalty needs no chain: the loop takes the argmax of the logits itself (the same
 * first-maximum rule as llama_sampler_init_greedy, without building a 262k-entry
 * candidate array per token). */
static rbee_status sequence_build_sampler(rbee_sequence * seq, const rbee_generate_params * p) {
    if (seq->chain != NULL) {
        llama_sampler_free(seq->chain);
        seq->chain = NULL;
    }
    bool penalty = p->repeat_penalty != 1.0f;
    if (p->temperature <= 0.0f && !penalty) {
        return RBEE_STATUS_OK;
    }
    struct llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    seq->chain = llama_sampler_chain_init(cp);
    if (seq->chain == NULL) {
        return RBEE_STATUS_SAMPLER_FAILED;
    }
    bool ok = true;
    if (penalty) {
        int32_t n_vocab = llama_vocab_n_tokens(seq->ctx->model->vocab);
        ok = ok && chain_add(seq->chain, llama_sampler_init_penalties(n_vocab, 64, p->repeat_penalty, 0.0f, 0.0f));
    }
    if (p->temperature <= 0.0f) {
        ok = ok && chain_add(seq->chain, llama_sampler_init_greedy());
    } else {
        if (p->top_k > 0) {
            ok = ok && chain_add(seq->chain, llama_sampler_init_top_k(p->top_k));
        }
        ok = ok && chain_add(seq->chain, llama_sampler_init_top_p(p->top_p, 1));
        ok = ok && chain_add(seq->chain, llama_sampler_init_min_p(p->min_p, 1));
        ok = ok && chain_add(seq->chain, llama_sampler_init_temp(p->temperature));
        ok = ok && chain_add(seq->chain, llama_sampler_init_dist(p->seed));
    }
    return ok ? RBEE_STATUS_OK : RBEE_STATUS_SAMPLER_FAILED;
}

/* Picks the next token from the logits of batch row `idx`. */
static rbee_status sequence_sample(rbee_sequence * seq, int32_t idx, llama_token * out) {
    struct llama_context * lctx = seq->ctx->lctx;
    if (seq->chain != NULL) {
        *out = llama_sampler_sample(seq->chain, lctx, idx); /* also accepts the token */
        return *out == LLAMA_TOKEN_NULL ? RBEE_STATUS_SAMPLER_FAILED : RBEE_STATUS_OK;
    }
    const float * logits = llama_get_logits_ith(lctx, idx);
    if (logits == NULL) {
        return RBEE_STATUS_DECODE_FAILED;
    }
    int32_t n_vocab = llama_vocab_n_tokens(seq->ctx->model->vocab);
    /* Keep the running maximum in a register: comparing against logits[best] reloads it
     * every step and costs about 6x more over a 262k vocabulary (~1 ms vs ~0.17 ms a token). */
    int32_t best = 0;
    float max = logits[0];
    for (int32_t i = 1; i < n_vocab; i++) {
        if (logits[i] > max) {
            max = logits[i];
            best = i;
        }
    }
    *out = best;
    return RBEE_STATUS_OK;
}

/* The bytes of one token as text (special tokens render as nothing, like llama-cpp-python). */
static rbee_status sequence_piece(rbee_sequence * seq, llama_token token, int32_t * len) {
    const struct llama_vocab * vocab = seq->ctx->model->vocab;
    int32_t n = llama_token_to_piece(vocab, token, seq->piece, seq->piece_cap, 0, false);
    if (n < 0) {
        char * grown = realloc(seq->piece, (size_t) -n);
        if (grown == NULL) {
            return RBEE_STATUS_OUT_OF_MEMORY;
        }
        seq->piece = grown;
        seq->piece_cap = -n;
        n = llama_token_to_piece(vocab, token, seq->piece, seq->piece_cap, 0, false);
        if (n < 0) {
            return RBEE_STATUS_TOKENIZE_FAILED;
        }
    }
    *len = n;
    return RBEE_STATUS_OK;
}

/* Runs llama_decode on ctx->batch and maps its result. */
static rbee_status context_decode(rbee_context * ctx, bool * aborted) {
    int32_t rc = llama_decode(ctx->lctx, ctx->batch);
    /* Wait for the computation here (as llama-bench does per token) so that the time
     * split of the result charges the decode to decode, not to the sampler that reads
     * the logits first. */
    llama_synchronize(ctx->lctx);
    *aborted = rc == 2;
    if (rc == 0 || rc == 2) return RBEE_STATUS_OK;
    if (rc == 1) return RBEE_STATUS_DECODE_NO_SLOT;
    return RBEE_STATUS_DECODE_FAILED;
}

static void batch_set(struct llama_batch * batch, int32_t row, llama_token token, llama_pos pos, llama_seq_id seq_id,
                      bool logits) {
    batch->token[row] = token;
    batch->pos[row] = pos;
    batch->n_seq_id[row] = 1;
    batch->seq_id[row][0] = seq_id;
    batch->logits[row] = logits;
}

/* Removes every KV cell of this sequence; whole-sequence removal "never fails", but a
 * false here would leave the next request reading stale cells, so it is checked. */
static rbee_status sequence_clear_memory(rbee_sequence * seq) {
    llama_memory_t mem = llama_get_memory(seq->ctx->lctx);
    if (mem == NULL || !llama_memory_seq_rm(mem, seq->seq_id, -1, -1)) {
        return RBEE_STATUS_MEMORY_FAILED;
    }
    return RBEE_STATUS_OK;
}

int rbee_discard_token(void * user_data, int32_t index, const char * text, size_t len) { return 0; }

/* What one rbee_sequence_generate call tracks besides the sequence itself. */
typedef struct generation {
    rbee_sequence * seq;
    rbee_token_callback on_token;
    void * user_data;
    rbee_generation_result * out;
    int32_t notify_fd;
    double t_start;
    double t_first_piece; /* 0 until the first piece is handed over */
} generation;

/* Hands pending[0..n) to the callback as one piece and forgets it. */
static rbee_status emit(generation * g, size_t n) {
    if (n == 0) {
        return RBEE_STATUS_OK;
    }
    rbee_text_stream * ts = &g->seq->text;
    if (g->t_first_piece == 0.0) {
        g->t_first_piece = rbee_now_ms();
    }
    double t0 = rbee_now_ms();
    int rc = g->on_token(g->user_data, g->out->pieces_emitted, ts->pending, n);
    if (g->notify_fd >= 0) {
        /* A full pipe already holds a wake-up for the reader: EAGAIN is fine to drop. */
        const char byte = 1;
        while (write(g->notify_fd, &byte, 1) < 0 && errno == EINTR) {
        }
    }
    g->out->callback_ms += rbee_now_ms() - t0;
    g->out->pieces_emitted++;
    rbee_text_stream_consume(ts, n);
    return rc == 0 ? RBEE_STATUS_OK : RBEE_STATUS_CALLBACK_FAILED;
}

static rbee_status check_params(const rbee_sequence * seq, const rbee_generate_params * p,
                                rbee_token_callback on_token, const rbee_generation_result * out) {
    if (seq == NULL || p == NULL || on_token == NULL || out == NULL || p->prompt_len < 0 ||
        (p->prompt == NULL && p->prompt_len > 0) || p->max_tokens < 1 || !(p->temperature >= 0.0f) ||
        p->n_stop < 0 || (p->n_stop > 0 && p->stop == NULL) || !(p->repeat_penalty > 0.0f)) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    return RBEE_STATUS_OK;
}

/* Decodes the prompt in batches of n_batch; the last row asks for logits. */
static rbee_status prefill(generation * g, const llama_token * tokens, int32_t n_prompt, rbee_abort_flag * abort,
                           int32_t * logits_row, bool * cancelled) {
    rbee_context * ctx = g->seq->ctx;
    rbee_status status = RBEE_STATUS_OK;
    atomic_store_explicit(&ctx->prefill_abort, abort, memory_order_release);
    for (int32_t start = 0; start < n_prompt; start += (int32_t) ctx->n_batch) {
        if (rbee_abort_flag_is_set(abort)) {
            *cancelled = true;
            break;
        }
        int32_t n = n_prompt - start < (int32_t) ctx->n_batch ? n_prompt - start : (int32_t) ctx->n_batch;
        for (int32_t j = 0; j < n; j++) {
            batch_set(&ctx->batch, j, tokens[start + j], start + j, g->seq->seq_id, start + j == n_prompt - 1);
        }
        ctx->batch.n_tokens = n;
        *logits_row = n - 1;
        status = context_decode(ctx, cancelled);
        if (status != RBEE_STATUS_OK || *cancelled) {
            break;
        }
    }
    atomic_store_explicit(&ctx->prefill_abort, NULL, memory_order_release);
    return status;
}

rbee_status rbee_sequence_generate(rbee_sequence * seq, const rbee_generate_params * p, rbee_token_callback on_token,
                                   void * user_data, rbee_generation_result * out) {
    if (out != NULL) {
        memset(out, 0, sizeof(*out));
    }
    rbee_status status = check_params(seq, p, on_token, out);
    if (status != RBEE_STATUS_OK) {
        return status;
    }
    rbee_clear_last_error();
    generation g = {.seq = seq, .on_token = on_token, .user_data = user_data, .out = out,
                    .notify_fd = p->notify_fd, .t_start = rbee_now_ms()};
    rbee_context * ctx = seq->ctx;
    const struct llama_vocab * vocab = ctx->model->vocab;
    llama_token * tokens = NULL;
    int32_t n_prompt = 0;
    double t_prefilled = 0.0;
    bool cancelled = false;

    status = rbee_tokenize_request(ctx->model, p->prompt, p->prompt_len, p->chat, &tokens, &n_prompt);
    if (status != RBEE_STATUS_OK) goto done;
    out->prompt_tokens = n_prompt;
    if (n_prompt == 0) {
        status = RBEE_STATUS_TOKENIZE_FAILED;
        goto done;
    }
    if ((int64_t) n_prompt + p->max_tokens > (int64_t) ctx->n_ctx_seq) {
        status = RBEE_STATUS_PROMPT_TOO_LONG;
        goto done;
    }
    /* The previous request's cells must go before this prompt is placed at position 0. */
    status = sequence_clear_memory(seq);
    if (status != RBEE_STATUS_OK) goto done;
    status = sequence_build_sampler(seq, p);
    if (status != RBEE_STATUS_OK) goto done;
    status = rbee_text_stream_reset(&seq->text, p->stop, p->n_stop);
    if (status != RBEE_STATUS_OK) goto done;

    int32_t row = 0;
    status = prefill(&g, tokens, n_prompt, p->abort, &row, &cancelled);
    if (status != RBEE_STATUS_OK) goto done;
    if (seq->chain != NULL) {
        /* The repeat penalty looks back over the prompt too, as llama-server does. */
        for (int32_t i = 0; i < n_prompt; i++) llama_sampler_accept(seq->chain, tokens[i]);
    }
    t_prefilled = rbee_now_ms();
    out->prefill_ms = t_prefilled - g.t_start;

    llama_pos pos = n_prompt;
    while (!cancelled) {
        llama_token token;
        double t_sample = rbee_now_ms();
        status = sequence_sample(seq, row, &token);
        if (status != RBEE_STATUS_OK) goto done;
        if (llama_vocab_is_eog(vocab, token)) {
            out->stop_reason = RBEE_STOP_EOS;
            break;
        }
        out->tokens_generated++;
        int32_t len = 0;
        size_t emit_len = 0;
        bool stopped = false;
        status = sequence_piece(seq, token, &len);
        if (status != RBEE_STATUS_OK) goto done;
        status = rbee_text_stream_push(&seq->text, seq->piece, (size_t) len, &emit_len, &stopped);
        if (status != RBEE_STATUS_OK) goto done;
        out->sample_ms += rbee_now_ms() - t_sample; /* emit() below is counted in callback_ms */
        status = emit(&g, emit_len);
        if (status != RBEE_STATUS_OK) goto done;
        if (stopped) {
            out->stop_reason = RBEE_STOP_SEQUENCE;
            break;
        }
        if (out->tokens_generated >= p->max_tokens) {
            out->stop_reason = RBEE_STOP_MAX_TOKENS;
            break;
        }
        /* The one place a cancel is noticed between tokens: before paying for a decode. */
        if (rbee_abort_flag_is_set(p->abort)) {
            cancelled = true;
            break;
        }
        batch_set(&ctx->batch, 0, token, pos, seq->seq_id, true);
        ctx->batch.n_tokens = 1;
        status = context_decode(ctx, &cancelled);
        if (status != RBEE_STATUS_OK) goto done;
        pos++;
        row = 0;
    }
    if (cancelled) {
        out->stop_reason = RBEE_STOP_CANCELLED;
    } else if (out->stop_reason != RBEE_STOP_SEQUENCE) {
        /* No stop string can complete any more: what was held back is plain text. */
        status = emit(&g, seq->text.pending_len);
    }

done:
    if (t_prefilled > 0.0) {
        double t_end = rbee_now_ms();
        out->decode_ms = t_end - t_prefilled;
        out->tokens_per_sec = out->decode_ms > 0.0 ? out->tokens_generated * 1e3 / out->decode_ms : 0.0;
        double first = g.t_first_piece > 0.0 ? g.t_first_piece : t_end;
        out->time_to_first_token_ms = first - g.t_start;
    }
    if (status != RBEE_STATUS_OK) {
        out->stop_reason = RBEE_STOP_NONE;
    }
    /* Leave no cells behind, whatever happened: the next request starts clean. */
    if (out->prompt_tokens > 0 && seq != NULL) {
        rbee_status cleared = sequence_clear_memory(seq);
        if (status == RBEE_STATUS_OK) status = cleared;
    }
    free(tokens);
    return status;
}
