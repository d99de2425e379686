/* The interval core (intervals.py) compiled: each query is scored against its own span only.

In the bucket window a query's span holds the earlier items of its bucket within reach: ~25 keys on
average at the benchmark's sizes, where the batched products of the eager core score all 96 columns of
the window and mask most of them. Here, per group of QB consecutive queries (in sorted order they mostly
share a bucket, so their spans nearly coincide), only the columns of their spans are scored.

Layout (as in intervals.py): queries q (n, d) rows; keys and values padded (rows, d) with `before * c`
rows in front, so that column `col` of query i's window is padded row (i / c) * c + col. A query sees the
columns lo[i] <= col < hi[i] except skip[i] (-1: none). Every span holds at least one column (the self
fallback of make_spans), so every normaliser is positive.

How it is fast on a CPU without BLAS:
- Scores are vectors over columns, not dot products: keys are transposed into panels of one vector of
  rows each ((d, LANES) blocks), so q_i . k for LANES consecutive keys is d multiply-adds of whole
  vectors, QB queries x 2 vectors of keys in registers, no horizontal sums. Panels are made a block of
  BLOCK_ROWS rows at a time, so they stay small and in cache.
- exp is a vectorisable polynomial (float32), the row sums and maxima are simd reductions.
- Weighted sums of value (or key) rows run two queries at a time, eight vector accumulators.
- Backward gathers dk and dv of a chunk's window in a tile, then adds it to the rows.

Parallel: blocks of chunks one after the other, each cut in contiguous parts over POSIX threads (no
OpenMP runtime to clash with torch's). Windows overlap, so a part writes the gradient rows of its own
chunks and puts its share of the rows after them in a tail buffer, added in a fixed order once every row
it reaches is written. Results are the same from run to run; the number of threads only changes the
order of a few sums.

Built by native.py with -O3 -march=native -fopenmp-simd -fno-trapping-math (the simd pragmas without an
OpenMP runtime; no trapping math so that the loops around exp's conversions vectorise).
*/

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define MIN_CHUNKS_PER_THREAD 8

typedef void (*range_fn)(const void *args, int part, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    const void *args;
    int part;
    int64_t begin, end;
} Part;

static void *run_part(void *p) {
    Part *part = (Part *)p;
    part->fn(part->args, part->part, part->begin, part->end);
    return NULL;
}

/* How many parts parallel_for cuts n items into. */
static int part_count(int64_t n, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n / MIN_CHUNKS_PER_THREAD) threads = (int)(n / MIN_CHUNKS_PER_THREAD);
    return threads < 1 ? 1 : threads;
}

/* Where part t of [begin, end) cut in `parts` starts. */
static int64_t part_begin(int64_t begin, int64_t end, int parts, int t) { return begin + (end - begin) * t / parts; }

/* fn over [begin, end) in part_count(end - begin, threads) contiguous parts; the calling thread runs
   the first. */
static void parallel_for(range_fn fn, const void *args, int64_t begin, int64_t end, int threads) {
    int parts = part_count(end - begin, threads);
    Part part[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < parts; t++) {
        part[t].fn = fn;
        part[t].args = args;
        part[t].part = t;
        part[t].begin = part_begin(begin, end, parts, t);
        part[t].end = part_begin(begin, end, parts, t + 1);
    }
    for (int t = 1; t < parts; t++) started[t] = pthread_create(&ids[t], NULL, run_part, &part[t]) == 0;
    run_part(&part[0]);
    for (int t = 1; t < parts; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_part(&part[t]);   /* no thread to be had: run it here */
    }
}

/* Rows of keys per block: the kernels transpose and attend the chunks a block at a time, so that the
   transposed keys (and values) stay small and in cache. */
#define BLOCK_ROWS 4096

/* exp(x) for float32, as a polynomial the compiler vectorises (libm's expf is a call per number, a third
   of the kernel's time): Cephes' expf, x = n ln2 + r, |r| <= ln2 / 2, within 2 ulp (1.2e-7 relative,
   checked against expf over [-90, 88]); 0 below -87. Branch-free but for selects, so that with
   -fno-trapping-math the loops around it vectorise. */
