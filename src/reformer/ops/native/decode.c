/* One cached decoding step of an LSH attention layer (caches.LSHCache) or a local one
(caches.LocalCache), compiled.

A step handles one new position per sequence: a few hundred numbers per head, so as torch operations it
is some thirty calls that each cost more in dispatch than in arithmetic. Here it is one call. Per
(batch row, head), with q | v the new position's projection (kv):
- the key q * s, s = rsqrt(mean(q^2) + 1e-6) / sqrt(d) (keys.key_scale), and v are written to cache row
  `position`;
- in every round, the bucket: per factor f of n_buckets the argmax over that factor's columns of
  q [R_f, -R_f] (the columns of `hash`, one block of `width` per round), combined as id_0 + f_0 (id_1 ...);
- the query scores the last min(count, window) earlier members of its bucket in every round (their
  positions in the bucket's ring), and one softmax over all those scores weighs their values: exactly the
  rounds combined by their normalisers (see LSHCache). With no earlier member in any round, the query's
  only key is itself and the output is v;
- the new position enters the ring of its bucket in every round, replacing the oldest member.

decode_local: q | k | v of the new position; k | v written to cache row `position`, and the query
attends to rows first..position (its chunk and the chunks before it in reach, itself included).

Built into the same library as kernels.c (build.py), once per element type: the file includes itself
with T and NAME defined. The caller (ops/native/decoding.py) passes the state of the decoding caches
(caches.py), whose every index (ring positions, counts) they wrote themselves, so the calls check nothing.
*/

#ifndef T

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t batch, heads, d, rounds, width, n_factors, factors[2], window, n_buckets, capacity, position;
    const void *kv;      /* (batch, heads, 2 d): the new position's query | value */
    void *cache;         /* (batch, heads, capacity, 2 d): key | value rows */
    const void *hash;    /* (heads, d, rounds * width) rotations side by side, or NULL: one bucket */
    int64_t *ring;       /* (batch, heads, rounds, n_buckets * window): positions */
    int64_t *count;      /* (batch, heads, rounds, n_buckets): members so far */
    void *out;           /* (batch, heads, d) */
    void *scores;        /* scratch: rounds * window elements */
    void *rotated;       /* scratch: rounds * width elements */
    int64_t *rows;       /* scratch: rounds * window + rounds */
} DecodeCall;

typedef struct {
    int64_t batch, heads, d, capacity, first, position;
    const void *qkv;     /* (batch, heads, 3 d): the new position's query | key | value */
    void *cache;         /* (batch, heads, capacity, 2 d): key | value rows */
    void *out;           /* (batch, heads, d) */
    void *scores;        /* scratch: position - first + 1 elements */
} LocalDecodeCall;

#define DECODE_CAT_(a, b) a##_##b
#define DECODE_CAT(a, b) DECODE_CAT_(a, b)

#define T float
#define NAME float32
#include __FILE__
#undef T
#undef NAME

#define T double
#define NAME float64
#include __FILE__

#else

#define D(x) DECODE_CAT(x, NAME)

/* The buckets (rounds) of query q (d) of one head: hash holds that head's (d, rounds * width) columns,
rotated receives q hash. */
static void D(buckets)(const DecodeCall *a, const T *q, const T *hash, T *rotated, int64_t *buckets) {
    const int64_t columns = a->rounds * a->width;
    for (int64_t j = 0; j < columns; j++)
        rotated[j] = 0;
    for (int64_t k = 0; k < a->d; k++)   /* row by row: the inner loop runs along contiguous columns */
        for (int64_t j = 0; j < columns; j++)
            rotated[j] += q[k] * hash[k * columns + j];
    for (int64_t r = 0; r < a->rounds; r++) {
        int64_t id = 0, scale = 1;
        const T *x = rotated + r * a->width;
        for (int64_t f = 0; f < a->n_factors; x += a->factors[f], scale *= a->factors[f], f++) {
            int64_t best = 0;
            for (int64_t j = 1; j < a->factors[f]; j++)
                best = x[j] > x[best] ? j : best;   /* the first of equal maxima, as torch.argmax */
            id += scale * best;
        }
        buckets[r] = id;
    }
}

