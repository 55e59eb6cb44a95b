#define _GNU_SOURCE /* memmem */
/* rbee_text.c: UTF-8 completion and stop-string holdback for one sequence (rbee_text.h). */
#include "rbee_text.h"

#include <stdlib.h>
#include <string.h>

void rbee_text_stream_init(rbee_text_stream * ts) { memset(ts, 0, sizeof(*ts)); }

static void free_stops(rbee_text_stream * ts) {
    for (int32_t i = 0; i < ts->n_stop; i++) {
        free(ts->stops[i]);
    }
    free(ts->stops);
    free(ts->stop_lens);
    ts->stops = NULL;
    ts->stop_lens = NULL;
    ts->n_stop = 0;
}

void rbee_text_stream_free(rbee_text_stream * ts) {
    free_stops(ts);
    free(ts->carry);
    free(ts->pending);
    memset(ts, 0, sizeof(*ts));
}

static bool reserve(char ** buf, size_t * cap, size_t need) {
    if (need <= *cap) {
        return true;
    }
    size_t cap2 = *cap == 0 ? 64 : *cap;
    while (cap2 < need) {
        cap2 *= 2;
    }
    char * grown = realloc(*buf, cap2);
    if (grown == NULL) {
        return false;
    }
    *buf = grown;
    *cap = cap2;
    return true;
}

rbee_status rbee_text_stream_reset(rbee_text_stream * ts, const char * const * stops, int32_t n_stop) {
    free_stops(ts);
    ts->carry_len = 0;
    ts->pending_len = 0;
    if (n_stop < 0 || (n_stop > 0 && stops == NULL)) {
        return RBEE_STATUS_INVALID_ARGUMENT;
    }
    if (n_stop == 0) {
        return RBEE_STATUS_OK;
    }
    ts->stops = calloc((size_t) n_stop, sizeof(char *));
    ts->stop_lens = calloc((size_t) n_stop, sizeof(size_t));
    if (ts->stops == NULL || ts->stop_lens == NULL) {
        free_stops(ts);
        return RBEE_STATUS_OUT_OF_MEMORY;
    }
    for (int32_t i = 0; i < n_stop; i++) {
        if (stops[i] == NULL || stops[i][0] == '\0') {
            continue; /* an empty stop string would match everywhere: ignore it */
        }
        size_t len = strlen(stops[i]);
        char * copy = malloc(len + 1);
        if (copy == NULL) {
            free_stops(ts);
            return RBEE_STATUS_OUT_OF_MEMORY;
        }
        memcpy(copy, stops[i], len + 1);
        ts->stops[ts->n_stop] = copy;
        ts->stop_lens[ts->n_stop] = len;
        ts->n_stop++;
    }
    return RBEE_STATUS_OK;
}

static bool is_cont(unsigned char c) { return (c & 0xC0) == 0x80; }

/* Length of the UTF-8 character starting at s[0] if it is valid and whole (1..4); 0 if
 * it is a valid beginning cut short by the end of the buffer; -n if invalid, where n is
 * the length of the "maximal subpart" (Unicode's recommended replacement unit, the one
 * Python's errors="replace" uses) to turn into a single U+FFFD. */
static int utf8_char(const unsigned char * s, size_t avail) {
    unsigned char c = s[0];
    int need;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c == 0xE0) { need = 3; lo = 0xA0; }
    else if (c == 0xED) { need = 3; hi = 0x9F; } /* no UTF-16 surrogates */
    else if (c >= 0xE1 && c <= 0xEF) need = 3;
    else if (c == 0xF0) { need = 4; lo = 0x90; }
    else if (c == 0xF4) { need = 4; hi = 0x8F; }
    else if (c >= 0xF1 && c <= 0xF3) need = 4;
    else return -1;
    for (int k = 1; k < need; k++) {
        if ((size_t) k >= avail) return 0;
        if (k == 1 ? (s[1] < lo || s[1] > hi) : !is_cont(s[k])) return -k;
    }
    return need;
}

/* Moves the whole characters at the front of carry into pending. */
static rbee_status drain_carry(rbee_text_stream * ts) {
    /* Each invalid byte becomes 3 bytes (U+FFFD): reserve the worst case once. */
    if (!reserve(&ts->pending, &ts->pending_cap, ts->pending_len + 3 * ts->carry_len + 1)) {
        return RBEE_STATUS_OUT_OF_MEMORY;
    }
    const unsigned char * s = (const unsigned char *) ts->carry;
    size_t i = 0;
    while (i < ts->carry_len) {
        int n = utf8_char(s + i, ts->carry_len - i);
        if (n == 0) break; /* wait for the rest of this character */
        if (n < 0) {
            memcpy(ts->pending + ts->pending_len, "\xEF\xBF\xBD", 3);
            ts->pending_len += 3;
            i += (size_t) -n;
            continue;
        }
        memcpy(ts->pending + ts->pending_len, s + i, (size_t) n);
        ts->pending_len += (size_t) n;
        i += (size_t) n;
    }
    memmove(ts->carry, ts->carry + i, ts->carry_len - i);
    ts->carry_len -= i;
    return RBEE_STATUS_OK;
}

/* Longest k < len(stop) such that pending ends with stop[0..k). */
static size_t partial_stop_suffix(const rbee_text_stream * ts, int32_t s) {
    size_t max = ts->stop_lens[s] - 1;
    if (max > ts->pending_len) max = ts->pending_len;
    for (size_t k = max; k > 0; k--) {
        if (memcmp(ts->pending + ts->pending_len - k, ts->stops[s], k) == 0) return k;
    }
    return 0;
}

rbee_status rbee_text_stream_push(rbee_text_stream * ts, const char * bytes, size_t len, size_t * emit_len,
                                  bool * stopped) {
    *emit_len = 0;
    *stopped = false;
    if (!reserve(&ts->carry, &ts->carry_cap, ts->carry_len + len + 1)) {
        return RBEE_STATUS_OUT_OF_MEMORY;
    }
    memcpy(ts->carry + ts->carry_len, bytes, len);
    ts->carry_len += len;
    rbee_status status = drain_carry(ts);
    if (status != RBEE_STATUS_OK) {
        return status;
    }
    /* A full stop string anywhere in pending ends the text at its earliest start. */
    size_t first = ts->pending_len;
    for (int32_t s = 0; s < ts->n_stop; s++) {
        const char * hit = memmem(ts->pending, ts->pending_len, ts->stops[s], ts->stop_lens[s]);
        if (hit != NULL && (size_t) (hit - ts->pending) < first) {
            first = (size_t) (hit - ts->pending);
            *stopped = true;
        }
    }
    if (*stopped) {
        *emit_len = first;
        return RBEE_STATUS_OK;
    }
    /* Hold back the longest tail that could still grow into a stop string. A held tail
     * starts with a stop string's first byte, a lead byte, so the cut is on a character
     * boundary. */
    size_t hold = 0;
    for (int32_t s = 0; s < ts->n_stop; s++) {
        size_t k = partial_stop_suffix(ts, s);
        if (k > hold) hold = k;
    }
    *emit_len = ts->pending_len - hold;
    return RBEE_STATUS_OK;
}

void rbee_text_stream_consume(rbee_text_stream * ts, size_t n) {
    if (n > ts->pending_len) n = ts->pending_len;
    memmove(ts->pending, ts->pending + n, ts->pending_len - n);
    ts->pending_len -= n;
}
