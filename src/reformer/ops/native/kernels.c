/* The interval core (intervals.py) compiled: each query is scored against its own span only.

In the bucket window a query's span holds the earlier items of its bucket within reach: typically a
fraction of the window, whose every column the batched products of the eager core score before masking
most of them. Here, per group of QB consecutive queries (in sorted order they mostly
share a bucket, so their spans nearly coincide), only the columns of their spans are scored.

Layout (as in intervals.py): queries q (n, d) rows; keys and values padded (rows, d) with `before * c`
rows in front, so that column `col` of query i's window is padded row (i / c) * c + col. A query sees the
columns lo[i] <= col < hi[i] except skip[i] (-1: none). Every span holds at least one column (the self
fallback of make_spans), so every normaliser is positive.

How it is fast on a CPU without BLAS:
- Scores are vectors over columns, not dot products: keys are transposed into panels of one vector of
  rows each ((d, LANES) blocks), so q_i . k for LANES consecutive keys is d multiply-adds of whole
  vectors, QB queries x 2 vectors of keys in registers, no horizontal sums. Panels are made a sub-block of
  rows at a time (BLOCK_ROWS_PER_THREAD), so they stay small and in cache.
- exp is a vectorisable polynomial (float32), the row sums and maxima are simd reductions.
- Weighted sums of value (or key) rows run two queries at a time, eight vector accumulators.
- Backward gathers dk and dv of a chunk's window in a tile, then adds it to the rows.
- LSH rounds (fused_rounds.py) pass their rows by index instead of sorted copies: each sub-block's rows are
  gathered into buffers that stay in cache (keys scaled on the way, reads prefetched a few rows ahead),
  forward adds each query's result straight into the online softmax over rounds in position order, and
  scatter_gradients adds a round's gradients back in position order. No sorted copy of a head's rows
  goes through memory.

Parallel: the chunks are cut in contiguous parts of a few sub-blocks, which the threads take as they come
free, on torch's own OpenMP threads where build.py builds with -fopenmp (the loader binds this library
to the libgomp torch has loaded), else on POSIX threads started per call. A part works through its
chunks a sub-block at a time in buffers of its own (the window rows a sub-block shares with the one
before are moved, not gathered again), so the threads meet once per call, not once per block, and a
thread the machine slows down (another tenant on its core) holds the others up by one part at most,
where one part per thread would hold them up for its whole share. Windows overlap, so a part
writes the gradient rows of its own chunks and puts its share of the rows after them in a tail buffer,
added in part order once every part is done. A part is the same range whichever thread runs it, so
results are the same from run to run; the number of threads only changes the order of a few sums.

Built by build.py with -O3 -march=native -fno-trapping-math (no trapping math so that the loops around
exp's conversions vectorise) and -fopenmp, or -fopenmp-simd (the simd pragmas without a runtime). The
file includes itself once per element type, with T, NAME, LANES, LOG and EXP defined.
*/

#ifndef T   /* first pass: what every element type shares, then the kernels per type */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define MIN_CHUNKS_PER_THREAD 8
#define PART_SUB_BLOCKS 4
#define SCATTER_GRAIN 4096   /* items per part of scatter_gradients */
#define MAX_PARTS 256

typedef void (*range_fn)(const void *args, int part, int64_t begin, int64_t end);

/* How many parts parallel_for cuts n items into. */
static int part_count(int64_t n, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n / MIN_CHUNKS_PER_THREAD) threads = (int)(n / MIN_CHUNKS_PER_THREAD);
    return threads < 1 ? 1 : threads;
}

/* Where part t of [begin, end) cut in `parts` starts. */
static int64_t part_begin(int64_t begin, int64_t end, int parts, int t) { return begin + (end - begin) * t / parts; }

typedef struct {
    range_fn fn;
    const void *args;
    int64_t begin, end;
    int parts, next;   /* next: the first part no thread has taken yet */
} Parts;

static void take_parts(Parts *p) {
    for (int t; (t = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED)) < p->parts;)
        p->fn(p->args, t, part_begin(p->begin, p->end, p->parts, t), part_begin(p->begin, p->end, p->parts, t + 1));
}

static void *take_parts_thread(void *p) {
    take_parts((Parts *)p);
    return NULL;
}

/* fn over [begin, end) cut in `parts` contiguous parts (part t is the same range whichever thread runs
   it), which up to `threads` threads take one at a time as they come free: on the OpenMP runtime's
   threads, or on POSIX threads and the calling thread. Taking parts as they come, a thread the machine
   slows down (another tenant on its core) holds the others up by one part at most. */
static void parallel_parts(range_fn fn, const void *args, int64_t begin, int64_t end, int parts, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > parts) threads = parts;
#ifdef _OPENMP
    if (threads > 1) {
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1)")
        for (int t = 0; t < parts; t++)
            fn(args, t, part_begin(begin, end, parts, t), part_begin(begin, end, parts, t + 1));
        return;
    }
#endif
    Parts all = {fn, args, begin, end, parts, 0};
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, take_parts_thread, &all) == 0;
    take_parts(&all);   /* with no thread to be had, this one takes every part */
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
}

/* Parts of `grain` items or more for n items: at least one per thread (part_count), at most MAX_PARTS
   (a kernel keeps a tail buffer per part). More parts than threads keep every thread busy to the end
   of a call when the machine slows one of them down. */
static int parts_of(int64_t n, int64_t grain, int threads) {
    int64_t parts = n / grain, least = part_count(n, threads);
    parts = parts < least ? least : parts;
    return (int)(parts < MAX_PARTS ? parts : MAX_PARTS);
}

/* fn over [begin, end) in part_count(end - begin, threads) parts. */
static void parallel_for(range_fn fn, const void *args, int64_t begin, int64_t end, int threads) {
    parallel_parts(fn, args, begin, end, part_count(end - begin, threads), threads);
}

/* Rows of queries per sub-block: a thread gathers, transposes and attends its chunks a sub-block at a
   time, so that the sub-block's rows (gathered rows, transposed keys and values, about 1 MiB at d = 64)
   stay in its core's L2 cache (2,048 rows spill to L3). */
#define BLOCK_ROWS_PER_THREAD 512

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

/* One LSH round's items in bucket order and their spans (sorting.sort_by_bucket, intervals.bucket_spans and
   make_spans at once). Sequences s = b heads + h of `length` items, bucket ids at
   buckets[b bs + h hs + position ps]; valid (batch, length) or NULL. Per sequence, a counting sort by bucket
   (stable: positions stay in order inside a bucket), then for sorted item i (global index) the bucket
   window's span in window columns (Window c, before, after): earlier items of its bucket within reach
   (causal) or its bucket within reach but itself; a padding query sees nothing; a query left with nothing
   sees itself (has_other false). Writes positions (sorted positions) and order (s length + position) by
   item. Returns 0, 1 where padding shares a bucket with real items, 2 where a span leaves its window, 3
   where the counts of the bucket ids find no memory. */
