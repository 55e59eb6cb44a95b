/*
 * rbee_text.h: the text side of one sequence (internal to rbee_core, not in the cdef).
 *
 * Token bytes go in; what comes out is only ever whole, valid UTF-8 that can no longer
 * turn out to be part of a stop string:
 *   carry    bytes of a UTF-8 character split across tokens, held until it is whole
 *            (invalid bytes become U+FFFD so the output is always valid UTF-8)
 *   pending  whole text held back because its tail could be the start of a stop string
 */
#ifndef RBEE_TEXT_H
#define RBEE_TEXT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rbee_core.h"

typedef struct rbee_text_stream {
    char * carry;          /* owned */
    size_t carry_len, carry_cap;
    char * pending;        /* owned */
    size_t pending_len, pending_cap;
    char ** stops;         /* owned copies of the request's non-empty stop strings */
    size_t * stop_lens;    /* owned */
    int32_t n_stop;
} rbee_text_stream;

void rbee_text_stream_init(rbee_text_stream * ts);
void rbee_text_stream_free(rbee_text_stream * ts);

/* Forgets all text and copies the request's stop strings (borrowed for the call). */
rbee_status rbee_text_stream_reset(rbee_text_stream * ts, const char * const * stops, int32_t n_stop);

/* Appends one token's bytes. Afterwards pending[0 .. *emit_len) may be emitted; when
 * *stopped is set a stop string begins at *emit_len and nothing after it may be emitted. */
rbee_status rbee_text_stream_push(rbee_text_stream * ts, const char * bytes, size_t len, size_t * emit_len,
                                  bool * stopped);

/* Drops the first n bytes of pending (they were emitted). */
void rbee_text_stream_consume(rbee_text_stream * ts, size_t n);

#endif /* RBEE_TEXT_H */
