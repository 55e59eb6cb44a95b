/*
 * rbee_core.c: rbee's native token loop over llama.cpp (see rbee_core.h for the API).
 *
 * Every llama call's result is checked and mapped to an RBEE_STATUS_*; every function
 * that allocates frees in one place (a single `done:` exit), never at each early return.
 */
#include "rbee_core.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "ggml.h"
#include "rbee_internal.h"

/* ---- process-wide runtime: backend init once, llama.cpp logs captured ----------------- */

static pthread_once_t runtime_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t last_error_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_error[512];
static int last_level;
static bool log_to_stderr;

/* llama.cpp logs a lot on load; keep only the first error since the last clear (the
 * root cause: later lines only say that the load failed) to put in the exception message,
 * unless RBEE_NATIVE_LOG is set, then pass everything through to stderr. */
static bool capturing; /* appending CONT lines to the captured error */

static void runtime_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (log_to_stderr) {
        fputs(text, stderr);
    }
    pthread_mutex_lock(&last_error_lock);
    if (level == GGML_LOG_LEVEL_CONT) {
        level = (enum ggml_log_level) last_level;
    } else {
        last_level = level;
        capturing = false;
    }
    size_t used = strlen(last_error);
    if (level == GGML_LOG_LEVEL_ERROR && (used == 0 || capturing)) {
        snprintf(last_error + used, sizeof(last_error) - used, "%s", text);
        capturing = true;
    }
    pthread_mutex_unlock(&last_error_lock);
}

static void runtime_init_once(void) {
    const char * env = getenv("RBEE_NATIVE_LOG");
    log_to_stderr = env != NULL && env[0] != '\0' && strcmp(env, "0") != 0;
    llama_log_set(runtime_log, NULL);
    llama_backend_init();
}

static void runtime_init(void) { pthread_once(&runtime_once, runtime_init_once); }

const char * rbee_last_error(void) {
    /* Strip the trailing newline llama.cpp puts on each line. */
    pthread_mutex_lock(&last_error_lock);
    size_t n = strlen(last_error);
    while (n > 0 && (last_error[n - 1] == '\n' || last_error[n - 1] == ' ')) {
        last_error[--n] = '\0';
    }
    pthread_mutex_unlock(&last_error_lock);
    return last_error;
}

void rbee_clear_last_error(void) {
    pthread_mutex_lock(&last_error_lock);
    last_error[0] = '\0';
    capturing = false;
    pthread_mutex_unlock(&last_error_lock);
}

const char * rbee_status_name(rbee_status status) {
    switch (status) {
        case RBEE_STATUS_OK: return "RBEE_STATUS_OK";
        case RBEE_STATUS_INVALID_ARGUMENT: return "RBEE_STATUS_INVALID_ARGUMENT";
        case RBEE_STATUS_OUT_OF_MEMORY: return "RBEE_STATUS_OUT_OF_MEMORY";
        case RBEE_STATUS_BACKEND_UNAVAILABLE: return "RBEE_STATUS_BACKEND_UNAVAILABLE";
        case RBEE_STATUS_MODEL_LOAD_FAILED: return "RBEE_STATUS_MODEL_LOAD_FAILED";
        case RBEE_STATUS_CONTEXT_FAILED: return "RBEE_STATUS_CONTEXT_FAILED";
        case RBEE_STATUS_NO_CHAT_TEMPLATE: return "RBEE_STATUS_NO_CHAT_TEMPLATE";
        case RBEE_STATUS_TOKENIZE_FAILED: return "RBEE_STATUS_TOKENIZE_FAILED";
        case RBEE_STATUS_PROMPT_TOO_LONG: return "RBEE_STATUS_PROMPT_TOO_LONG";
        case RBEE_STATUS_SEQUENCE_BUSY: return "RBEE_STATUS_SEQUENCE_BUSY";
        case RBEE_STATUS_SAMPLER_FAILED: return "RBEE_STATUS_SAMPLER_FAILED";
        case RBEE_STATUS_MEMORY_FAILED: return "RBEE_STATUS_MEMORY_FAILED";
        case RBEE_STATUS_DECODE_NO_SLOT: return "RBEE_STATUS_DECODE_NO_SLOT";
        case RBEE_STATUS_DECODE_FAILED: return "RBEE_STATUS_DECODE_FAILED";
        case RBEE_STATUS_CALLBACK_FAILED: return "RBEE_STATUS_CALLBACK_FAILED";
        case RBEE_STATUS_GRAMMAR_FAILED: return "RBEE_STATUS_GRAMMAR_FAILED";
    }
    return "RBEE_STATUS_UNKNOWN";
}