typedef struct {
    int64_t heads, length, bs, hs, ps, c, before, after;
    int causal;
    const int64_t *buckets;
    const unsigned char *valid;
    int64_t *positions, *order, *lo, *hi, *skip;
    unsigned char *has_other;
    int error;
} RoundSpans;

typedef struct {
    int64_t *starts, *ends;   /* where each bucket's items begin and end in the sorted sequence */
    int64_t low;              /* the smallest bucket id (bucket k above it counts at starts[k - low]) */
} SequenceSort;

/* Sequence s's counting sort: the positions of its items in bucket order (stable), and each bucket's
   bounds. Returns 0, or 3 where the counts find no memory. */
static int sort_sequence(const RoundSpans *a, int64_t sequence, SequenceSort *sort) {
    int64_t length = a->length, b = sequence / a->heads, h = sequence % a->heads, base = sequence * length;
    const int64_t *ids = a->buckets + b * a->bs + h * a->hs;
    int64_t low = ids[0], high = ids[0];
    for (int64_t t = 1; t < length; t++) {
        int64_t id = ids[t * a->ps];
        low = id < low ? id : low;
        high = id > high ? id : high;
    }
    int64_t *starts = (int64_t *)calloc((size_t)(2 * (high - low + 2)), sizeof(int64_t));
    if (!starts) return 3;
    int64_t *ends = starts + (high - low + 2);
    for (int64_t t = 0; t < length; t++) starts[ids[t * a->ps] - low + 1]++;
    for (int64_t k = 0; k <= high - low; k++) starts[k + 1] += starts[k];
    memcpy(ends, starts, sizeof(int64_t) * (size_t)(high - low + 2));
    for (int64_t t = 0; t < length; t++) a->positions[base + ends[ids[t * a->ps] - low]++] = t;
    *sort = (SequenceSort){starts, ends, low};
    return 0;
}

/* Order and spans of sorted items [k0, k1) of sequence s, given its sort. */
static void sequence_spans(RoundSpans *a, int64_t sequence, const SequenceSort *sort, int64_t k0, int64_t k1) {
    int64_t length = a->length, c = a->c, width = (a->before + 1 + a->after) * c, base = sequence * length;
    int64_t b = sequence / a->heads, h = sequence % a->heads;
    const int64_t *ids = a->buckets + b * a->bs + h * a->hs, *starts = sort->starts, *ends = sort->ends;
    const unsigned char *valid = a->valid ? a->valid + b * length : NULL;
    for (int64_t k = k0; k < k1; k++) {
        int64_t i = base + k, t = a->positions[i], bucket = ids[t * a->ps] - sort->low;
        a->order[i] = base + t;
        if (valid && k > starts[bucket] && valid[t] != valid[a->positions[i - 1]]) __atomic_store_n(&a->error, 1, __ATOMIC_RELAXED);
        int64_t lo = base + starts[bucket] > i - a->before * c ? base + starts[bucket] : i - a->before * c, hi;
        if (a->causal) hi = i;
        else hi = base + ends[bucket] < i + a->after * c + 1 ? base + ends[bucket] : i + a->after * c + 1;
        if (valid && !valid[t]) hi = lo;
        int64_t first = (i / c - a->before) * c, own = i - first;
        lo -= first;
        hi = hi - first > lo ? hi - first : lo;
        if (lo < 0 || hi > width) __atomic_store_n(&a->error, 2, __ATOMIC_RELAXED);
        int self_inside = lo <= own && own < hi, has_other = hi - lo - self_inside > 0;
        a->lo[i] = has_other ? lo : own;
        a->hi[i] = has_other ? hi : own + 1;
        a->skip[i] = has_other && self_inside ? own : -1;
        a->has_other[i] = (unsigned char)has_other;
    }
}

/* Whole sequences [begin, end). */
static void round_spans_range(const void *p, int part, int64_t begin, int64_t end) {
    RoundSpans *a = (RoundSpans *)p;
    (void)part;
    for (int64_t sequence = begin; sequence < end; sequence++) {
        SequenceSort sort;
        if (sort_sequence(a, sequence, &sort)) {
            __atomic_store_n(&a->error, 3, __ATOMIC_RELAXED);
            return;
        }
        sequence_spans(a, sequence, &sort, 0, a->length);
        free(sort.starts);
    }
}

typedef struct {
    RoundSpans *a;
    int64_t sequence;
    const SequenceSort *sort;
} SequenceItems;

/* Sorted items [begin, end) of one sequence. */
static void sequence_items_range(const void *p, int part, int64_t begin, int64_t end) {
    const SequenceItems *s = (const SequenceItems *)p;
    (void)part;
    sequence_spans(s->a, s->sequence, s->sort, begin, end);
}

/* round_spans: one round's sort and spans (see RoundSpans), sequences (batch, heads) of `length` items, bucket
   ids at buckets[b strides[0] + h strides[1] + position strides[2]], valid (batch, length) or NULL. Returns 0,
   or the error of RoundSpans. */
typedef struct {
    int64_t batch, heads, length;
    const int64_t *buckets;
    int64_t strides[3];
    const unsigned char *valid;
    int64_t chunk, before, after;
    int causal;
    int64_t *positions, *order, *lo, *hi, *skip;
    unsigned char *has_other;
    int threads;
} RoundSpansCall;

int round_spans(const RoundSpansCall *call) {
    int64_t batch = call->batch, heads = call->heads, length = call->length;
    int threads = call->threads;
    RoundSpans a = {heads, call->length, call->strides[0], call->strides[1], call->strides[2], call->chunk,
                    call->before, call->after, call->causal, call->buckets, call->valid, call->positions,
                    call->order, call->lo, call->hi, call->skip, call->has_other, 0};
    if (batch * heads >= threads) {   /* parts write their own sequences' rows */
        parallel_for(round_spans_range, &a, 0, batch * heads, threads);
        return a.error;
    }
    /* Fewer sequences than threads (one head at a time at long lengths): each sorted on one thread, then
       its items' spans in parallel (they are most of the work). */
    for (int64_t sequence = 0; sequence < batch * heads; sequence++) {
        SequenceSort sort;
        if (sort_sequence(&a, sequence, &sort)) return 3;
        SequenceItems items = {&a, sequence, &sort};
        parallel_for(sequence_items_range, &items, 0, length, threads);
        free(sort.starts);
    }
    return a.error;
}

/* The calls from Python (native/kernels.py mirrors these structures field by field with ctypes). Element
   arrays are void pointers: the same structure serves the float32 and the float64 kernels. */