/* out (d) = the values weighed by the softmax of scores (n of them, top their maximum): value row i at
   values + offset[i], or at values + i * stride where offset is NULL. */
static void D(weigh)(T *out, T *scores, int64_t n, T top, const T *values, const int64_t *offset, int64_t stride,
                     int64_t d) {
    T total = 0;
    for (int64_t i = 0; i < n; i++)
        total += scores[i] = exp(scores[i] - top);
    for (int64_t k = 0; k < d; k++)
        out[k] = 0;
    for (int64_t i = 0; i < n; i++) {
        const T p = scores[i] / total, *value = values + (offset ? offset[i] : i * stride);
        for (int64_t k = 0; k < d; k++)
            out[k] += p * value[k];
    }
}

void D(decode_lsh)(const DecodeCall *a) {
    const int64_t d = a->d, w = a->window, row = 2 * d;
    T *scores = (T *)a->scores;
    int64_t *rows = a->rows, *buckets = a->rows + a->rounds * w;
    for (int64_t s = 0; s < a->batch * a->heads; s++) {
        const T *q = (const T *)a->kv + s * row, *v = q + d;
        T *cache = (T *)a->cache + s * a->capacity * row;
        T *out = (T *)a->out + s * d;
        const T *hash = a->hash ? (const T *)a->hash + (s % a->heads) * d * a->rounds * a->width : NULL;
        int64_t *rings = a->ring + s * a->rounds * a->n_buckets * w, *counts = a->count + s * a->rounds * a->n_buckets;
        T square = 0;
        for (int64_t k = 0; k < d; k++)
            square += q[k] * q[k];
        const T key_scale = (T)1 / sqrt(square / (T)d + (T)1e-6) / sqrt((T)d);
        T *written = cache + a->position * row;
        for (int64_t k = 0; k < d; k++) {
            written[k] = q[k] * key_scale;
            written[d + k] = v[k];
        }
        /* Every round's earlier members and their scores. */
        if (hash)
            D(buckets)(a, q, hash, (T *)a->rotated, buckets);
        else
            memset(buckets, 0, a->rounds * sizeof(int64_t));
        int64_t n = 0;
        T top = -INFINITY;
        for (int64_t r = 0; r < a->rounds; r++) {
            const int64_t b = buckets[r];
            const int64_t *ring = rings + (r * a->n_buckets + b) * w, count = counts[r * a->n_buckets + b];
            for (int64_t slot = 0; slot < (count < w ? count : w); slot++, n++) {
                const T *key = cache + ring[slot] * row;
                T score = 0;
                for (int64_t k = 0; k < d; k++)
                    score += q[k] * key[k];
                rows[n] = ring[slot] * row + d;
                scores[n] = score;
                top = score > top ? score : top;
            }
        }
        /* One softmax over them all weighs their values; with none, the query's only key is itself. */
        if (n == 0)
            memcpy(out, v, d * sizeof(T));
        else
            D(weigh)(out, scores, n, top, cache, rows, 0, d);
        /* The new position enters its bucket's ring in every round, in the oldest member's slot. */
        for (int64_t r = 0; r < a->rounds; r++) {
            int64_t *count = counts + r * a->n_buckets + buckets[r];
            rings[(r * a->n_buckets + buckets[r]) * w + *count % w] = a->position;
            *count += 1;
        }
    }
}

void D(decode_local)(const LocalDecodeCall *a) {
    const int64_t d = a->d, row = 2 * d, n = a->position - a->first + 1;
    T *scores = (T *)a->scores;
    for (int64_t s = 0; s < a->batch * a->heads; s++) {
        const T *q = (const T *)a->qkv + s * 3 * d;
        T *cache = (T *)a->cache + s * a->capacity * row, *out = (T *)a->out + s * d;
        memcpy(cache + a->position * row, q + d, row * sizeof(T));
        T top = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            const T *key = cache + (a->first + i) * row;
            T score = 0;
            for (int64_t k = 0; k < d; k++)
                score += q[k] * key[k];
            scores[i] = score;
            top = score > top ? score : top;
        }
        D(weigh)(out, scores, n, top, cache + a->first * row + d, NULL, row, d);
    }
}

#undef D

#endif