double rbee_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec * 1e3 + (double) ts.tv_nsec / 1e6;
}

/* ---- build information ------------------------------------------------------------- */

#ifndef RBEE_LLAMA_COMMIT
#define RBEE_LLAMA_COMMIT "unknown"
#endif
#ifndef RBEE_LLAMA_CPP_PYTHON_VERSION
#define RBEE_LLAMA_CPP_PYTHON_VERSION "unknown"
#endif

const char * rbee_llama_version(void) { return llama_version(); }
const char * rbee_llama_commit(void) { return RBEE_LLAMA_COMMIT; }
const char * rbee_llama_cpp_python_version(void) { return RBEE_LLAMA_CPP_PYTHON_VERSION; }

const char * rbee_system_info(void) {
    runtime_init();
    return llama_print_system_info();
}

int32_t rbee_backend_count(void) {
    runtime_init();
    return (int32_t) ggml_backend_reg_count();
}

const char * rbee_backend_name(int32_t index) {
    runtime_init();
    if (index < 0 || (size_t) index >= ggml_backend_reg_count()) {
        return NULL;
    }
    return ggml_backend_reg_name(ggml_backend_reg_get((size_t) index));
}

static ggml_backend_reg_t find_backend(const char * name) {
    for (size_t i = 0; i < ggml_backend_reg_count(); i++) {
        ggml_backend_reg_t reg = ggml_backend_reg_get(i);
        if (strcasecmp(ggml_backend_reg_name(reg), name) == 0) {
            return reg;
        }
    }
    return NULL;
}

int32_t rbee_backend_device_count(const char * backend_name) {
    runtime_init();
    if (backend_name == NULL) {
        return -1;
    }
    ggml_backend_reg_t reg = find_backend(backend_name);
    return reg == NULL ? -1 : (int32_t) ggml_backend_reg_dev_count(reg);
}

/* ---- abort flag --------------------------------------------------------------------- */

struct rbee_abort_flag {
    atomic_int value;
};