/* interval_forward: span attention of n items (n / chunk chunks) in sorted order. Rows as they lie (q_index
   NULL: q (n, d), k and v padded, n + width - chunk rows, `pad` of them in front) or by index (item i's
   rows at q + q_index[i] and v + v_index[i]; the keys are the q rows times k_scale, k unused). Outputs:
   out (n, dv) and lse (n) by item; or, with order (each item's position), the round added to the online
   softmax over rounds (acc (positions, dv), best, norm, scores by position; has_other by item) and lse by
   item; with final_out too (the last round), the softmax finished: final_out's rows at out_index (by
   position) get the result, total and any_other the total normaliser and whether any round saw another
   key. */
typedef struct {
    int64_t n, d, dv, chunk, width, pad;
    const void *q, *k, *k_scale, *v;
    const int64_t *q_index, *v_index;
    const int64_t *lo, *hi, *skip;
    void *out, *lse;
    const int64_t *order;
    const unsigned char *has_other;
    void *acc, *best, *norm, *scores;
    void *final_out;
    const int64_t *out_index;
    void *total;
    unsigned char *any_other;
    int threads;
} ForwardCall;

/* interval_backward: dq (n, d) by item, dk and dv in the padded layout (every row written), given d_out
   (g (n, dv), or with g_index its rows by index times g_scale), forward's lse and row = sum(d_out * out)
   - d_lse, by item; the other rows as for interval_forward. */
typedef struct {
    int64_t n, d, dv, chunk, width, pad;
    const void *q, *k, *k_scale, *v, *g, *g_scale;
    const int64_t *q_index, *v_index, *g_index;
    const int64_t *lo, *hi, *skip;
    const void *lse, *row;
    void *dq, *dkp, *dvp;
    int threads;
} BackwardCall;

/* scatter_gradients: a round's gradients (interval_backward's dq, and dk and dv in the padded layout; keys q
   times k_scale) added in position order: the rows of d_qk at dq_index += dq + k_scale dk,
   d_scale[order] += dk . q, the rows of d_v at dv_index += dv. */
typedef struct {
    int64_t n, d, dv, pad;
    const void *q, *k_scale, *dq, *dkp, *dvp;
    const int64_t *q_index, *order, *dq_index, *dv_index;
    void *d_qk, *d_v, *d_scale;
    int threads;
} ScatterCall;

/* hash_buckets: for every row of rotated values x (sizes[0..3] rows, element (i0, i1, i2, i3, j) at x +
   sum i_k strides[k] + j), the argmax over [x_f, -x_f] of each factor's columns, combined as
   id_0 + factors[0] (id_1 + ...), written to out at sum i_k out_strides[k]. */
typedef struct {
    const void *x;
    int64_t sizes[4], strides[4], out_strides[4];
    int64_t *out;
    int64_t n_factors;
    int64_t factors[2];
    int threads;
} HashCall;

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

/* The kernels, once per element type: this file includes itself with T, NAME, LANES, LOG and EXP set. */
#define T float
#define NAME float32
#define LANES 8
#define LOG logf
#define EXP exp_float32
#include __FILE__
#undef T
#undef NAME
#undef LANES
#undef LOG
#undef EXP

#define T double
#define NAME float64
#define LANES 4
#define LOG log
#define EXP exp_float64
#include __FILE__

#else /* the kernels for one element type T */

#define F(x) CAT(x, NAME)
typedef T F(V) __attribute__((vector_size(sizeof(T) * LANES)));
#define V F(V)

static inline V F(load)(const T *p) {
    V v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void F(store)(T *p, V v) { memcpy(p, &v, sizeof v); }

typedef struct {
    int64_t n, d, dv, c, width, pad;   /* pad: rows of zeros in front of the keys' padded layout */
    /* The rows the chunk loops read: query i's at q + (i - q0) d, padded key and value row p's at
       kp + (p - k0) d and vp + (p - k0) dv, d_out of query i at g + (i - g0) dv. */
    const T *q, *kp, *vp, *g;
    int64_t q0, k0, g0;
    const T *lse, *row;
    const int64_t *lo, *hi, *skip;
    const T *kt, *vt;   /* panels from panel0 on */
    int64_t panel0;
    /* Forward's outputs: out and lse_out by item; or, with order, combined into position order. */
    T *out, *lse_out;
    const int64_t *order;
    const unsigned char *has_other;
    T *acc, *best, *norm, *scores;
    /* Backward's: dq by item, dkp and dvp in the padded layout, each part's tail. */
    T *dq, *dkp, *dvp, *tails;
    /* The last round's combination, finished (final_out not NULL): the result written to the rows of
       final_out at out_index (by position), with the total normaliser and any_other by position. */
    T *final_out, *total;
    const int64_t *out_index;
    unsigned char *any_other;
} F(Args);
#define Args F(Args)

/* Rows read by index: item i's row of q starts at q + q_index[i], and so on. Keys are the q rows times
   k_scale (NULL: 1) (shared-QK), backward's d_out the g rows times g_scale. */
typedef struct {
    const T *q, *v, *g, *k_scale, *g_scale;
    const int64_t *q_index, *v_index, *g_index;
} F(Sources);
#define Sources F(Sources)

/* A sub-block's rows gathered from their sources: padded rows [p0, p1) of keys (ks, scaled), values (vs)
   and queries (qs, their items); d_out (gs, times g_scale) of the queries' items [i0, i1). */
typedef struct {
    const Sources *from;
    int64_t n, d, dv, pad, p0, i0, i1;
    T *qs, *ks, *vs, *gs;
} F(Stage);

/* Prefetches the row of item `item` (bytes long) if there is one. */
static inline void F(prefetch_row)(const T *base, const int64_t *index, int64_t item, int64_t n, int64_t bytes) {
    if (item < 0 || item >= n) return;
    const char *row = (const char *)(base + index[item]);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
}

#define PREFETCH_AHEAD 8   /* rows: a gather's scattered reads overlap this many at a time */

/* Padded rows [begin, end) of the stage's q, k and v. */
static void F(stage_rows)(const F(Stage) *a, int64_t begin, int64_t end) {
    const Sources *s = a->from;
    int64_t d = a->d, dv = a->dv;
    for (int64_t row = begin; row < end; row++) {
        int64_t item = row - a->pad, ahead = item + PREFETCH_AHEAD;
        if (ahead < end - a->pad) {
            F(prefetch_row)(s->q, s->q_index, ahead, a->n, d * (int64_t)sizeof(T));
            F(prefetch_row)(s->v, s->v_index, ahead, a->n, dv * (int64_t)sizeof(T));
        }
        T *q = a->qs + (row - a->p0) * d, *k = a->ks + (row - a->p0) * d, *v = a->vs + (row - a->p0) * dv;
        if (item < 0 || item >= a->n) {
            memset(q, 0, sizeof(T) * (size_t)d);
            memset(k, 0, sizeof(T) * (size_t)d);
            memset(v, 0, sizeof(T) * (size_t)dv);
            continue;
        }
        const T *src = s->q + s->q_index[item], *vsrc = s->v + s->v_index[item];
        T scale = s->k_scale ? s->k_scale[item] : 1;
        _Pragma("omp simd") for (int64_t e = 0; e < d; e++) {
            q[e] = src[e];
            k[e] = src[e] * scale;
        }
        memcpy(v, vsrc, sizeof(T) * (size_t)dv);
    }
}

/* The stage's d_out rows: items [i0, i1). */
static void F(stage_d_out)(const F(Stage) *a) {
    const Sources *s = a->from;
    int64_t dv = a->dv;
    for (int64_t item = a->i0; item < a->i1; item++) {
        if (item + PREFETCH_AHEAD < a->i1)
            F(prefetch_row)(s->g, s->g_index, item + PREFETCH_AHEAD, a->n, dv * (int64_t)sizeof(T));
        const T *gsrc = s->g + s->g_index[item];
        T *g = a->gs + (item - a->i0) * dv, factor = s->g_scale ? s->g_scale[item] : 1;
        _Pragma("omp simd") for (int64_t e = 0; e < dv; e++) g[e] = gsrc[e] * factor;
    }
}

/* Gathers the rows sub-block [g0, g1) of chunks reads into one thread's buffers (qs, ks, vs; gs unless
   NULL: its queries' d_out) and points the chunk loops' rows at them. The shared-QK keys are the queries'
   own rows times k_scale. With `carry` (the buffers hold the sub-block before, of `per` chunks), the rows
   both windows read (width - c of them) are moved to the front instead of gathered again. */
static void F(stage)(const Sources *from, Args *a, int64_t g0, int64_t g1, int64_t per, int carry, T *qs, T *ks,
                     T *vs, T *gs) {
    int64_t c = a->c, d = a->d, dv = a->dv, p0 = g0 * c, p1 = g1 * c - c + a->width, kept = 0;
    F(Stage) st = {from, a->n, d, dv, a->pad, p0, g0 * c, g1 * c, qs, ks, vs, gs};
    if (carry) {
        kept = a->width - c;
        memmove(qs, qs + per * c * d, sizeof(T) * (size_t)(kept * d));
        memmove(ks, ks + per * c * d, sizeof(T) * (size_t)(kept * d));
        memmove(vs, vs + per * c * dv, sizeof(T) * (size_t)(kept * dv));
    }
    F(stage_rows)(&st, p0 + kept, p1);
    if (gs) F(stage_d_out)(&st);
    a->q = qs;
    a->q0 = p0 - a->pad;
    a->kp = ks;
    a->vp = vs;
    a->k0 = p0;
    if (gs) {
        a->g = gs;
        a->g0 = g0 * c;
    }
}

typedef struct {
    const T *x;
    T *t;
    int64_t origin, rows, d, panel0;
} F(Transpose);

/* Panels [begin, end) (counted from panel0) of padded rows x (row p at x + (p - origin) d, rows of them;
   zeros outside): panel b holds rows b LANES ... b LANES + LANES - 1 as (d, LANES), so that a vector of
   consecutive rows' element e is one load, and e + 1 the next. */
static void F(transpose_panels)(const F(Transpose) *a, int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; panel++) {
        T *t = a->t + (panel - a->panel0) * a->d * LANES;
        for (int64_t r = 0; r < LANES; r++) {
            int64_t row = panel * LANES + r - a->origin;
            const T *x = a->x + row * a->d;
            int inside = row >= 0 && row < a->rows;
            for (int64_t e = 0; e < a->d; e++) t[e * LANES + r] = inside ? x[e] : 0;
        }
    }
}