static inline float exp_float32(float x) {
    float clamped = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
    /* floor by truncating a positive number: clamped * log2(e) + 0.5 > -126 */
    int32_t n = (int32_t)(clamped * 1.44269504088896341f + 128.5f) - 128;
    float nf = (float)n;
    float r = clamped - nf * 0.693359375f + nf * 2.12194440e-4f;
    float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
               + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    int32_t bits = (n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : (y * r * r + r + 1.0f) * scale;
}

static inline double exp_float64(double x) { return exp(x); }

#define QB 4   /* queries scored together: QB x 2 vector accumulators stay in registers */

#define DEFINE_KERNELS(T, NAME, LANES, LOG)                                                               \
    typedef T V_##NAME __attribute__((vector_size(sizeof(T) * LANES)));                                   \
                                                                                                          \
    static inline V_##NAME load_##NAME(const T *p) {                                                      \
        V_##NAME v;                                                                                       \
        memcpy(&v, p, sizeof v);                                                                          \
        return v;                                                                                         \
    }                                                                                                     \
                                                                                                          \
    static inline void store_##NAME(T *p, V_##NAME v) { memcpy(p, &v, sizeof v); }                        \
                                                                                                          \
    typedef struct {                                                                                      \
        int64_t d, dv, c, width;                                                                          \
        const T *q, *kp, *vp, *g, *lse, *row, *kt, *vt;   /* kt, vt: panels from panel0 on */             \
        int64_t panel0;                                                                                   \
        const int64_t *lo, *hi, *skip;                                                                    \
        T *out, *lse_out, *dq, *dkp, *dvp, *tails;                                                        \
    } Args_##NAME;                                                                                        \
                                                                                                          \
    typedef struct {                                                                                      \
        const T *x;                                                                                       \
        T *t;                                                                                             \
        int64_t rows, d, panel0;                                                                          \
    } Transpose_##NAME;                                                                                   \
                                                                                                          \
    /* Panels [begin, end) (counted from panel0) of x (rows, d): panel p holds rows p LANES ... p LANES + \
       LANES - 1 as (d, LANES), zeros past the last row, so that a vector of consecutive rows' element e  \
       is one load, and e + 1 the next. */                                                                \
    static void transpose_range_##NAME(const void *p, int part, int64_t begin, int64_t end) {             \
        const Transpose_##NAME *a = (const Transpose_##NAME *)p;                                          \
        (void)part;                                                                                       \
        for (int64_t panel = begin; panel < end; panel++) {                                               \
            T *t = a->t + (panel - a->panel0) * a->d * LANES;                                             \
            for (int64_t r = 0; r < LANES; r++) {                                                         \
                int64_t row = panel * LANES + r;                                                          \
                for (int64_t e = 0; e < a->d; e++) t[e * LANES + r] = row < a->rows ? a->x[row * a->d + e] : 0; \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
                                                                                                          \
    /* The panels a block of chunks [g0, g1) reads (its windows, and the two panels past them that the    \
       scores may load), into t: returns the first panel's number. */                                     \
    static int64_t transpose_##NAME(const T *x, int64_t rows, int64_t d, int64_t c, int64_t width,        \
                                    int64_t g0, int64_t g1, T *t, int threads) {                          \
        int64_t first = g0 * c / LANES, last = (g1 * c - c + width + LANES - 1) / LANES + 2;              \
        Transpose_##NAME a = {x, t, rows, d, first};                                                      \
        parallel_for(transpose_range_##NAME, &a, first, last, threads);                                   \
        return first;                                                                                     \
    }                                                                                                     \
                                                                                                          \
    /* Panels transpose_ needs at most for a block of `chunks` chunks. */                                 \
    static int64_t block_panels_##NAME(int64_t chunks, int64_t c, int64_t width) {                        \
        return (chunks * c - c + width) / LANES + 4;                                                      \
    }                                                                                                     \
    /* s[r * sw + col] = x_r . (padded row first + col of the panels t), for QB rows x_r (row r of x, d   \
       wide; rows past m repeat row 0) and window columns [from, to), widened to whole vectors of rows:   \
       s must have 2 LANES columns to spare before column 0 and after column to. */                       \
    static void scores_##NAME(const T *x, int m, int64_t d, const T *t, int64_t panel0, int64_t first, int64_t from, \
                              int64_t to, T *s, int64_t sw) {                                             \
        const T *xr[QB];                                                                                  \
        for (int r = 0; r < QB; r++) xr[r] = x + (r < m ? r : 0) * d;                                     \
        for (int64_t b = (first + from) / LANES; b * LANES < first + to; b += 2) {                        \
            const T *t0 = t + (b - panel0) * d * LANES, *t1 = t0 + d * LANES;                             \
            V_##NAME acc[QB][2];                                                                          \
            memset(acc, 0, sizeof acc);                                                                   \
            for (int64_t e = 0; e < d; e++) {                                                             \
                V_##NAME k0 = load_##NAME(t0 + e * LANES), k1 = load_##NAME(t1 + e * LANES);              \
                for (int r = 0; r < QB; r++) {                                                            \
                    T xe = xr[r][e];                                                                      \
                    acc[r][0] += k0 * xe;                                                                 \
                    acc[r][1] += k1 * xe;                                                                 \
                }                                                                                         \
            }                                                                                             \
            for (int r = 0; r < m; r++) {                                                                 \
                store_##NAME(s + r * sw + b * LANES - first, acc[r][0]);                                  \
                store_##NAME(s + r * sw + b * LANES - first + LANES, acc[r][1]);                          \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    /* y0 = scale0 * sum over columns [from, to) of w0[col] * (row first + col of x, d wide), and y1 alike \
       with w1 (unless y1 is NULL): two queries share each row's loads, 8 independent sums. */            \
    static void weighted_rows_##NAME(T *y0, T *y1, const T *w0, const T *w1, const T *x, int64_t d,       \
                                     int64_t first, int64_t from, int64_t to, T scale0, T scale1) {       \
        int64_t e = 0;                                                                                    \
        for (; e + 4 * LANES <= d; e += 4 * LANES) {                                                      \
            V_##NAME a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};      \
            for (int64_t col = from; col < to; col++) {                                                   \
                const T *r = x + (first + col) * d + e;                                                   \
                V_##NAME r0 = load_##NAME(r), r1 = load_##NAME(r + LANES), r2 = load_##NAME(r + 2 * LANES), \
                         r3 = load_##NAME(r + 3 * LANES);                                                 \
                T u = w0[col], v = w1[col];                                                               \
                a0 += r0 * u;                                                                             \
                a1 += r1 * u;                                                                             \
                a2 += r2 * u;                                                                             \
                a3 += r3 * u;                                                                             \
                b0 += r0 * v;                                                                             \
                b1 += r1 * v;                                                                             \
                b2 += r2 * v;                                                                             \
                b3 += r3 * v;                                                                             \
            }                                                                                             \
            store_##NAME(y0 + e, a0 * scale0);                                                            \
            store_##NAME(y0 + e + LANES, a1 * scale0);                                                    \
            store_##NAME(y0 + e + 2 * LANES, a2 * scale0);                                                \
            store_##NAME(y0 + e + 3 * LANES, a3 * scale0);                                                \
            if (y1) {                                                                                     \
                store_##NAME(y1 + e, b0 * scale1);                                                        \
                store_##NAME(y1 + e + LANES, b1 * scale1);                                                \
                store_##NAME(y1 + e + 2 * LANES, b2 * scale1);                                            \
                store_##NAME(y1 + e + 3 * LANES, b3 * scale1);                                            \
            }                                                                                             \
        }                                                                                                 \
        for (; e < d; e++) {                                                                              \
            T u = 0, v = 0;                                                                               \
            for (int64_t col = from; col < to; col++) {                                                   \
                u += w0[col] * x[(first + col) * d + e];                                                  \
                v += w1[col] * x[(first + col) * d + e];                                                  \
            }                                                                                             \
            y0[e] = u * scale0;                                                                           \
            if (y1) y1[e] = v * scale1;                                                                   \
        }                                                                                                 \
    }                                                                                                     \
                                                                                                          \
    /* tile[col] += sum_{r < m} w[r * sw + col] x_r for columns [from, to) of a (columns, d) tile; x_r =  \
       row r of x (d wide). Each tile row is read and written once per group of queries. */               \
    static void spread_##NAME(T *tile, const T *w, int64_t sw, const T *x, int m, int64_t d,              \
                              int64_t from, int64_t to) {                                                 \
        for (int64_t col = from; col < to; col++) {                                                       \
            T *out = tile + col * d;                                                                      \
            int64_t e = 0;                                                                                \
            for (; e + 2 * LANES <= d; e += 2 * LANES) {                                                  \
                V_##NAME a0 = load_##NAME(out + e), a1 = load_##NAME(out + e + LANES);                    \
                for (int r = 0; r < m; r++) {                                                             \
                    T wr = w[r * sw + col];                                                               \
                    a0 += load_##NAME(x + r * d + e) * wr;                                                \
                    a1 += load_##NAME(x + r * d + e + LANES) * wr;                                        \
                }                                                                                         \
                store_##NAME(out + e, a0);                                                                \
                store_##NAME(out + e + LANES, a1);                                                        \
            }                                                                                             \
            for (; e < d; e++)                                                                            \
                for (int r = 0; r < m; r++) out[e] += w[r * sw + col] * x[r * d + e];                     \
        }                                                                                                 \
    }                                                                                                     \
                                                                                                          \
    /* The columns the queries i0 ... i0 + m - 1 see, [*from, *to); false when none. */                   \
    static inline int group_columns_##NAME(const Args_##NAME *a, int64_t i0, int m, int64_t *from,        \
                                           int64_t *to) {                                                 \
        *from = a->width;                                                                                 \
        *to = 0;                                                                                          \
        for (int64_t i = i0; i < i0 + m; i++) {                                                           \
            if (a->hi[i] <= a->lo[i]) continue;                                                           \
            if (a->lo[i] < *from) *from = a->lo[i];                                                       \
            if (a->hi[i] > *to) *to = a->hi[i];                                                           \
        }                                                                                                 \
        return *to > *from;                                                                               \
    }                                                                                                     \
                                                                                                          \
    /* Row r of s over [from, to): exp(s - shift) on query i's span, 0 elsewhere (and at its skipped      \
       column); shift NAN means the span's maximum. Returns the sum; *used gets the shift. */             \
    static inline T probabilities_##NAME(const Args_##NAME *a, int64_t i, T *s, int64_t from, int64_t to, \
                                         T shift, T *used) {                                              \
        int64_t lo = a->lo[i], hi = a->hi[i], skip = a->skip[i];                                          \
        if (skip >= lo && skip < hi) s[skip] = -INFINITY;                                                 \
        if (isnan(shift)) {                                                                               \
            T best = -INFINITY;                                                                           \
            _Pragma("omp simd reduction(max:best)") for (int64_t col = lo; col < hi; col++)               \
                best = s[col] > best ? s[col] : best;                                                     \
            shift = best;                                                                                 \
        }                                                                                                 \
        *used = shift;                                                                                    \
        for (int64_t col = from; col < lo; col++) s[col] = 0;                                             \
        _Pragma("omp simd") for (int64_t col = lo; col < hi; col++) s[col] = exp_##NAME(s[col] - shift);  \
        for (int64_t col = hi; col < to; col++) s[col] = 0;                                               \
        T total = 0;                                                                                      \
        _Pragma("omp simd reduction(+:total)") for (int64_t col = lo; col < hi; col++) total += s[col];   \
        return total;                                                                                     \
    }                                                                                                     \
                                                                                                          \
    /* Chunks [begin, end): out[i] = softmax over the span of q_i . k, times v, and lse_out[i]. */        \
    static void forward_range_##NAME(const void *p, int part, int64_t begin, int64_t end) {               \
        const Args_##NAME *a = (const Args_##NAME *)p;                                                    \
        int64_t c = a->c, d = a->d, dv = a->dv, sw = a->width + 4 * LANES;                                \
        T *scratch = (T *)malloc(sizeof(T) * (size_t)(QB * sw)), *s = scratch + 2 * LANES;                \
        (void)part;                                                                                       \
        for (int64_t g = begin; g < end; g++) {                                                           \
            int64_t first = g * c;                                                                        \
            for (int64_t i0 = g * c; i0 < (g + 1) * c; i0 += QB) {                                        \
                int m = (g + 1) * c - i0 < QB ? (int)((g + 1) * c - i0) : QB;                             \
                int64_t from, to;                                                                         \
                if (!group_columns_##NAME(a, i0, m, &from, &to)) continue;                                \
                scores_##NAME(a->q + i0 * d, m, d, a->kt, a->panel0, first, from, to, s, sw);             \
                T total[QB], best[QB];                                                                    \
                for (int r = 0; r < m; r++) {                                                             \
                    total[r] = probabilities_##NAME(a, i0 + r, s + r * sw, from, to, NAN, best + r);      \
                    a->lse_out[i0 + r] = best[r] + LOG(total[r]);                                         \
                }                                                                                         \
                for (int r = 0; r < m; r += 2) {   /* two queries at a time, over both their spans */     \
                    int64_t i = i0 + r, two = r + 1 < m;                                                  \
                    int64_t lo = a->lo[i], hi = a->hi[i];                                                 \
                    if (two && a->lo[i + 1] < lo) lo = a->lo[i + 1];                                      \
                    if (two && a->hi[i + 1] > hi) hi = a->hi[i + 1];                                      \
                    weighted_rows_##NAME(a->out + i * dv, two ? a->out + (i + 1) * dv : NULL, s + r * sw, \
                                         s + (r + two) * sw, a->vp, dv, first, lo, hi, 1 / total[r],      \
                                         two ? 1 / total[r + 1] : 0);                                     \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        free(scratch);                                                                                    \
    }                                                                                                     \
                                                                                                          \
    /* Chunks [begin, end): dq_i = sum_j ds_ij k_j; dk_j = sum_i ds_ij q_i and dv_j = sum_i p_ij g_i are  \
       gathered per chunk in a window tile, then added to the padded rows. Rows from end * c on belong to \
       the next part (its first chunks write them): this part's share goes to its tail buffer, which      \
       interval_backward adds once every row it reaches is written. */                                    \
    static void backward_range_##NAME(const void *p, int part, int64_t begin, int64_t end) {              \
        const Args_##NAME *a = (const Args_##NAME *)p;                                                    \
        int64_t c = a->c, d = a->d, dv = a->dv, width = a->width, sw = width + 4 * LANES;                 \
        int64_t mine = end * c;   /* rows this part writes directly: [begin c, mine) */                   \
        T *scratch = (T *)malloc(sizeof(T) * (size_t)(2 * QB * sw)), *s = scratch + 2 * LANES;            \
        T *dp = s + QB * sw;                                                                              \
        T *tile_k = (T *)calloc((size_t)(sw * d), sizeof(T)), *tile_v = (T *)calloc((size_t)(sw * dv), sizeof(T)); \
        T *tail_k = a->tails + (size_t)part * (size_t)((width - c) * (d + dv)), *tail_v = tail_k + (width - c) * d; \
        memset(a->dkp + begin * c * d, 0, sizeof(T) * (size_t)((mine - begin * c) * d));                  \
        memset(a->dvp + begin * c * dv, 0, sizeof(T) * (size_t)((mine - begin * c) * dv));                \
        memset(tail_k, 0, sizeof(T) * (size_t)((width - c) * (d + dv)));                                  \
        for (int64_t g = begin; g < end; g++) {                                                           \
            int64_t first = g * c, used_from = width, used_to = 0;                                        \
            for (int64_t i0 = g * c; i0 < (g + 1) * c; i0 += QB) {                                        \
                int m = (g + 1) * c - i0 < QB ? (int)((g + 1) * c - i0) : QB;                             \
                int64_t from, to;                                                                         \
                if (!group_columns_##NAME(a, i0, m, &from, &to)) continue;                                \
                used_from = from < used_from ? from : used_from;                                          \
                used_to = to > used_to ? to : used_to;                                                    \
                scores_##NAME(a->q + i0 * d, m, d, a->kt, a->panel0, first, from, to, s, sw);             \
                scores_##NAME(a->g + i0 * dv, m, dv, a->vt, a->panel0, first, from, to, dp, sw);          \
                for (int r = 0; r < m; r++) {                                                             \
                    int64_t i = i0 + r;                                                                   \
                    T *pr = s + r * sw, *dr = dp + r * sw, row = a->row[i], shift;                        \
                    probabilities_##NAME(a, i, pr, from, to, a->lse[i], &shift);                          \
                    _Pragma("omp simd") for (int64_t col = from; col < to; col++) dr[col] = pr[col] * (dr[col] - row); \
                }                                                                                         \
                for (int r = 0; r < m; r += 2) {                                                          \
                    int64_t i = i0 + r, two = r + 1 < m;                                                  \
                    weighted_rows_##NAME(a->dq + i * d, two ? a->dq + (i + 1) * d : NULL, dp + r * sw,    \
                                         dp + (r + two) * sw, a->kp, d, first, from, to, 1, 1);           \
                }                                                                                         \
                spread_##NAME(tile_k, dp, sw, a->q + i0 * d, m, d, from, to);                             \
                spread_##NAME(tile_v, s, sw, a->g + i0 * dv, m, dv, from, to);                            \
            }                                                                                             \
            for (int64_t col = used_from; col < used_to; col++) {                                         \
                int64_t row = first + col;                                                                \
                T *dk = row < mine ? a->dkp + row * d : tail_k + (row - mine) * d;                        \
                T *dvr = row < mine ? a->dvp + row * dv : tail_v + (row - mine) * dv;                     \
                _Pragma("omp simd") for (int64_t e = 0; e < d; e++) dk[e] += tile_k[col * d + e];         \
                _Pragma("omp simd") for (int64_t e = 0; e < dv; e++) dvr[e] += tile_v[col * dv + e];      \
            }                                                                                             \
            if (used_to > used_from) {                                                                    \
                memset(tile_k + used_from * d, 0, sizeof(T) * (size_t)((used_to - used_from) * d));       \
                memset(tile_v + used_from * dv, 0, sizeof(T) * (size_t)((used_to - used_from) * dv));     \
            }                                                                                             \
        }                                                                                                 \
        free(scratch);                                                                                    \
        free(tile_k);                                                                                     \
        free(tile_v);                                                                                     \
    }                                                                                                     \
                                                                                                          \
    void interval_forward_##NAME(int64_t n, int64_t d, int64_t dv, int64_t c, int64_t width,              \
                                 const T *q, const T *kp, const T *vp, const int64_t *lo,                 \
                                 const int64_t *hi, const int64_t *skip, T *out, T *lse_out, int threads) { \
        int64_t rows = n + width - c, chunks = n / c, per = BLOCK_ROWS / c > width / c ? BLOCK_ROWS / c : width / c; \
        T *kt = (T *)malloc(sizeof(T) * (size_t)(block_panels_##NAME(per, c, width) * d * LANES));        \
        Args_##NAME a = {d, dv, c, width, q, kp, vp, NULL, NULL, NULL, kt, NULL, 0,                       \
                         lo, hi, skip, out, lse_out, NULL, NULL, NULL, NULL};                             \
        for (int64_t g0 = 0; g0 < chunks; g0 += per) {                                                    \
            int64_t g1 = g0 + per < chunks ? g0 + per : chunks;                                           \
            a.panel0 = transpose_##NAME(kp, rows, d, c, width, g0, g1, kt, threads);                      \
            parallel_for(forward_range_##NAME, &a, g0, g1, threads);                                      \
        }                                                                                                 \
        free(kt);                                                                                         \
    }                                                                                                     \
                                                                                                          \
    /* Adds each part's tail (rows past its chunks, parts of block [g0, g1)) to the gradients. */         \
    static void add_tails_##NAME(const T *tails, int64_t g0, int64_t g1, int64_t c, int64_t tail_rows,    \
                                 int64_t d, int64_t dv, T *dkp, T *dvp, int threads) {                    \
        int parts = part_count(g1 - g0, threads);                                                         \
        for (int t = 0; t < parts; t++) {                                                                 \
            int64_t start = part_begin(g0, g1, parts, t + 1) * c;                                         \
            const T *tail_k = tails + (size_t)t * (size_t)(tail_rows * (d + dv)), *tail_v = tail_k + tail_rows * d; \
            for (int64_t x = 0; x < tail_rows * d; x++) dkp[start * d + x] += tail_k[x];                  \
            for (int64_t x = 0; x < tail_rows * dv; x++) dvp[start * dv + x] += tail_v[x];                \
        }                                                                                                 \
    }                                                                                                     \
                                                                                                          \
    /* Blocks of chunks one after the other, each cut in parts that run in parallel. A part writes the    \
       gradient rows of its own chunks (zeroing them first) and puts its share of the rows past them in   \
       its tail; a block's tails are added once the next block is done, when every row they reach has     \
       been written (blocks span at least a window, so tails reach no further than the next block). */    \
    void interval_backward_##NAME(int64_t n, int64_t d, int64_t dv, int64_t c, int64_t width,             \
                                  int64_t rows, const T *q, const T *kp, const T *vp, const int64_t *lo,  \
                                  const int64_t *hi, const int64_t *skip, const T *g, const T *lse,       \
                                  const T *row, T *dq, T *dkp, T *dvp, int threads) {                     \
        int64_t tail_rows = width - c, chunks = n / c, per = BLOCK_ROWS / c > width / c ? BLOCK_ROWS / c : width / c; \
        int64_t panels = block_panels_##NAME(per, c, width), tail_size = MAX_THREADS * tail_rows * (d + dv) + 1; \
        T *kt = (T *)malloc(sizeof(T) * (size_t)(panels * d * LANES));                                    \
        T *vt = (T *)malloc(sizeof(T) * (size_t)(panels * dv * LANES));                                   \
        T *tails[2] = {(T *)malloc(sizeof(T) * (size_t)tail_size), (T *)malloc(sizeof(T) * (size_t)tail_size)}; \
        Args_##NAME a = {d, dv, c, width, q, kp, vp, g, lse, row, kt, vt, 0,                              \
                         lo, hi, skip, NULL, NULL, dq, dkp, dvp, NULL};                                   \
        memset(dkp + n * d, 0, sizeof(T) * (size_t)(tail_rows * d));   /* the rows after the last chunk */ \
        memset(dvp + n * dv, 0, sizeof(T) * (size_t)(tail_rows * dv));                                    \
        int64_t before = -1;   /* the block whose tails wait */                                           \
        for (int64_t g0 = 0, block = 0; g0 < chunks; g0 += per, block++) {                                \
            int64_t g1 = g0 + per < chunks ? g0 + per : chunks;                                           \
            a.panel0 = transpose_##NAME(kp, rows, d, c, width, g0, g1, kt, threads);                      \
            transpose_##NAME(vp, rows, dv, c, width, g0, g1, vt, threads);                                \
            a.tails = tails[block % 2];                                                                   \
            parallel_for(backward_range_##NAME, &a, g0, g1, threads);                                     \
            if (before >= 0)                                                                              \
                add_tails_##NAME(tails[(block + 1) % 2], before, g0, c, tail_rows, d, dv, dkp, dvp, threads); \
            before = g0;                                                                                  \
        }                                                                                                 \
        if (before >= 0) add_tails_##NAME(tails[((chunks + per - 1) / per + 1) % 2], before, chunks, c,   \
                                          tail_rows, d, dv, dkp, dvp, threads);                           \
        free(kt);                                                                                         \
        free(vt);                                                                                         \
        free(tails[0]);                                                                                   \
        free(tails[1]);                                                                                   \
    }

DEFINE_KERNELS(float, float32, 8, logf)
DEFINE_KERNELS(double, float64, 4, log)
