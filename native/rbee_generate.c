/*
 * rbee_generate.c: continuous batching. rbee_context_submit puts a request on a free
 * sequence (prefix reuse), rbee_context_step advances every active sequence with one
 * llama_decode, rbee_context_generate is the one-shot loop over both. See rbee_core.h.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
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

static bool has_penalty(const rbee_generate_params * p) {
    return p->repeat_penalty != 1.0f || p->frequency_penalty != 0.0f || p->presence_penalty != 0.0f;
}

/* Builds the request's sampler chain in llama.cpp's usual order, and its grammar sampler
 * (beside the chain, see sequence_sample). Greedy without a penalty needs no chain: the
 * loop takes the argmax of the logits itself (the same first-maximum rule as
 * llama_sampler_init_greedy, without building a 262k-entry candidate array per token). */
static rbee_status sequence_build_sampler(rbee_sequence * seq, const rbee_generate_params * p) {
    if (seq->chain != NULL) {
        llama_sampler_free(seq->chain);
        seq->chain = NULL;
    }
    if (seq->grammar != NULL) {
        llama_sampler_free(seq->grammar);
        seq->grammar = NULL;
    }
    if (p->grammar != NULL && p->grammar[0] != '\0') {
        seq->grammar = llama_sampler_init_grammar(seq->ctx->model->vocab, p->grammar, "root");
        if (seq->grammar == NULL) {
            return RBEE_STATUS_GRAMMAR_FAILED; /* llama.cpp logged why (rbee_last_error) */
        }
        if (seq->cand == NULL) {
            int32_t n_vocab = llama_vocab_n_tokens(seq->ctx->model->vocab);
            seq->cand = malloc((size_t) n_vocab * sizeof(llama_token_data));
            if (seq->cand == NULL) {
                return RBEE_STATUS_OUT_OF_MEMORY;
            }
        }
    }
    bool penalty = has_penalty(p);
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
        ok = ok && chain_add(seq->chain, llama_sampler_init_penalties(n_vocab, 64, p->repeat_penalty,
                                                                       p->frequency_penalty, p->presence_penalty));
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

/* The index of the largest of n values (the first of equals), or -1 when all are -inf. */
static int32_t argmax_logits(const float * logits, int32_t n) {
    /* Keep the running maximum in a register: comparing against logits[best] reloads it
     * every step and costs about 6x more over a 262k vocabulary (~1 ms vs ~0.17 ms a token). */
    int32_t best = -1;
    float max = -INFINITY;
    for (int32_t i = 0; i < n; i++) {
        if (logits[i] > max) {
            max = logits[i];
            best = i;
        }
    }
    return best;
}

/* The whole vocabulary as candidates with the logits of the row, in seq->cand. */
static llama_token_data_array sequence_candidates(rbee_sequence * seq, const float * logits) {
    int32_t n_vocab = llama_vocab_n_tokens(seq->ctx->model->vocab);
    for (int32_t i = 0; i < n_vocab; i++) {
        seq->cand[i] = (llama_token_data){.id = i, .logit = logits[i], .p = 0.0f};
    }
    return (llama_token_data_array){.data = seq->cand, .size = (size_t) n_vocab, .selected = -1, .sorted = false};
}

/* Whether the grammar lets `token` come next (the check llama-server's common_sampler_sample
 * makes on the token the chain picked, before it resamples). */
static bool grammar_allows(struct llama_sampler * grammar, llama_token token) {
    llama_token_data one = {.id = token, .logit = 1.0f, .p = 0.0f};
    llama_token_data_array arr = {.data = &one, .size = 1, .selected = -1, .sorted = false};
    llama_sampler_apply(grammar, &arr);
    return arr.data[0].logit != -INFINITY;
}

/* Sampling under a grammar, as llama-server does it (common/sampling.cpp,
 * common_sampler_sample without grammar_first): pick a token the usual way (the chain, or
 * the argmax); only if the grammar refuses it, apply the grammar to every candidate (it sets
 * the refused ones to -inf) and pick again from what is left. The grammar then accepts the
 * token (never an end-of-generation one: the grammar allows those only once it is complete,
 * and the sequence ends there). Applying the grammar to 262k candidates costs far more than
 * the check of one token, and most tokens pass the check. */
static rbee_status sequence_sample_grammar(rbee_sequence * seq, const float * logits, llama_token * out) {
    int32_t n_vocab = llama_vocab_n_tokens(seq->ctx->model->vocab);
    llama_token token;
    if (seq->chain != NULL) {
        llama_token_data_array arr = sequence_candidates(seq, logits);
        llama_sampler_apply(seq->chain, &arr);
        if (arr.selected < 0 || (size_t) arr.selected >= arr.size) {
            return RBEE_STATUS_SAMPLER_FAILED;
        }
        token = arr.data[arr.selected].id;
    } else {
        token = argmax_logits(logits, n_vocab);
    }
    if (token < 0 || !grammar_allows(seq->grammar, token)) {
        llama_token_data_array arr = sequence_candidates(seq, logits);
        llama_sampler_apply(seq->grammar, &arr);
        if (seq->chain != NULL) {
            llama_sampler_apply(seq->chain, &arr);
            if (arr.selected < 0 || (size_t) arr.selected >= arr.size || arr.data[arr.selected].logit == -INFINITY) {
                return RBEE_STATUS_GRAMMAR_FAILED; /* no token the grammar allows */
            }
            token = arr.data[arr.selected].id;
        } else {
            int32_t best = -1;
            float max = -INFINITY;
            for (size_t i = 0; i < arr.size; i++) {
                if (arr.data[i].logit > max) {
                    max = arr.data[i].logit;
                    best = (int32_t) i;
                }
            }
            if (best < 0) {
                return RBEE_STATUS_GRAMMAR_FAILED;
            }
            token = arr.data[best].id;
        }
    }
    if (!llama_vocab_is_eog(seq->ctx->model->vocab, token)) {
        llama_sampler_accept(seq->grammar, token);
    }
    if (seq->chain != NULL) {
        llama_sampler_accept(seq->chain, token);
    }
    *out = token;
    return RBEE_STATUS_OK;
}

/* Picks the next token from the logits of batch row `idx`. */
static rbee_status sequence_sample(rbee_sequence * seq, int32_t idx, llama_token * out) {
    struct llama_context * lctx = seq->ctx->lctx;
    if (seq->grammar != NULL) {
        const float * logits = llama_get_logits_ith(lctx, idx);
        return logits == NULL ? RBEE_STATUS_DECODE_FAILED : sequence_sample_grammar(seq, logits, out);
    }
    if (seq->chain != NULL) {
        *out = llama_sampler_sample(seq->chain, lctx, idx); /* also accepts the token */
        return *out == LLAMA_TOKEN_NULL ? RBEE_STATUS_SAMPLER_FAILED : RBEE_STATUS_OK;
    }
    const float * logits = llama_get_logits_ith(lctx, idx);
    if (logits == NULL) {
        return RBEE_STATUS_DECODE_FAILED;
    }
    int32_t best = argmax_logits(logits, llama_vocab_n_tokens(seq->ctx->model->vocab));
    *out = best < 0 ? 0 : best; /* all -inf cannot come from a decode; keep the greedy sampler's answer */
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

static void batch_set(struct llama_batch * batch, int32_t row, llama_token token, llama_pos pos, llama_seq_id seq_id,
                      bool logits) {
    batch->token[row] = token;
    batch->pos[row] = pos;
    batch->n_seq_id[row] = 1;
    batch->seq_id[row][0] = seq_id;
    batch->logits[row] = logits;
}

/* Removes this sequence's cells from position `from` on. A partial removal can be refused
 * by some caches; the whole sequence then goes (whole-sequence removal never fails, but a
 * false would leave stale cells, so it is checked). Returns the cells kept. */
static int32_t sequence_trim_memory(rbee_sequence * seq, int32_t from, rbee_status * status) {
    llama_memory_t mem = llama_get_memory(seq->ctx->lctx);
    *status = RBEE_STATUS_OK;
    if (mem == NULL) {
        *status = RBEE_STATUS_MEMORY_FAILED;
        return 0;
    }
    if (from > 0 && llama_memory_seq_rm(mem, seq->seq_id, from, -1)) {
        return from;
    }
    if (!llama_memory_seq_rm(mem, seq->seq_id, -1, -1)) {
        *status = RBEE_STATUS_MEMORY_FAILED;
    }
    return 0;
}

rbee_status rbee_context_clear_cache(rbee_context * ctx) {
    if (ctx == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    rbee_status status = RBEE_STATUS_OK;
    for (uint32_t i = 0; i < ctx->n_seq_max; i++) {
        rbee_sequence * seq = &ctx->sequences[i];
        if (seq->state == RBEE_SEQ_FREE && seq->n_cached > 0) {
            rbee_status cleared;
            seq->n_cached = sequence_trim_memory(seq, 0, &cleared);
            if (cleared != RBEE_STATUS_OK) status = cleared;
        }
    }
    return status;
}

int rbee_discard_token(void * user_data, int32_t index, const char * text, size_t len) { return 0; }

static void write_notify(int fd) {
    /* A full pipe already holds a wake-up for the reader: EAGAIN is fine to drop. */
    const char byte = 1;
    while (write(fd, &byte, 1) < 0 && errno == EINTR) {
    }
}

void rbee_context_flush_notify(rbee_context * ctx) {
    for (uint32_t i = 0; ctx != NULL && i < ctx->n_seq_max; i++) {
        rbee_sequence * seq = &ctx->sequences[i];
        if (seq->notify_pending && seq->notify_fd >= 0) {
            write_notify(seq->notify_fd);
        }
        seq->notify_pending = false;
    }
}

static rbee_status check_params(const rbee_generate_params * p) {
    if (p == NULL || p->prompt_len < 0 || (p->prompt == NULL && p->prompt_len > 0) ||
        (p->max_tokens < 1 && p->max_tokens != -1) || p->n_messages < 0 || (p->n_messages > 0 && p->messages == NULL) ||
        !(p->temperature >= 0.0f) || p->n_stop < 0 || (p->n_stop > 0 && p->stop == NULL) ||
        !(p->repeat_penalty > 0.0f) || !isfinite(p->frequency_penalty) || !isfinite(p->presence_penalty)) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    return RBEE_STATUS_OK;
}

/* The free sequence to put `tokens` on, and how many of its cached tokens it shares. */
static rbee_sequence * pick_sequence(rbee_context * ctx, const llama_token * tokens, int32_t n, bool reuse,
                                     int32_t * common_out) {
    rbee_sequence * best = NULL;
    int32_t best_score = -1;
    int32_t best_common = 0;
    for (uint32_t i = 0; i < ctx->n_seq_max; i++) {
        rbee_sequence * seq = &ctx->sequences[i];
        if (seq->state != RBEE_SEQ_FREE) {
            continue;
        }
        int32_t common = 0;
        if (reuse) {
            int32_t limit = seq->n_cached < n ? seq->n_cached : n;
            while (common < limit && seq->tokens[common] == tokens[common]) {
                common++;
            }
        }
        /* A shared prefix decides only when it is at least half of the prompt (as
         * llama-server's slot similarity of 0.5): a BOS or a chat template's first tokens
         * in common are not worth evicting another conversation's whole cache. Then the
         * longest shared prefix; among equals the one caching least, so that a cache
         * someone may come back to survives longest (then the lowest seq_id). */
        int32_t score = 2 * common >= n ? common : 0;
        if (score > best_score || (score == best_score && seq->n_cached < best->n_cached)) {
            best = seq;
            best_score = score;
            best_common = common;
        }
    }
    *common_out = best_common;
    return best;
}

rbee_status rbee_context_submit(rbee_context * ctx, const rbee_generate_params * p, rbee_sequence ** out) {
    if (ctx == NULL || out == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    *out = NULL;
    rbee_status status = check_params(p);
    if (status != RBEE_STATUS_OK) {
        return status;
    }
    if (rbee_context_n_free(ctx) == 0) {
        return RBEE_STATUS_SEQUENCE_BUSY;
    }
    rbee_clear_last_error();
    double t_submit = rbee_now_ms();
    llama_token * tokens = NULL;
    int32_t n_prompt = 0;
    status = rbee_tokenize_request(ctx->model, p, &tokens, &n_prompt);
    if (status != RBEE_STATUS_OK) goto done;
    if (n_prompt == 0) {
        status = RBEE_STATUS_TOKENIZE_FAILED;
        goto done;
    }
    /* max_tokens -1 (no limit): until end of generation or the sequence's context is full,
     * so at least one token must fit. */
    int32_t max_tokens = p->max_tokens > 0 ? p->max_tokens : (int32_t) ctx->n_ctx_seq - n_prompt;
    if (max_tokens < 1 || (int64_t) n_prompt + max_tokens > (int64_t) ctx->n_ctx_seq) {
        status = RBEE_STATUS_PROMPT_TOO_LONG;
        goto done;
    }
    int32_t common = 0;
    rbee_sequence * seq = pick_sequence(ctx, tokens, n_prompt, p->cache_prompt, &common);
    /* Everything that can fail without touching the sequence's cells comes first. */
    status = sequence_build_sampler(seq, p);
    if (status != RBEE_STATUS_OK) goto done;
    status = rbee_text_stream_reset(&seq->text, p->stop, p->n_stop);
    if (status != RBEE_STATUS_OK) goto done;
    /* The last prompt token is always evaluated again: its logits pick the first token. */
    int32_t keep = common < n_prompt - 1 ? common : n_prompt - 1;
    keep = sequence_trim_memory(seq, keep, &status);
    if (status != RBEE_STATUS_OK) {
        seq->n_cached = 0;
        goto done;
    }
    memcpy(seq->tokens, tokens, (size_t) n_prompt * sizeof(llama_token));
    seq->n_cached = keep;
    seq->n_prompt = n_prompt;
    seq->max_tokens = max_tokens;
    seq->has_penalty = has_penalty(p);
    seq->status = RBEE_STATUS_OK;
    seq->error[0] = '\0';
    seq->notify_fd = p->notify_fd;
    seq->notify_pending = false;
    atomic_store_explicit(&seq->cancel, 0, memory_order_release);
    memset(&seq->result, 0, sizeof(seq->result));
    seq->result.prompt_tokens = n_prompt;
    seq->result.prompt_tokens_cached = keep;
    seq->t_submit = t_submit;
    seq->t_prefilled = 0.0;
    seq->t_first_piece = 0.0;
    seq->submitted = ++ctx->clock;
    seq->state = RBEE_SEQ_PREFILL;
    *out = seq;
done:
    free(tokens);
    return status;
}

/* Hands the text pending[0..n) out as this step's PIECE event of `seq`. */
static rbee_status emit(rbee_sequence * seq, size_t n, rbee_event * ev, int32_t * n_ev) {
    if (n == 0) {
        return RBEE_STATUS_OK;
    }
    rbee_text_stream * ts = &seq->text;
    if (n > seq->out_cap) {
        char * grown = realloc(seq->out, n);
        if (grown == NULL) {
            return RBEE_STATUS_OUT_OF_MEMORY;
        }
        seq->out = grown;
        seq->out_cap = n;
    }
    memcpy(seq->out, ts->pending, n);
    rbee_text_stream_consume(ts, n);
    if (seq->t_first_piece == 0.0) {
        seq->t_first_piece = rbee_now_ms();
        seq->result.time_to_first_token_ms = seq->t_first_piece - seq->t_submit;
    }
    rbee_event * e = &ev[(*n_ev)++];
    *e = (rbee_event){.kind = RBEE_EVENT_PIECE, .seq_id = seq->seq_id, .seq = seq,
                      .index = seq->result.pieces_emitted++, .text = seq->out, .len = n};
    seq->notify_pending = true;
    return RBEE_STATUS_OK;
}

/* Ends `seq` with `reason` (or an error status) and writes its FINISHED event. Cancelled or
 * failed streams give their cells back at once; a finished one keeps them for reuse. */
static void finish(rbee_sequence * seq, rbee_stop_reason reason, rbee_status status, const char * error,
                   rbee_event * ev, int32_t * n_ev) {
    double now = rbee_now_ms();
    rbee_generation_result * r = &seq->result;
    if (seq->t_prefilled > 0.0) {
        r->decode_ms = now - seq->t_prefilled;
        r->tokens_per_sec = r->decode_ms > 0.0 ? r->tokens_generated * 1e3 / r->decode_ms : 0.0;
    }
    if (seq->t_first_piece == 0.0) {
        r->time_to_first_token_ms = now - seq->t_submit;
    }
    r->stop_reason = status == RBEE_STATUS_OK ? reason : RBEE_STOP_NONE;
    seq->status = status;
    if (error != NULL) {
        snprintf(seq->error, sizeof(seq->error), "%s", error);
    }
    if (status != RBEE_STATUS_OK || reason == RBEE_STOP_CANCELLED) {
        rbee_status ignored;
        seq->n_cached = sequence_trim_memory(seq, 0, &ignored);
    }
    seq->state = RBEE_SEQ_FINISHED;
    rbee_event * e = &ev[(*n_ev)++];
    *e = (rbee_event){.kind = RBEE_EVENT_FINISHED, .seq_id = seq->seq_id, .seq = seq};
    seq->notify_pending = true;
}

/* After the batch was decoded: sample `seq` from its row, emit, and decide whether it ends. */
static void sequence_advance(rbee_sequence * seq, rbee_event * ev, int32_t * n_ev) {
    const struct llama_vocab * vocab = seq->ctx->model->vocab;
    rbee_generation_result * r = &seq->result;
    double t_sample = rbee_now_ms();
    llama_token token;
    rbee_status status = sequence_sample(seq, seq->row, &token);
    if (status != RBEE_STATUS_OK) {
        finish(seq, RBEE_STOP_NONE, status,
               status == RBEE_STATUS_GRAMMAR_FAILED ? "the grammar allows no token here" : "sampling failed", ev, n_ev);
        return;
    }
    bool eog = llama_vocab_is_eog(vocab, token);
    bool stopped = false;
    size_t emit_len = 0;
    if (!eog) {
        r->tokens_generated++;
        int32_t len = 0;
        status = sequence_piece(seq, token, &len);
        if (status == RBEE_STATUS_OK) {
            status = rbee_text_stream_push(&seq->text, seq->piece, (size_t) len, &emit_len, &stopped);
        }
        if (status != RBEE_STATUS_OK) {
            finish(seq, RBEE_STOP_NONE, status, "detokenizing failed", ev, n_ev);
            return;
        }
    }
    rbee_stop_reason reason = eog ? RBEE_STOP_EOS
                              : stopped ? RBEE_STOP_SEQUENCE
                              : r->tokens_generated >= seq->max_tokens ? RBEE_STOP_MAX_TOKENS
                              : RBEE_STOP_NONE;
    if (reason == RBEE_STOP_EOS || reason == RBEE_STOP_MAX_TOKENS) {
        /* No stop string can complete any more: what was held back is plain text. */
        emit_len = seq->text.pending_len;
    }
    r->sample_ms += rbee_now_ms() - t_sample;
    status = emit(seq, emit_len, ev, n_ev);
    if (status != RBEE_STATUS_OK) {
        finish(seq, RBEE_STOP_NONE, status, "out of memory", ev, n_ev);
    } else if (reason != RBEE_STOP_NONE) {
        finish(seq, reason, RBEE_STATUS_OK, NULL, ev, n_ev);
    } else {
        seq->next = token;
        seq->state = RBEE_SEQ_DECODE;
    }
}

int32_t rbee_context_step(rbee_context * ctx, rbee_event * ev, int32_t n_events, rbee_status * status_out) {
    rbee_status dummy;
    rbee_status * status = status_out != NULL ? status_out : &dummy;
    *status = RBEE_STATUS_OK;
    if (ctx == NULL || (ev == NULL && n_events > 0)) {
        *status = RBEE_STATUS_INVALID_ARGUMENT;
        return 0;
    }
    int32_t n_active = rbee_context_n_active(ctx);
    if (n_events < 2 * n_active) {
        return -2 * n_active;
    }
    /* The previous step's events have been handled by now: wake their readers. */
    rbee_context_flush_notify(ctx);
    int32_t n_ev = 0;
    if (n_active == 0) {
        return 0;
    }
    bool shutting_down = atomic_load_explicit(&ctx->aborted, memory_order_acquire);

    /* Cancelled streams end here, at the step boundary, before anyone pays for them. */
    for (uint32_t i = 0; i < ctx->n_seq_max; i++) {
        rbee_sequence * seq = &ctx->sequences[i];
        bool active = seq->state == RBEE_SEQ_PREFILL || seq->state == RBEE_SEQ_DECODE;
        if (active && (shutting_down || atomic_load_explicit(&seq->cancel, memory_order_acquire))) {
            finish(seq, RBEE_STOP_CANCELLED, RBEE_STATUS_OK, NULL, ev, &n_ev);
        }
    }

    /* One token of every decoding sequence, then prompt chunks oldest submit first. */
    struct llama_batch * batch = &ctx->batch;
    batch->n_tokens = 0;
    for (uint32_t i = 0; i < ctx->n_seq_max; i++) {
        rbee_sequence * seq = &ctx->sequences[i];
        seq->row = -1;
        seq->chunk = 0;
        if (seq->state == RBEE_SEQ_DECODE) {
            seq->row = batch->n_tokens;
            batch_set(batch, batch->n_tokens++, seq->next, seq->n_cached, seq->seq_id, true);
        }
    }
    int32_t budget = (int32_t) ctx->n_chunk;
    while (budget > 0) {
        rbee_sequence * oldest = NULL;
        for (uint32_t i = 0; i < ctx->n_seq_max; i++) {
            rbee_sequence * seq = &ctx->sequences[i];
            if (seq->state == RBEE_SEQ_PREFILL && seq->chunk == 0 && (oldest == NULL || seq->submitted < oldest->submitted)) {
                oldest = seq;
            }
        }
        if (oldest == NULL) {
            break;
        }
        int32_t left = oldest->n_prompt - oldest->n_cached;
        int32_t n = left < budget ? left : budget;
        for (int32_t j = 0; j < n; j++) {
            int32_t pos = oldest->n_cached + j;
            bool last = pos == oldest->n_prompt - 1;
            if (last) {
                oldest->row = batch->n_tokens;
            }
            batch_set(batch, batch->n_tokens++, oldest->tokens[pos], pos, oldest->seq_id, last);
        }
        oldest->chunk = n;
        budget -= n;
    }
    if (batch->n_tokens == 0) {
        return n_ev; /* every active sequence was cancelled */
    }

    int32_t rc = llama_decode(ctx->lctx, *batch);
    /* Wait for the computation here so that the figures charge it to decode, not to the
     * sampler that reads the logits first. */
    llama_synchronize(ctx->lctx);
    if (rc != 0) {
        *status = rc == 1 ? RBEE_STATUS_DECODE_NO_SLOT : rc == 2 ? RBEE_STATUS_OK : RBEE_STATUS_DECODE_FAILED;
        const char * why = rbee_last_error();
        char error[256];
        snprintf(error, sizeof(error), "llama_decode returned %d%s%s", rc, why[0] ? ": " : "", why);
        for (uint32_t i = 0; i < ctx->n_seq_max; i++) {
            rbee_sequence * seq = &ctx->sequences[i];
            if (seq->row >= 0 || seq->chunk > 0) {
                /* rc 2: aborted by rbee_context_abort (shutdown): a cancel, not a fault. */
                finish(seq, RBEE_STOP_CANCELLED, *status, *status == RBEE_STATUS_OK ? NULL : error, ev, &n_ev);
            }
        }
        return n_ev;
    }

    double now = rbee_now_ms();
    for (uint32_t i = 0; i < ctx->n_seq_max; i++) {
        rbee_sequence * seq = &ctx->sequences[i];
        if (seq->state == RBEE_SEQ_DECODE && seq->row >= 0) {
            seq->tokens[seq->n_cached++] = seq->next;
            sequence_advance(seq, ev, &n_ev);
        } else if (seq->state == RBEE_SEQ_PREFILL && seq->chunk > 0) {
            seq->n_cached += seq->chunk;
            if (seq->n_cached < seq->n_prompt) {
                rbee_event * e = &ev[n_ev++];
                *e = (rbee_event){.kind = RBEE_EVENT_PREFILL, .seq_id = seq->seq_id, .seq = seq,
                                  .index = seq->n_cached, .total = seq->n_prompt};
                seq->notify_pending = true;
                continue;
            }
            seq->t_prefilled = now;
            seq->result.prefill_ms = now - seq->t_submit;
            if (seq->has_penalty && seq->chain != NULL) {
                /* The penalties look back over the prompt too, as llama-server does (the
                 * grammar sees only generated tokens, as there). */
                for (int32_t j = 0; j < seq->n_prompt; j++) llama_sampler_accept(seq->chain, seq->tokens[j]);
            }
            sequence_advance(seq, ev, &n_ev);
        }
    }
    return n_ev;
}

rbee_status rbee_context_generate(rbee_context * ctx, const rbee_generate_params * p, rbee_abort_flag * abort,
                                  rbee_token_callback on_token, void * user_data, rbee_generation_result * out) {
    if (out != NULL) {
        memset(out, 0, sizeof(*out));
    }
    if (ctx == NULL || on_token == NULL || out == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    if (rbee_context_n_active(ctx) > 0) {
        return RBEE_STATUS_SEQUENCE_BUSY;
    }
    rbee_sequence * seq = NULL;
    rbee_status status = rbee_context_submit(ctx, p, &seq);
    if (status != RBEE_STATUS_OK) {
        return status;
    }
    int32_t cap = rbee_context_max_events(ctx);
    rbee_event * ev = malloc((size_t) cap * sizeof(rbee_event));
    if (ev == NULL) {
        rbee_sequence_cancel(seq);
        cap = 0;
    }
    bool finished = false;
    while (!finished) {
        if (rbee_abort_flag_is_set(abort)) {
            rbee_sequence_cancel(seq);
        }
        rbee_status step_status;
        rbee_event stack_ev[2];
        int32_t n = rbee_context_step(ctx, ev != NULL ? ev : stack_ev, ev != NULL ? cap : 2, &step_status);
        rbee_event * events = ev != NULL ? ev : stack_ev;
        for (int32_t i = 0; i < n; i++) {
            if (events[i].kind == RBEE_EVENT_PIECE) {
                double t0 = rbee_now_ms();
                int rc = on_token(user_data, events[i].index, events[i].text, events[i].len);
                seq->result.callback_ms += rbee_now_ms() - t0;
                if (rc != 0 && status == RBEE_STATUS_OK) {
                    status = RBEE_STATUS_CALLBACK_FAILED;
                    rbee_sequence_cancel(seq);
                }
            } else if (events[i].kind == RBEE_EVENT_FINISHED) {
                finished = true;
            }
        }
        if (!finished && (n < 0 || seq->state == RBEE_SEQ_FREE)) {
            break; /* cannot happen: the events array fits, and an active sequence finishes */
        }
    }
    rbee_context_flush_notify(ctx);
    *out = seq->result;
    if (status == RBEE_STATUS_OK) {
        status = ev == NULL ? RBEE_STATUS_OUT_OF_MEMORY : seq->status;
    }
    if (status != RBEE_STATUS_OK) {
        out->stop_reason = RBEE_STOP_NONE;
    }
    if (seq->state == RBEE_SEQ_FINISHED) {
        rbee_sequence_release(seq);
    }
    free(ev);
    return status;
}