/* The panels sub-block [g0, g1) of chunks reads (its windows, and the two panels past them that the scores
   may load), into t: returns the first panel's number. */
static int64_t F(transpose)(const T *x, int64_t origin, int64_t rows, int64_t d, const Args *a, int64_t g0,
                            int64_t g1, T *t) {
    int64_t first = g0 * a->c / LANES, last = (g1 * a->c - a->c + a->width + LANES - 1) / LANES + 2;
    F(Transpose) tr = {x, t, origin, rows, d, first};
    F(transpose_panels)(&tr, first, last);
    return first;
}

/* Panels transpose needs at most for a sub-block of `chunks` chunks. */
static int64_t F(block_panels)(int64_t chunks, int64_t c, int64_t width) { return (chunks * c - c + width) / LANES + 4; }

/* s[r * sw + col] = x_r . (padded row first + col of the panels t), for QB rows x_r (row r of x, d wide;
   rows past m repeat row 0) and window columns [from, to), widened to whole vectors of rows: s must have
   2 LANES columns to spare before column 0 and after column to. */
static void F(scores)(const T *x, int m, int64_t d, const T *t, int64_t panel0, int64_t first, int64_t from,
                      int64_t to, T *s, int64_t sw) {
    const T *xr[QB];
    for (int r = 0; r < QB; r++) xr[r] = x + (r < m ? r : 0) * d;
    for (int64_t b = (first + from) / LANES; b * LANES < first + to; b += 2) {
        const T *t0 = t + (b - panel0) * d * LANES, *t1 = t0 + d * LANES;
        V acc[QB][2];
        memset(acc, 0, sizeof acc);
        for (int64_t e = 0; e < d; e++) {
            V k0 = F(load)(t0 + e * LANES), k1 = F(load)(t1 + e * LANES);
            for (int r = 0; r < QB; r++) {
                T xe = xr[r][e];
                acc[r][0] += k0 * xe;
                acc[r][1] += k1 * xe;
            }
        }
        for (int r = 0; r < m; r++) {
            F(store)(s + r * sw + b * LANES - first, acc[r][0]);
            F(store)(s + r * sw + b * LANES - first + LANES, acc[r][1]);
        }
    }
}

/* y0 = scale0 * sum over columns [from, to) of w0[col] * (row first + col of x, d wide), and y1 alike
   with w1 (unless y1 is NULL): two queries share each row's loads, 8 independent sums. */
static void F(weighted_rows)(T *y0, T *y1, const T *w0, const T *w1, const T *x, int64_t d, int64_t first,
                             int64_t from, int64_t to, T scale0, T scale1, const int64_t own[4]) {
    int64_t e = 0;
    for (; e + 4 * LANES <= d; e += 4 * LANES) {
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        for (int64_t col = from; col < to; col++) {
            const T *r = x + (first + col) * d + e;
            V r0 = F(load)(r), r1 = F(load)(r + LANES), r2 = F(load)(r + 2 * LANES), r3 = F(load)(r + 3 * LANES);
            T u = w0[col], v = w1[col];
            a0 += r0 * u;
            a1 += r1 * u;
            a2 += r2 * u;
            a3 += r3 * u;
            b0 += r0 * v;
            b1 += r1 * v;
            b2 += r2 * v;
            b3 += r3 * v;
        }
        F(store)(y0 + e, a0 * scale0);
        F(store)(y0 + e + LANES, a1 * scale0);
        F(store)(y0 + e + 2 * LANES, a2 * scale0);
        F(store)(y0 + e + 3 * LANES, a3 * scale0);
        if (y1) {
            F(store)(y1 + e, b0 * scale1);
            F(store)(y1 + e + LANES, b1 * scale1);
            F(store)(y1 + e + 2 * LANES, b2 * scale1);
            F(store)(y1 + e + 3 * LANES, b3 * scale1);
        }
    }
    /* The last d % (4 LANES) elements: each row summed over its own columns, [own[0], own[1]) and [own[2],
       own[3]). Summed over both rows' columns (the partner's weighted zero), a row's result changed in its
       last bits (measured in float32), so it depended on its partner: on where later tokens put it. */
    for (; e < d; e++) {
        T u = 0, v = 0;
        for (int64_t col = own[0]; col < own[1]; col++) u += w0[col] * x[(first + col) * d + e];
        y0[e] = u * scale0;
        if (!y1) continue;
        for (int64_t col = own[2]; col < own[3]; col++) v += w1[col] * x[(first + col) * d + e];
        y1[e] = v * scale1;
    }
}