rbee_status rbee_abort_flag_create(rbee_abort_flag ** out) {
    if (out == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    *out = calloc(1, sizeof(rbee_abort_flag));
    if (*out == NULL) {
        return RBEE_STATUS_OUT_OF_MEMORY;
    }
    atomic_init(&(*out)->value, 0);
    return RBEE_STATUS_OK;
}

void rbee_abort_flag_free(rbee_abort_flag * flag) { free(flag); }

void rbee_abort_flag_set(rbee_abort_flag * flag) {
    if (flag != NULL) {
        atomic_store_explicit(&flag->value, 1, memory_order_release);
    }
}

void rbee_abort_flag_clear(rbee_abort_flag * flag) {
    if (flag != NULL) {
        atomic_store_explicit(&flag->value, 0, memory_order_release);
    }
}

bool rbee_abort_flag_is_set(const rbee_abort_flag * flag) {
    return flag != NULL && atomic_load_explicit(&((rbee_abort_flag *) flag)->value, memory_order_acquire) != 0;
}

/* ---- model -------------------------------------------------------------------------- */

rbee_model_params rbee_model_default_params(void) {
    rbee_model_params p = {.backend = "cpu", .device = 0, .n_gpu_layers = -1, .progress = NULL,
                           .progress_user_data = NULL};
    return p;
}

/* The ggml registry name for one of rbee's backend names. */
static const char * registry_name(const char * backend) {
    if (strcasecmp(backend, "cuda") == 0) return "CUDA";
    if (strcasecmp(backend, "metal") == 0) return "MTL";
    return NULL;
}

rbee_status rbee_model_load(const char * path, const rbee_model_params * params, rbee_model ** out) {
    if (path == NULL || params == NULL || params->backend == NULL || out == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    *out = NULL;
    runtime_init();
    rbee_clear_last_error();

    rbee_model * m = calloc(1, sizeof(rbee_model));
    if (m == NULL) {
        return RBEE_STATUS_OUT_OF_MEMORY;
    }
    rbee_status status = RBEE_STATUS_OK;
    struct llama_model_params mp = llama_model_default_params();

    if (strcasecmp(params->backend, "cpu") == 0) {
        /* An empty device list keeps every layer (and the KV cache) on the CPU even in a
         * CUDA/Metal build: "cpu" must mean CPU, not "whatever is there". */
        m->devices[0] = NULL;
        mp.devices = m->devices;
        mp.n_gpu_layers = 0;
    } else {
        const char * reg_name = registry_name(params->backend);
        ggml_backend_reg_t reg = reg_name == NULL ? NULL : find_backend(reg_name);
        if (reg == NULL || params->device < 0 || (size_t) params->device >= ggml_backend_reg_dev_count(reg)) {
            status = RBEE_STATUS_BACKEND_UNAVAILABLE;
            goto done;
        }
        /* Exactly the one device asked for: no split across GPUs, no silent fallback. */
        m->devices[0] = ggml_backend_reg_dev_get(reg, (size_t) params->device);
        m->devices[1] = NULL;
        mp.devices = m->devices;
        mp.split_mode = LLAMA_SPLIT_MODE_NONE;
        mp.main_gpu = 0; /* index into mp.devices */
        mp.n_gpu_layers = params->n_gpu_layers;
    }

    if (params->progress != NULL) {
        /* Without one llama.cpp installs its own, which prints dots into the log. */
        mp.progress_callback = params->progress;
        mp.progress_callback_user_data = params->progress_user_data;
    }
    m->model = llama_model_load_from_file(path, mp);
    if (m->model == NULL) {
        status = RBEE_STATUS_MODEL_LOAD_FAILED;
        goto done;
    }
    m->vocab = llama_model_get_vocab(m->model);
    if (m->vocab == NULL) {
        status = RBEE_STATUS_MODEL_LOAD_FAILED;
        goto done;
    }
    m->chat_template = llama_model_chat_template(m->model, NULL);
    if (m->chat_template == NULL) {
        /* Some GGUFs (the embedded Gemma-3 270M among them) carry no template. Fall back
         * on llama.cpp's built-in one for the architecture, else ChatML, as llama-server
         * does, rather than refusing chat. */
        char arch[64] = "";
        if (llama_model_meta_val_str(m->model, "general.architecture", arch, sizeof(arch)) < 0) {
            arch[0] = '\0';
        }
        m->chat_template = strncmp(arch, "gemma", 5) == 0 ? "gemma" : "chatml";
        m->chat_template_builtin = true;
    }

done:
    if (status != RBEE_STATUS_OK) {
        rbee_model_free(m);
        return status;
    }
    *out = m;
    return RBEE_STATUS_OK;
}

void rbee_model_free(rbee_model * model) {
    if (model == NULL) {
        return;
    }
    if (model->model != NULL) {
        llama_model_free(model->model);
    }
    free(model);
}

rbee_status rbee_model_get_info(const rbee_model * model, rbee_model_info * out) {
    if (model == NULL || out == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    memset(out, 0, sizeof(*out));
    out->n_layers = llama_model_n_layer(model->model);
    out->n_ctx_train = llama_model_n_ctx_train(model->model);
    out->n_vocab = llama_vocab_n_tokens(model->vocab);
    out->n_params = llama_model_n_params(model->model);
    out->size_bytes = llama_model_size(model->model);
    out->has_chat_template = !model->chat_template_builtin;
    if (llama_model_desc(model->model, out->description, sizeof(out->description)) < 0) {
        out->description[0] = '\0';
    }
    return RBEE_STATUS_OK;
}

const char * rbee_model_chat_template(const rbee_model * model) {
    return model == NULL || model->chat_template == NULL ? "" : model->chat_template;
}

/* Renders `messages` with the model's chat template (add_ass: the assistant's turn opened
 * at the end). On OK *out is a malloc'd NUL-terminated string of *out_len bytes, owned by
 * the caller. */
static rbee_status render_chat(const rbee_model * model, const rbee_chat_message * messages, int32_t n_messages,
                               bool add_ass, char ** out, int32_t * out_len) {
    rbee_status status = RBEE_STATUS_OK;
    struct llama_chat_message * chat = NULL;
    char * buf = NULL;
    *out = NULL;
    *out_len = 0;
    if (model->chat_template == NULL) {
        return RBEE_STATUS_NO_CHAT_TEMPLATE;
    }
    if (n_messages <= 0 || messages == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    chat = malloc((size_t) n_messages * sizeof(*chat));
    if (chat == NULL) {
        return RBEE_STATUS_OUT_OF_MEMORY;
    }
    size_t chars = 0;
    for (int32_t i = 0; i < n_messages; i++) {
        if (messages[i].role == NULL || messages[i].content == NULL) {
            status = RBEE_STATUS_INVALID_ARGUMENT;
            goto done;
        }
        chat[i].role = messages[i].role;
        chat[i].content = messages[i].content;
        chars += strlen(messages[i].content);
    }
    if (chars > INT32_MAX / 4) {
        status = RBEE_STATUS_INVALID_ARGUMENT;
        goto done;
    }
    /* llama.h recommends twice the characters of all messages; the template adds markers. */
    int32_t cap = 2 * (int32_t) chars + 256;
    for (int attempt = 0; attempt < 2; attempt++) {
        char * grown = realloc(buf, (size_t) cap + 1);
        if (grown == NULL) {
            status = RBEE_STATUS_OUT_OF_MEMORY;
            goto done;
        }
        buf = grown;
        int32_t n = llama_chat_apply_template(model->chat_template, chat, (size_t) n_messages, add_ass, buf, cap);
        if (n < 0) {
            status = RBEE_STATUS_NO_CHAT_TEMPLATE; /* a template llama.cpp does not know */
            goto done;
        }
        if (n <= cap) {
            buf[n] = '\0';
            *out_len = n;
            *out = buf;
            buf = NULL;
            goto done;
        }
        cap = n; /* too small: the return value is the size needed */
    }
    status = RBEE_STATUS_NO_CHAT_TEMPLATE;
done:
    free(chat);
    free(buf);
    return status;
}

int32_t rbee_model_apply_chat_template(const rbee_model * model, const rbee_chat_message * messages,
                                       int32_t n_messages, bool add_ass, char * buf, int32_t length) {
    if (model == NULL || length < 0 || (buf == NULL && length > 0)) {
        return -(int32_t) RBEE_STATUS_INVALID_ARGUMENT;
    }
    char * rendered = NULL;
    int32_t n = 0;
    rbee_status status = render_chat(model, messages, n_messages, add_ass, &rendered, &n);
    if (status != RBEE_STATUS_OK) {
        return -(int32_t) status;
    }
    if (length > 0) {
        memcpy(buf, rendered, (size_t) (n < length ? n : length));
    }
    free(rendered);
    return n;
}

rbee_status rbee_model_check_grammar(const rbee_model * model, const char * grammar) {
    if (model == NULL || grammar == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    rbee_clear_last_error();
    struct llama_sampler * s = llama_sampler_init_grammar(model->vocab, grammar, "root");
    if (s == NULL) {
        return RBEE_STATUS_GRAMMAR_FAILED;
    }
    llama_sampler_free(s);
    return RBEE_STATUS_OK;
}

/* Tokenizes the request's prompt (through the chat template when asked). On OK *tokens is
 * a malloc'd array of *n_tokens tokens owned by the caller. */
rbee_status rbee_tokenize_request(const rbee_model * model, const rbee_generate_params * p,
                                  llama_token ** tokens, int32_t * n_tokens) {
    rbee_status status = RBEE_STATUS_OK;
    char * templated = NULL;
    llama_token * buf = NULL;
    *tokens = NULL;
    *n_tokens = 0;
    const char * text = p->prompt;
    int32_t text_len = p->prompt_len;
    if (p->n_messages > 0) {
        status = render_chat(model, p->messages, p->n_messages, true, &templated, &text_len);
        if (status != RBEE_STATUS_OK) {
            goto done;
        }
        text = templated;
    } else if (text == NULL && text_len > 0) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    } else if (p->chat) {
        /* The prompt is one user message: llama_chat_message wants a C string. */
        char * content = malloc((size_t) text_len + 1);
        if (content == NULL) {
            return RBEE_STATUS_OUT_OF_MEMORY;
        }
        if (text_len > 0) {
            memcpy(content, text, (size_t) text_len);
        }
        content[text_len] = '\0';
        rbee_chat_message message = {.role = "user", .content = content};
        status = render_chat(model, &message, 1, true, &templated, &text_len);
        free(content);
        if (status != RBEE_STATUS_OK) {
            goto done;
        }
        text = templated;
    }
    /* add_special: BOS exactly as the model's metadata asks; parse_special: control
     * tokens written in the text (a chat template's <start_of_turn>) become tokens. */
    int32_t cap = text_len + 8;
    for (int attempt = 0; attempt < 2; attempt++) {
        llama_token * grown = realloc(buf, (size_t) cap * sizeof(llama_token));
        if (grown == NULL) {
            status = RBEE_STATUS_OUT_OF_MEMORY;
            goto done;
        }
        buf = grown;
        int32_t n = llama_tokenize(model->vocab, text == NULL ? "" : text, text_len, buf, cap, true, true);
        if (n >= 0) {
            *n_tokens = n;
            break;
        }
        if (n == INT32_MIN || attempt == 1) {
            status = RBEE_STATUS_TOKENIZE_FAILED;
            goto done;
        }
        cap = -n; /* negative = the number of tokens needed */
    }
    /* A template that writes "<bos>" itself plus add_special would start with two. */
    llama_token bos = llama_vocab_bos(model->vocab);
    if (*n_tokens >= 2 && bos != LLAMA_TOKEN_NULL && buf[0] == bos && buf[1] == bos) {
        memmove(buf, buf + 1, (size_t) (*n_tokens - 1) * sizeof(llama_token));
        *n_tokens -= 1;
    }
    *tokens = buf;
    buf = NULL;
done:
    free(templated);
    free(buf);
    return status;
}

rbee_status rbee_model_count_request_tokens(const rbee_model * model, const rbee_generate_params * params,
                                            int32_t * n_tokens_out) {
    if (model == NULL || params == NULL || n_tokens_out == NULL || params->prompt_len < 0 ||
        params->n_messages < 0 || (params->n_messages > 0 && params->messages == NULL)) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    llama_token * tokens = NULL;
    rbee_status status = rbee_tokenize_request(model, params, &tokens, n_tokens_out);
    free(tokens);
    return status;
}

rbee_status rbee_model_count_tokens(const rbee_model * model, const char * text, int32_t text_len, bool chat,
                                    int32_t * n_tokens_out) {
    rbee_generate_params p = rbee_generate_default_params();
    p.prompt = text;
    p.prompt_len = text_len;
    p.chat = chat;
    return rbee_model_count_request_tokens(model, &p, n_tokens_out);
}

/* ---- context ------------------------------------------------------------------------ */

rbee_context_params rbee_context_default_params(void) {
    rbee_context_params p = {.n_ctx_seq = 4096, .n_seq_max = 4, .n_chunk = 256, .n_threads = 4, .flash_attn = 0};
    return p;
}

/* llama.cpp asks this between graph nodes: only a shutdown stops a running decode; a
 * stream is cancelled at the step boundary, which touches no other stream. */
static bool context_abort_callback(void * data) {
    rbee_context * ctx = data;
    return atomic_load_explicit(&ctx->aborted, memory_order_acquire);
}

void rbee_context_abort(rbee_context * ctx) {
    if (ctx != NULL) {
        atomic_store_explicit(&ctx->aborted, true, memory_order_release);
    }
}

static void sequence_free_members(rbee_sequence * seq) {
    if (seq->chain != NULL) {
        llama_sampler_free(seq->chain);
        seq->chain = NULL;
    }
    if (seq->grammar != NULL) {
        llama_sampler_free(seq->grammar);
        seq->grammar = NULL;
    }
    free(seq->cand);
    seq->cand = NULL;
    rbee_text_stream_free(&seq->text);
    free(seq->tokens);
    free(seq->piece);
    free(seq->out);
}

rbee_status rbee_context_create(rbee_model * model, const rbee_context_params * params, rbee_context ** out) {
    if (model == NULL || params == NULL || out == NULL || params->n_ctx_seq < 16 || params->n_chunk == 0 ||
        params->n_seq_max == 0 || params->n_seq_max > 256 || params->n_threads <= 0 || params->flash_attn < -1 ||
        params->flash_attn > 1) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    *out = NULL;
    rbee_clear_last_error();
    rbee_status status = RBEE_STATUS_OK;
    rbee_context * ctx = calloc(1, sizeof(rbee_context));
    if (ctx == NULL) {
        return RBEE_STATUS_OUT_OF_MEMORY;
    }
    ctx->model = model;
    ctx->n_seq_max = params->n_seq_max;
    ctx->n_ctx_seq = params->n_ctx_seq;
    ctx->n_chunk = params->n_chunk;
    atomic_init(&ctx->aborted, false);
    ctx->sequences = calloc(params->n_seq_max, sizeof(rbee_sequence));
    if (ctx->sequences == NULL) {
        status = RBEE_STATUS_OUT_OF_MEMORY;
        goto done;
    }
    for (uint32_t i = 0; i < params->n_seq_max; i++) {
        rbee_sequence * seq = &ctx->sequences[i];
        seq->ctx = ctx;
        seq->seq_id = (int32_t) i;
        seq->notify_fd = -1;
        atomic_init(&seq->cancel, 0);
        rbee_text_stream_init(&seq->text);
        seq->piece_cap = 64;
        seq->piece = malloc((size_t) seq->piece_cap);
        seq->tokens = malloc((size_t) params->n_ctx_seq * sizeof(llama_token));
        if (seq->piece == NULL || seq->tokens == NULL) {
            status = RBEE_STATUS_OUT_OF_MEMORY;
            goto done;
        }
    }

    /* One batch = one ubatch: every decoding sequence's token plus one prompt chunk, so a
     * step is exactly one graph computation and its time is bounded by n_chunk. */
    uint32_t n_batch = params->n_chunk + params->n_seq_max;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = params->n_ctx_seq * params->n_seq_max;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_seq_max = params->n_seq_max;
    /* One KV stream per sequence (kv_unified = false), as llama.h advises when sequences
     * do not share a long prefix: a token attends only to its own sequence's cells. With
     * one unified buffer every token attends (masked) to every cell that any slot holds,
     * so prompts cached in idle slots for reuse slow every stream: measured here with
     * benchmarks/bench_batching.py, one stream fell from 34 to 13 tok/s once ~3,000- and
     * ~1,000-token prompts sat cached in idle slots. The price of streams: llama.cpp cuts
     * a batch into "equal splits" of consecutive seq_ids (at 8 fresh streams 48-49 tok/s
     * against 51-53 unified), so submit keeps running sequences packed at the low ids.
     * Each stream holds n_ctx_seq cells of its own. */
    cp.kv_unified = false;
    /* swa_full stays as llama.cpp's default (true): a sliding-window model (Gemma 3) keeps
     * every cell, which is what lets a later request reuse a cached prefix. */
    cp.n_threads = params->n_threads;
    cp.n_threads_batch = params->n_threads;
    cp.flash_attn_type = (enum llama_flash_attn_type) params->flash_attn;
    cp.no_perf = true;
    cp.abort_callback = context_abort_callback;
    cp.abort_callback_data = ctx;
    ctx->lctx = llama_init_from_model(model->model, cp);
    if (ctx->lctx == NULL) {
        status = RBEE_STATUS_CONTEXT_FAILED;
        goto done;
    }
    ctx->batch = llama_batch_init((int32_t) n_batch, 0, 1);
    if (ctx->batch.token == NULL || ctx->batch.seq_id == NULL) {
        status = RBEE_STATUS_CONTEXT_FAILED;
        goto done;
    }
    ctx->batch_allocated = true;

done:
    if (status != RBEE_STATUS_OK) {
        rbee_context_free(ctx);
        return status;
    }
    *out = ctx;
    return RBEE_STATUS_OK;
}

void rbee_context_free(rbee_context * ctx) {
    if (ctx == NULL) {
        return;
    }
    if (ctx->batch_allocated) {
        llama_batch_free(ctx->batch);
    }
    if (ctx->lctx != NULL) {
        llama_free(ctx->lctx);
    }
    if (ctx->sequences != NULL) {
        for (uint32_t i = 0; i < ctx->n_seq_max; i++) {
            sequence_free_members(&ctx->sequences[i]);
        }
    }
    free(ctx->sequences);
    free(ctx);
}

uint32_t rbee_context_n_ctx_seq(const rbee_context * ctx) { return ctx == NULL ? 0 : ctx->n_ctx_seq; }
uint32_t rbee_context_n_seq_max(const rbee_context * ctx) { return ctx == NULL ? 0 : ctx->n_seq_max; }
uint32_t rbee_context_n_chunk(const rbee_context * ctx) { return ctx == NULL ? 0 : ctx->n_chunk; }

int32_t rbee_context_n_active(const rbee_context * ctx) {
    int32_t n = 0;
    for (uint32_t i = 0; ctx != NULL && i < ctx->n_seq_max; i++) {
        rbee_seq_state st = ctx->sequences[i].state;
        n += st == RBEE_SEQ_PREFILL || st == RBEE_SEQ_DECODE;
    }
    return n;
}

int32_t rbee_context_n_free(const rbee_context * ctx) {
    int32_t n = 0;
    for (uint32_t i = 0; ctx != NULL && i < ctx->n_seq_max; i++) {
        n += ctx->sequences[i].state == RBEE_SEQ_FREE;
    }
    return n;
}

int32_t rbee_context_max_events(const rbee_context * ctx) { return ctx == NULL ? 0 : 2 * (int32_t) ctx->n_seq_max; }

/* ---- sequence ----------------------------------------------------------------------- */

int32_t rbee_sequence_id(const rbee_sequence * seq) { return seq == NULL ? -1 : seq->seq_id; }

void rbee_sequence_cancel(rbee_sequence * seq) {
    if (seq != NULL) {
        atomic_store_explicit(&seq->cancel, 1, memory_order_release);
    }
}

rbee_status rbee_sequence_status(const rbee_sequence * seq) {
    return seq == NULL ? RBEE_STATUS_INVALID_ARGUMENT : seq->status;
}

const char * rbee_sequence_error(const rbee_sequence * seq) { return seq == NULL ? "" : seq->error; }

rbee_status rbee_sequence_get_result(const rbee_sequence * seq, rbee_generation_result * out) {
    if (seq == NULL || out == NULL) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    *out = seq->result;
    return RBEE_STATUS_OK;
}

rbee_status rbee_sequence_release(rbee_sequence * seq) {
    if (seq == NULL || seq->state != RBEE_SEQ_FINISHED) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    seq->state = RBEE_SEQ_FREE;
    seq->notify_fd = -1;
    seq->notify_pending = false;
    return RBEE_STATUS_OK;
}

rbee_generate_params rbee_generate_default_params(void) {
    rbee_generate_params p = {
        .prompt = "", .prompt_len = 0, .chat = false, .messages = NULL, .n_messages = 0, .max_tokens = 256,
        .temperature = 0.8f, .top_p = 0.95f, .top_k = 40, .min_p = 0.05f, .repeat_penalty = 1.0f,
        .frequency_penalty = 0.0f, .presence_penalty = 0.0f, .grammar = NULL, .seed = LLAMA_DEFAULT_SEED,
        .stop = NULL, .n_stop = 0, .cache_prompt = true, .notify_fd = -1,
    };
    return p;
}