/* tile[col] += sum_{r < m} w[r * sw + col] x_r for columns [from, to) of a (columns, d) tile; x_r = row
   r of x (d wide). Each tile row is read and written once per group of queries; four vectors of it at a
   time, so that four sums over the queries run side by side (with two, the loop waits on the adds'
   latency). */
static void F(spread)(T *tile, const T *w, int64_t sw, const T *x, int m, int64_t d, int64_t from, int64_t to) {
    for (int64_t col = from; col < to; col++) {
        T *out = tile + col * d, weight[QB];
        for (int r = 0; r < m; r++) weight[r] = w[r * sw + col];
        int64_t e = 0;
        for (; e + 4 * LANES <= d; e += 4 * LANES) {
            V a0 = F(load)(out + e), a1 = F(load)(out + e + LANES), a2 = F(load)(out + e + 2 * LANES),
              a3 = F(load)(out + e + 3 * LANES);
            for (int r = 0; r < m; r++) {
                const T *xr = x + r * d + e;
                a0 += F(load)(xr) * weight[r];
                a1 += F(load)(xr + LANES) * weight[r];
                a2 += F(load)(xr + 2 * LANES) * weight[r];
                a3 += F(load)(xr + 3 * LANES) * weight[r];
            }
            F(store)(out + e, a0);
            F(store)(out + e + LANES, a1);
            F(store)(out + e + 2 * LANES, a2);
            F(store)(out + e + 3 * LANES, a3);
        }
        for (; e + LANES <= d; e += LANES) {
            V a0 = F(load)(out + e);
            for (int r = 0; r < m; r++) a0 += F(load)(x + r * d + e) * weight[r];
            F(store)(out + e, a0);
        }
        for (; e < d; e++)
            for (int r = 0; r < m; r++) out[e] += weight[r] * x[r * d + e];
    }
}

/* The columns the queries i0 ... i0 + m - 1 see, [*from, *to); false when none. */
static inline int F(group_columns)(const Args *a, int64_t i0, int m, int64_t *from, int64_t *to) {
    *from = a->width;
    *to = 0;
    for (int64_t i = i0; i < i0 + m; i++) {
        if (a->hi[i] <= a->lo[i]) continue;
        if (a->lo[i] < *from) *from = a->lo[i];
        if (a->hi[i] > *to) *to = a->hi[i];
    }
    return *to > *from;
}

/* Row r of s over [from, to): exp(s - shift) on query i's span, 0 elsewhere (and at its skipped column);
   shift NAN means the span's maximum. Returns the sum; *used gets the shift. */
static inline T F(probabilities)(const Args *a, int64_t i, T *s, int64_t from, int64_t to, T shift, T *used) {
    int64_t lo = a->lo[i], hi = a->hi[i], skip = a->skip[i];
    if (skip >= lo && skip < hi) s[skip] = -INFINITY;
    if (isnan(shift)) {
        T best = -INFINITY;
        _Pragma("omp simd reduction(max:best)") for (int64_t col = lo; col < hi; col++) best = s[col] > best ? s[col] : best;
        shift = best;
    }
    *used = shift;
    for (int64_t col = from; col < lo; col++) s[col] = 0;
    _Pragma("omp simd") for (int64_t col = lo; col < hi; col++) s[col] = EXP(s[col] - shift);
    for (int64_t col = hi; col < to; col++) s[col] = 0;
    T total = 0;
    _Pragma("omp simd reduction(+:total)") for (int64_t col = lo; col < hi; col++) total += s[col];
    return total;
}

/* Adds query i's round (output y, logsumexp lse) to its position's online softmax over rounds: the round's
   score is lse, or -inf where the query saw only itself; acc, norm and best are rescaled to the new best
   score. Each position is one item per round, so parts never write the same row. */
static inline void F(combine)(const Args *a, int64_t i, const T *y, T lse) {
    int64_t u = a->order[i];
    T score = a->has_other[i] ? lse : -INFINITY, old = a->best[u], top = score > old ? score : old;
    T rescale = 1, weight = 0;
    if (top > -INFINITY) {
        rescale = EXP(old - top);
        weight = EXP(score - top);
    }
    T *acc = a->acc + u * a->dv, norm = a->norm[u] * rescale + weight;
    a->scores[u] = score;
    if (a->final_out) {   /* the last round: the result (rounds._finish_rounds), not the accumulator */
        T *out = a->final_out + a->out_index[u];
        if (norm > 0) {
            _Pragma("omp simd") for (int64_t e = 0; e < a->dv; e++) out[e] = (acc[e] * rescale + weight * y[e]) / norm;
        } else {   /* no round saw another key: the query's own value, exactly (its staged row) */
            memcpy(out, a->vp + (i + a->pad - a->k0) * a->dv, sizeof(T) * (size_t)a->dv);
        }
        a->total[u] = top + LOG(norm);
        a->any_other[u] = norm > 0;
        return;
    }
    _Pragma("omp simd") for (int64_t e = 0; e < a->dv; e++) acc[e] = acc[e] * rescale + weight * y[e];
    a->norm[u] = norm;
    a->best[u] = top;
}

/* Prefetches what combine will touch for queries [i0, i1). */
static inline void F(prefetch_combine)(const Args *a, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
        int64_t u = a->order[i];
        const char *acc = (const char *)(a->acc + u * a->dv);
        for (int64_t b = 0; b < a->dv * (int64_t)sizeof(T); b += 64) __builtin_prefetch(acc + b, 1);
        __builtin_prefetch(a->best + u, 1);
        __builtin_prefetch(a->norm + u, 1);
        __builtin_prefetch(a->scores + u, 1);
        if (a->final_out) {
            const char *out = (const char *)(a->final_out + a->out_index[u]);
            for (int64_t b = 0; b < a->dv * (int64_t)sizeof(T); b += 64) __builtin_prefetch(out + b, 1);
        }
    }
}

/* Scratch rows forward_chunks needs: QB rows of scores (2 LANES spare on either side) and two outputs. */
static int64_t F(forward_scratch)(int64_t width, int64_t dv) { return QB * (width + 4 * LANES) + 2 * dv; }

/* Chunks [begin, end): out[i] = softmax over the span of q_i . k, times v, and lse_out[i] (or both
   combined into position order). */
static void F(forward_chunks)(const Args *a, T *scratch, int64_t begin, int64_t end) {
    int64_t c = a->c, d = a->d, dv = a->dv, sw = a->width + 4 * LANES;
    T *s = scratch + 2 * LANES, *y = scratch + QB * sw;
    for (int64_t g = begin; g < end; g++) {
        int64_t first = g * c;
        for (int64_t i0 = g * c; i0 < (g + 1) * c; i0 += QB) {
            int m = (g + 1) * c - i0 < QB ? (int)((g + 1) * c - i0) : QB;
            int64_t from, to;
            if (a->order) F(prefetch_combine)(a, i0 + QB, i0 + QB + m < end * c ? i0 + QB + m : end * c);
            if (!F(group_columns)(a, i0, m, &from, &to)) continue;
            F(scores)(a->q + (i0 - a->q0) * d, m, d, a->kt, a->panel0, first, from, to, s, sw);
            T total[QB], lse[QB];
            for (int r = 0; r < m; r++) {
                T best;
                total[r] = F(probabilities)(a, i0 + r, s + r * sw, from, to, NAN, &best);
                lse[r] = best + LOG(total[r]);
                if (a->lse_out) a->lse_out[i0 + r] = lse[r];
            }
            for (int r = 0; r < m; r += 2) {   /* two queries at a time, over both their spans */
                int64_t i = i0 + r, two = r + 1 < m;
                int64_t lo = a->lo[i], hi = a->hi[i];
                if (two && a->lo[i + 1] < lo) lo = a->lo[i + 1];
                if (two && a->hi[i + 1] > hi) hi = a->hi[i + 1];
                T *y0 = a->order ? y : a->out + i * dv, *y1 = !two ? NULL : a->order ? y + dv : a->out + (i + 1) * dv;
                const int64_t own[4] = {a->lo[i], a->hi[i], two ? a->lo[i + 1] : 0, two ? a->hi[i + 1] : 0};
                F(weighted_rows)(y0, y1, s + r * sw, s + (r + two) * sw, a->vp, dv, first - a->k0, lo, hi,
                                 1 / total[r], two ? 1 / total[r + 1] : 0, own);
                if (a->order) {
                    F(combine)(a, i, y0, lse[r]);
                    if (two) F(combine)(a, i + 1, y1, lse[r + 1]);
                }
            }
        }
    }
}

/* A part's tiles and scratch rows for backward_chunks. */
typedef struct {
    T *s, *dp, *tile_k, *tile_v, *tail_k, *tail_v;
    int64_t mine;   /* rows the part writes directly: up to here, the rest to its tail */
} F(Work);

/* Chunks [begin, end): dq_i = sum_j ds_ij k_j; dk_j = sum_i ds_ij q_i and dv_j = sum_i p_ij g_i are gathered
   per chunk in a window tile (zero on entry and exit), then added to the padded rows. Rows from w->mine
   on belong to the next part (its first chunks write them): this part's share goes to its tail, which
   interval_backward adds once every row is written. */
static void F(backward_chunks)(const Args *a, const F(Work) *w, int64_t begin, int64_t end) {
    int64_t c = a->c, d = a->d, dv = a->dv, width = a->width, sw = width + 4 * LANES, mine = w->mine;
    T *s = w->s, *dp = w->dp, *tile_k = w->tile_k, *tile_v = w->tile_v, *tail_k = w->tail_k, *tail_v = w->tail_v;
    for (int64_t g = begin; g < end; g++) {
        int64_t first = g * c, used_from = width, used_to = 0;
        for (int64_t i0 = g * c; i0 < (g + 1) * c; i0 += QB) {
            int m = (g + 1) * c - i0 < QB ? (int)((g + 1) * c - i0) : QB;
            int64_t from, to;
            if (!F(group_columns)(a, i0, m, &from, &to)) continue;
            used_from = from < used_from ? from : used_from;
            used_to = to > used_to ? to : used_to;
            const T *q = a->q + (i0 - a->q0) * d, *g_rows = a->g + (i0 - a->g0) * dv;
            F(scores)(q, m, d, a->kt, a->panel0, first, from, to, s, sw);
            F(scores)(g_rows, m, dv, a->vt, a->panel0, first, from, to, dp, sw);
            for (int r = 0; r < m; r++) {
                int64_t i = i0 + r;
                T *pr = s + r * sw, *dr = dp + r * sw, row = a->row[i], shift;
                F(probabilities)(a, i, pr, from, to, a->lse[i], &shift);
                _Pragma("omp simd") for (int64_t col = from; col < to; col++) dr[col] = pr[col] * (dr[col] - row);
            }
            for (int r = 0; r < m; r += 2) {
                int64_t i = i0 + r, two = r + 1 < m;
                const int64_t own[4] = {from, to, from, to};
                F(weighted_rows)(a->dq + i * d, two ? a->dq + (i + 1) * d : NULL, dp + r * sw, dp + (r + two) * sw,
                                 a->kp, d, first - a->k0, from, to, 1, 1, own);
            }
            F(spread)(tile_k, dp, sw, q, m, d, from, to);
            F(spread)(tile_v, s, sw, g_rows, m, dv, from, to);
        }
        for (int64_t col = used_from; col < used_to; col++) {
            int64_t row = first + col;
            T *dk = row < mine ? a->dkp + row * d : tail_k + (row - mine) * d;
            T *dvr = row < mine ? a->dvp + row * dv : tail_v + (row - mine) * dv;
            _Pragma("omp simd") for (int64_t e = 0; e < d; e++) dk[e] += tile_k[col * d + e];
            _Pragma("omp simd") for (int64_t e = 0; e < dv; e++) dvr[e] += tile_v[col * dv + e];
        }
        if (used_to > used_from) {
            memset(tile_k + used_from * d, 0, sizeof(T) * (size_t)((used_to - used_from) * d));
            memset(tile_v + used_from * dv, 0, sizeof(T) * (size_t)((used_to - used_from) * dv));
        }
    }
}

/* Chunks per sub-block: BLOCK_ROWS_PER_THREAD rows of queries, at least one chunk. */
static int64_t F(sub_block_chunks)(int64_t c) { return BLOCK_ROWS_PER_THREAD / c > 1 ? BLOCK_ROWS_PER_THREAD / c : 1; }

/* Rows a sub-block's stage holds: its padded key rows. */
static int64_t F(block_rows)(int64_t chunks, int64_t c, int64_t width) { return chunks * c - c + width; }

/* Parts a kernel call cuts its chunks in: PART_SUB_BLOCKS sub-blocks each (a thread starts each part by
   gathering the window rows it shares with the part before). */
static int F(kernel_parts)(int64_t chunks, int64_t per, int threads) {
    return parts_of(chunks, PART_SUB_BLOCKS * per, threads);
}

/* What every part of a kernel call shares: the call's rows and outputs, and where the rows come from
   (NULL: as they lie, no stage). */
typedef struct {
    const Args *a;
    const Sources *from;
    int64_t per;   /* chunks per sub-block */
} F(Job);

/* Sub-block [g0, g1) of the part that starts at chunk `begin`: its rows gathered into the stage (`staged`
   rows each of q, k and v, then its queries' d_out where `with_d_out`), or read as they lie, and its keys
   transposed into kt. Returns the rows a transpose reads. */
static int64_t F(sub_block)(const F(Job) *job, Args *a, int64_t begin, int64_t g0, int64_t g1, T *stage,
                            int64_t staged, int with_d_out, T *kt) {
    int64_t c = a->c, d = a->d, width = a->width;
    if (job->from)
        F(stage)(job->from, a, g0, g1, job->per, g0 > begin, stage, stage + staged * d, stage + 2 * staged * d,
                 with_d_out ? stage + staged * (2 * d + a->dv) : NULL);
    int64_t rows = job->from ? F(block_rows)(g1 - g0, c, width) : a->n + width - c;
    a->panel0 = F(transpose)(a->kp, a->k0, rows, d, a, g0, g1, kt);
    return rows;
}

/* One part of forward: its chunks [begin, end), a sub-block at a time (gathered, transposed, attended)
   in buffers of its own, so that the parts never wait for each other until the call ends. */
static void F(forward_part)(const void *p, int part, int64_t begin, int64_t end) {
    const F(Job) *job = (const F(Job) *)p;
    Args a = *job->a;
    int64_t c = a.c, d = a.d, dv = a.dv, width = a.width, per = job->per;
    int64_t staged = job->from ? F(block_rows)(per, c, width) : 0;
    T *kt = (T *)malloc(sizeof(T) * (size_t)(F(block_panels)(per, c, width) * d * LANES));
    T *stage = (T *)malloc(sizeof(T) * (size_t)(staged * (2 * d + dv) + 1));
    T *scratch = (T *)malloc(sizeof(T) * (size_t)F(forward_scratch)(width, dv));
    (void)part;
    a.kt = kt;
    for (int64_t g0 = begin; g0 < end; g0 += per) {
        int64_t g1 = g0 + per < end ? g0 + per : end;
        F(sub_block)(job, &a, begin, g0, g1, stage, staged, 0, kt);
        F(forward_chunks)(&a, scratch, g0, g1);
    }
    free(kt);
    free(stage);
    free(scratch);
}

/* Forward (ForwardCall): each part of the chunks a sub-block at a time. */
void F(interval_forward)(const ForwardCall *call) {
    const T *q = call->q, *v = call->v;
    Sources from = {q, v, NULL, call->k_scale, NULL, call->q_index, call->v_index, NULL};
    Args a = {call->n, call->d, call->dv, call->chunk, call->width, call->pad, q, call->k, v, NULL, 0, 0, 0,
              NULL, NULL, call->lo, call->hi, call->skip, NULL, NULL, 0, call->out, call->lse, call->order,
              call->has_other, call->acc, call->best, call->norm, call->scores, NULL, NULL, NULL, NULL,
              call->final_out, call->total, call->out_index, call->any_other};
    int64_t chunks = call->n / call->chunk;
    F(Job) job = {&a, call->q_index ? &from : NULL, F(sub_block_chunks)(call->chunk)};
    parallel_parts(F(forward_part), &job, 0, chunks, F(kernel_parts)(chunks, job.per, call->threads), call->threads);
}

/* Adds each part's tail (rows past its chunks) to the gradients, in part order. */
static void F(add_tails)(const T *tails, int64_t chunks, int parts, int64_t c, int64_t tail_rows, int64_t d,
                         int64_t dv, T *dkp, T *dvp) {
    for (int t = 0; t < parts; t++) {
        int64_t start = part_begin(0, chunks, parts, t + 1) * c;
        const T *tail_k = tails + (size_t)t * (size_t)(tail_rows * (d + dv)), *tail_v = tail_k + tail_rows * d;
        for (int64_t x = 0; x < tail_rows * d; x++) dkp[start * d + x] += tail_k[x];
        for (int64_t x = 0; x < tail_rows * dv; x++) dvp[start * dv + x] += tail_v[x];
    }
}

/* One part of backward: its chunks [begin, end), a sub-block at a time, in buffers of its own. */
static void F(backward_part)(const void *p, int part, int64_t begin, int64_t end) {
    const F(Job) *job = (const F(Job) *)p;
    Args a = *job->a;
    int64_t c = a.c, d = a.d, dv = a.dv, width = a.width, per = job->per, sw = width + 4 * LANES;
    int64_t staged = job->from ? F(block_rows)(per, c, width) : 0, panels = F(block_panels)(per, c, width);
    T *kt = (T *)malloc(sizeof(T) * (size_t)(panels * d * LANES));
    T *vt = (T *)malloc(sizeof(T) * (size_t)(panels * dv * LANES));
    T *stage = (T *)malloc(sizeof(T) * (size_t)(staged * (2 * d + dv) + (job->from ? per * c * dv : 0) + 1));
    T *scratch = (T *)malloc(sizeof(T) * (size_t)(2 * QB * sw));
    F(Work) w = {scratch + 2 * LANES, scratch + 2 * LANES + QB * sw, (T *)calloc((size_t)(sw * d), sizeof(T)),
                 (T *)calloc((size_t)(sw * dv), sizeof(T)), a.tails + (size_t)part * (size_t)((width - c) * (d + dv)),
                 NULL, end * c};
    w.tail_v = w.tail_k + (width - c) * d;
    memset(w.tail_k, 0, sizeof(T) * (size_t)((width - c) * (d + dv)));
    a.kt = kt;
    a.vt = vt;
    int64_t zeroed = begin * c;   /* the part's own rows are zero up to here */
    for (int64_t g0 = begin; g0 < end; g0 += per) {
        int64_t g1 = g0 + per < end ? g0 + per : end;
        int64_t rows = F(sub_block)(job, &a, begin, g0, g1, stage, staged, 1, kt);
        F(transpose)(a.vp, a.k0, rows, dv, &a, g0, g1, vt);
        /* the rows these chunks write first, zeroed while the writes to come can find them in cache */
        int64_t reach = g1 * c - c + width < w.mine ? g1 * c - c + width : w.mine;
        if (reach > zeroed) {
            memset(a.dkp + zeroed * d, 0, sizeof(T) * (size_t)((reach - zeroed) * d));
            memset(a.dvp + zeroed * dv, 0, sizeof(T) * (size_t)((reach - zeroed) * dv));
            zeroed = reach;
        }
        F(backward_chunks)(&a, &w, g0, g1);
    }
    free(kt);
    free(vt);
    free(stage);
    free(scratch);
    free(w.tile_k);
    free(w.tile_v);
}

/* Backward (BackwardCall). The chunks are cut in parts that run in parallel. A part writes the gradient rows
   of its own chunks (zeroing them just before its first write) and puts its share of the rows past them in
   its tail; the tails are added, in part order, once every part is done. */
void F(interval_backward)(const BackwardCall *call) {
    int64_t n = call->n, d = call->d, dv = call->dv, c = call->chunk, width = call->width;
    int64_t tail_rows = width - c, chunks = n / c, per = F(sub_block_chunks)(c);
    int parts = F(kernel_parts)(chunks, per, call->threads);
    T *tails = (T *)malloc(sizeof(T) * (size_t)(parts * tail_rows * (d + dv) + 1));
    T *dkp = call->dkp, *dvp = call->dvp;
    const T *q = call->q, *v = call->v, *g = call->g;
    Sources from = {q, v, g, call->k_scale, call->g_scale, call->q_index, call->v_index, call->g_index};
    Args a = {n, d, dv, c, width, call->pad, q, call->k, v, g, 0, 0, 0, call->lse, call->row, call->lo, call->hi,
              call->skip, NULL, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, call->dq, dkp, dvp, tails,
              NULL, NULL, NULL, NULL};
    memset(dkp + n * d, 0, sizeof(T) * (size_t)(tail_rows * d));   /* the rows after the last chunk */
    memset(dvp + n * dv, 0, sizeof(T) * (size_t)(tail_rows * dv));
    F(Job) job = {&a, call->q_index ? &from : NULL, per};
    parallel_parts(F(backward_part), &job, 0, chunks, parts, call->threads);
    F(add_tails)(tails, chunks, parts, c, tail_rows, d, dv, dkp, dvp);
    free(tails);
}

typedef struct {
    int64_t n, d, dv, pad;
    const T *q, *k_scale, *dq, *dkp, *dvp;
    const int64_t *q_index, *order, *dq_index, *dv_index;
    T *d_qk, *d_v, *d_scale;
} F(Scatter);

static void F(scatter_range)(const void *p, int part, int64_t begin, int64_t end) {
    const F(Scatter) *a = (const F(Scatter) *)p;
    int64_t d = a->d, dv = a->dv;
    (void)part;
    for (int64_t i = begin; i < end; i++) {
        int64_t ahead = i + PREFETCH_AHEAD;
        F(prefetch_row)(a->q, a->q_index, ahead, a->n, d * (int64_t)sizeof(T));
        F(prefetch_row)(a->d_qk, a->dq_index, ahead, a->n, d * (int64_t)sizeof(T));
        F(prefetch_row)(a->d_v, a->dv_index, ahead, a->n, dv * (int64_t)sizeof(T));
        const T *dk = a->dkp + (i + a->pad) * d, *dq = a->dq + i * d, *q = a->q + a->q_index[i];
        const T *dvi = a->dvp + (i + a->pad) * dv;
        T *d_qk = a->d_qk + a->dq_index[i], *d_v = a->d_v + a->dv_index[i], scale = a->k_scale[i], dot = 0;
        _Pragma("omp simd reduction(+:dot)") for (int64_t e = 0; e < d; e++) dot += dk[e] * q[e];
        _Pragma("omp simd") for (int64_t e = 0; e < d; e++) d_qk[e] += dq[e] + dk[e] * scale;
        _Pragma("omp simd") for (int64_t e = 0; e < dv; e++) d_v[e] += dvi[e];
        a->d_scale[a->order[i]] += dot;
    }
}

/* scatter_gradients (ScatterCall): each position is one item per round, so parts never write the same row. */
void F(scatter_gradients)(const ScatterCall *call) {
    F(Scatter) a = {call->n, call->d, call->dv, call->pad, call->q, call->k_scale, call->dq, call->dkp, call->dvp,
                    call->q_index, call->order, call->dq_index, call->dv_index, call->d_qk, call->d_v, call->d_scale};
    parallel_parts(F(scatter_range), &a, 0, call->n, parts_of(call->n, SCATTER_GRAIN, call->threads), call->threads);
}

typedef struct {
    const T *x;
    int64_t *out;
    const int64_t *sizes, *strides, *out_strides, *factors;
    int64_t n_factors;
} F(Hash);

/* The bucket of one row of rotated values x: per factor f, the argmax over [x_f, -x_f] of its
   factors[f] / 2 columns (the first to reach the maximum), combined as id_0 + factors[0] (id_1 + ...). */
static inline int64_t F(bucket_of)(const T *x, const int64_t *factors, int64_t n_factors) {
    int64_t id = 0, scale = 1;
    for (int64_t f = 0; f < n_factors; f++) {
        int64_t half = factors[f] / 2, at = half;
        T top = x[0], bottom = x[0];
        _Pragma("omp simd reduction(max:top) reduction(min:bottom)") for (int64_t j = 1; j < half; j++) {
            top = x[j] > top ? x[j] : top;
            bottom = x[j] < bottom ? x[j] : bottom;
        }
        int negative = !(top >= -bottom);
        T want = negative ? bottom : top;
        /* a vector search for the first column that reaches it, no branch per column */
        _Pragma("omp simd reduction(min:at)") for (int64_t j = 0; j < half; j++) at = x[j] == want && j < at ? j : at;
        id += scale * (at + (negative ? half : 0));
        scale *= factors[f];
        x += half;
    }
    return id;
}

/* Items [begin, end) of the first three dimensions, each with every index of the last. */
static void F(hash_range)(const void *p, int part, int64_t begin, int64_t end) {
    const F(Hash) *a = (const F(Hash) *)p;
    (void)part;
    for (int64_t item = begin; item < end; item++) {
        int64_t rest = item, at = 0, out_at = 0;
        for (int dim = 2; dim >= 0; dim--) {
            int64_t i = rest % a->sizes[dim];
            rest /= a->sizes[dim];
            at += i * a->strides[dim];
            out_at += i * a->out_strides[dim];
        }
        for (int64_t last = 0; last < a->sizes[3]; last++)
            a->out[out_at + last * a->out_strides[3]] = F(bucket_of)(a->x + at + last * a->strides[3], a->factors,
                                                                      a->n_factors);
    }
}

/* hash_buckets (HashCall): one pass over the rotated values instead of a max and a min per factor. */
void F(hash_buckets)(const HashCall *call) {
    F(Hash) a = {call->x, call->out, call->sizes, call->strides, call->out_strides, call->factors, call->n_factors};
    parallel_for(F(hash_range), &a, 0, call->sizes[0] * call->sizes[1] * call->sizes[2], call->threads);
}

#undef F
#undef V
#undef Args
#undef Sources
#endif
