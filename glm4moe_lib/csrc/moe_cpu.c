/* The routed experts of one MoE layer call, float32 on a CPU, in one pass over the weights.
 *
 * What glm4moe_lib.cpu_kernel builds (with the machine's C compiler, on first use) and calls
 * through ctypes. The same math as glm4moe_lib.dispatch.sorted_dispatch:
 *
 *     y[t*K + k] = down_e @ (silu(gate_e @ x[t]) * (up_e @ x[t]))   with e = ids[t, k]
 *     out[t]     = sum_k w[t, k] * y[t*K + k]
 *
 * Why it is fast for a few tokens: a token needs K experts' weights, each read from memory once
 * (the limit), and at small T the BLAS spends more time per tiny GEMM than reading them takes.
 * Here each expert's rows are read once, in address order (the hardware prefetcher follows; the
 * next expert is prefetched in software only behind a compute-bound one: see read_ahead), while up
 * to RB of its tokens are multiplied with them: one load of weights feeds RB fused multiply-adds.
 * Plain C with GCC/Clang vector types: 16 floats per vector compile to one AVX-512 register,
 * two AVX2 or four NEON registers, whichever -march=native has.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h> /* built with -fopenmp only where torch runs GNU OpenMP: the parallel calls below use its threads */
#endif
#if defined(__SSE2__)
#include <immintrin.h> /* only for zero_stream's streaming stores; everything else is plain C */
#endif

typedef float vec __attribute__((vector_size(64)));                /* 16 floats */
typedef float vec_u __attribute__((vector_size(64), aligned(4)));  /* the same, at any float address */
#define VL 16    /* floats per vec */
/* token rows that share one pass over an expert's weights: 8 where the CPU has 32 vector registers
 * (AVX-512: 8 accumulators and their operands fit), else 4 (measured: RB=8 is 5-13% faster at
 * T=64 with AVX-512; with 16 registers it would spill) */
#ifndef RB
#if defined(__AVX512F__)
#define RB 8
#else
#define RB 4
#endif
#endif
#define RB_MAX 8 /* cpu_kernel.py sizes the scratch for this many */
/* passes of up to RB_QUAD tokens read four weight streams at once (rows_dot_quad): 4·RB_QUAD accumulators,
 * 2 where there are 32 vector registers, else 1 */
#ifndef RB_QUAD
#if RB > 4
#define RB_QUAD 2
#else
#define RB_QUAD 1
#endif
#endif
_Static_assert(RB_QUAD >= 1 && RB_QUAD <= 4, "rows_dot_quad_n takes 1 to 4 tokens");
/* Pairs per block in the backward: an expert with up to RBB of them takes them all in one pass over its
 * weights; one with more, blocks of RBB_MANY (whose weights and gradients then come from the cache).
 * Measured (1 thread, in-process A/B, bench layer): one block of up to 8 instead of blocks of 4 makes the
 * backward 20-24% faster at T=64-128 (weights from memory), level at T=16; blocks of 4 for more tokens
 * are 5-10% faster than blocks of 8 (the small preset at T=64-1024, weights in cache; 4% at T=1024). */
#define RBB 8
#define RBB_MANY 4
_Static_assert(RBB <= RB_MAX, "cpu_kernel.py sizes the backward scratch for RB_MAX pairs");
_Static_assert(RB >= 1 && RB <= RB_MAX, "RB must be between 1 and RB_MAX");

static inline vec load(const float *p) { return *(const vec_u *)p; }

/* a * b + s for the last n % VL floats of a row, in one rounding where the CPU has a fused
 * multiply-add: written out, because whether the compiler fuses `s += a * b` differs from one
 * function to the next, and a token's sums must not depend on which one computed them */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
static inline float madd(float a, float b, float s) { return fmaf(a, b, s); }
#else
static inline float madd(float a, float b, float s) { return s + a * b; }
#endif

#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE16(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else /* older GCC */
typedef int32_t ivec __attribute__((vector_size(64)));
#define SHUFFLE16(v, ...) __builtin_shuffle(v, (ivec){__VA_ARGS__})
#endif

/* Tree sum of the 16 lanes, ((v0+v8)+(v1+v9)) + ((v2+v10)+(v3+v11)) + ..., in three vector shuffles and
 * adds. Written lane by lane, GCC stored the vector and added 16 scalars back (measured slower). */
static inline float hsum(vec v) {
    v += SHUFFLE16(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7); /* lane i: v[i] + v[i+8] */
    v += SHUFFLE16(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14); /* lane 2i: pairs of those */
    v += SHUFFLE16(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13); /* lanes 0 and 4: a and b */
    return v[0] + v[4];
}

#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else /* older GCC */
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (ivec){__VA_ARGS__})
#endif

/* Many hsums at once, in hsum's order (so bitwise the same sums) and in fewer shuffles: the first
 * level adds lanes i and i+8 of two vectors (a's eight partial sums in lanes 0-7, b's in 8-15); each
 * later level adds the even and the odd lanes of two vectors (hsum's neighbours, then distance 2, 4).
 * Measured: routed experts 5-10% faster at T=16-1024 than one hsum per token. */
static inline vec fold_halves(vec a, vec b) {
    return SHUFFLE2(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE2(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline vec fold_pairs(vec a, vec b) {
    return SHUFFLE2(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUFFLE2(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* s[i] = hsum(v[i]) for i < n <= RB_MAX (n is a constant after inlining) */
static inline __attribute__((always_inline)) void hsum_many(const vec *v, const int n, float *s) {
    vec l1[RB_MAX / 2], l2[RB_MAX / 4];
    const int n1 = (n + 1) / 2, n2 = (n1 + 1) / 2; /* vectors left after each level */
    for (int i = 0; i < n1; i++) l1[i] = fold_halves(v[2 * i], 2 * i + 1 < n ? v[2 * i + 1] : v[2 * i]);
    for (int i = 0; i < n2; i++) l2[i] = fold_pairs(l1[2 * i], 2 * i + 1 < n1 ? l1[2 * i + 1] : l1[2 * i]);
    const vec l3 = fold_pairs(l2[0], n2 > 1 ? l2[1] : l2[0]);
    const vec l4 = fold_pairs(l3, l3);
    for (int i = 0; i < n; i++) s[i] = l4[i];
}
_Static_assert(RB_MAX <= 8, "hsum_many folds at most 8 vectors");

/* e^x for 16 floats at once, within 1 ulp of the correctly rounded value (as glibc's expf) on
 * [-87.3, 88.3]: Cephes' expf, x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, 2^n from
 * the exponent bits. Below -87.3 it gives 2^-126 (not the denormals), above 88.4 infinity; NaN stays
 * NaN. The SwiGLU's sigmoid calls it: glibc's expf one element at a time measured 4 us of a one-token
 * layer call (1152 calls), this 0.5 us. (The router keeps expf: its scores choose the experts.) */
typedef int32_t ivec16 __attribute__((vector_size(64)));
static inline vec vselect(ivec16 mask, vec a, vec b) { return (vec)(((ivec16)a & mask) | ((ivec16)b & ~mask)); }
static inline vec vexp(vec x) {
    const vec hi = (vec){0} + 88.7228391f, lo = (vec){0} - 87.3365448f;
    x = vselect(x > hi, hi, x);
    x = vselect(x < lo, lo, x);
    const vec shifter = (vec){0} + 12582912.0f; /* 1.5 * 2^23: (t + shifter) - shifter rounds t to an integer */
    vec n = x * 1.44269504088896341f + shifter;
    n -= shifter;
    n = vselect(n == n, n, (vec){0}); /* NaN: any n (the polynomial is NaN), but a defined conversion */
    const vec r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const ivec16 e = __builtin_convertvector(n, ivec16) + 127; /* 2^n: 1..255 (255: infinity) */
    return p * (vec)(e << 23);
}

/* out[i] = g[i] / (1 + e^-g[i]) * u[i] for i < n (silu(g) * u; u NULL: times 1), or with times_g = 0
 * 1 / (1 + e^-g[i]) (the sigmoid of g). 16 at a time, the last n % 16 through a zero-padded vector: an
 * element's value does not depend on where in the row it lies. */
static void swish_n(const float *g, const float *u, float *out, int64_t n, int times_g) {
    for (int64_t i = 0; i < n; i += VL) {
        const int64_t m = n - i < VL ? n - i : VL;
        vec gv = (vec){0}, uv = (vec){0} + 1.0f;
        if (m == VL) {
            gv = load(g + i);
            if (u) uv = load(u + i);
        } else {
            memcpy(&gv, g + i, (size_t)m * sizeof(float));
            if (u) memcpy(&uv, u + i, (size_t)m * sizeof(float));
        }
        const vec v = (times_g ? gv : (vec){0} + 1.0f) / (1.0f + vexp(-gv)) * uv;
        if (m == VL)
            *(vec_u *)(out + i) = v;
        else
            memcpy(out + i, &v, (size_t)m * sizeof(float));
    }
}

/* Reading ahead: while an expert with many tokens is computed (compute-bound), a software prefetch
 * brings the next touched expert's weights into L2 (PREFETCH_LINES cache lines per weight row), so
 * its first pass does not wait on memory. With a few tokens per expert the loop is memory-bound,
 * the hardware prefetcher keeps up and extra requests only cost. Measured (1 thread, in-process
 * A/B, bitwise the same results): routed experts 16-30% faster at T=256 and 10-14% at T=1024 (more
 * when the machine's memory is busier), level at T <= 64. In the backward (more work per weight
 * read) it measured no faster, so the backward does not read ahead.
 * Nothing here hides a skewed routing's cold experts (memory-bound) behind its hot ones (compute-bound)
 * on one core: prefetching several experts ahead measured 1-22% slower, and running the two in one
 * loop overlapped nothing either (a microbenchmark: an 8-token pass over two rows in L2 together with
 * one-token rows streamed from memory, with or without a software prefetch 2-32 KB ahead, took as long
 * as the two loops one after the other with one cold row per pair of hot rows, 1.5-2x as long with two
 * or four). Huge pages for the weights (MADV_COLLAPSE) measured the layer 3-8% faster but a plain read of
 * the same weights 16% faster, so the library leaves the page size to the user. */
#define PREFETCH_LINES 8
#define PREFETCH_MIN_PAIRS 8
typedef struct {
    const char *at[2], *end[2]; /* two ranges: the next expert's gate_up and down */
} read_ahead;

static inline void read_ahead_step(read_ahead *ra) {
    for (int k = 0; k < PREFETCH_LINES; k++) { /* (read, locality 1: into L2, not L1, which the rows use) */
        if (ra->at[0] < ra->end[0]) {
            __builtin_prefetch(ra->at[0], 0, 1);
            ra->at[0] += 64;
        } else if (ra->at[1] < ra->end[1]) {
            __builtin_prefetch(ra->at[1], 0, 1);
            ra->at[1] += 64;
        } else
            return;
    }
}

/* Streaming ahead: with two or more tokens per pass, the multiply-adds per cache line of weights
 * are enough that the hardware prefetcher alone falls behind memory: each weight vector's load also
 * prefetches the line STREAM_AHEAD bytes further on (into L2; a prefetch past the end of the weights
 * is harmless: it never faults). Measured (1 thread, in-process A/B, T=64, about 4 tokens per
 * expert): routed experts 15-19% faster, 5% at T=256, level at T=1; one token per pass measured up
 * to 20% slower (the weights are then often in cache already: T=1). */
#define STREAM_AHEAD 32768
#define STREAM_MIN_TOKENS 2
static inline void stream_ahead(const float *p) { __builtin_prefetch((const char *)p + STREAM_AHEAD, 0, 1); }

/* What to read ahead while expert e is computed: the weights of expert `next` (the one that runs
 * after it on this thread; -1: none), if e has at least PREFETCH_MIN_PAIRS pairs (else nothing). */
static read_ahead read_ahead_of(const int64_t *offsets, int64_t e, int64_t next, const float *gate_up,
                                const float *down, int64_t H, int64_t I) {
    read_ahead ra = {{NULL, NULL}, {NULL, NULL}};
    if (next >= 0 && offsets[e + 1] - offsets[e] >= PREFETCH_MIN_PAIRS) {
        ra.at[0] = (const char *)(gate_up + next * 2 * I * H);
        ra.end[0] = ra.at[0] + 2 * I * H * sizeof(float);
        ra.at[1] = (const char *)(down + next * H * I);
        ra.end[1] = ra.at[1] + H * I * sizeof(float);
    }
    return ra;
}

/* rows_dot (below) for passes of 5 or more tokens: two neighbouring rows at a time (j and
 * j + 1; the last row of an odd m alone), each token vector loaded once for both: half the loads per
 * multiply-add, where many tokens per pass make the loop compute-bound. Each row is summed exactly as
 * rows_dot sums it: bitwise the same results. The empty asm keeps the two weight vectors in registers:
 * without it GCC 12 loaded each one again for every token, and two rows measured slower than one. The
 * same for each token vector: without it GCC folded its load into both multiply-adds (two loads, not
 * one); keeping it in a register measured 5-11% faster at T=64-256 (the whole forward, three runs).
 * Measured (1 thread, in-process A/B, the whole layer's forward, three runs): 3-4% faster at T=256,
 * 1-6% at T=1024, level at T=16-64; with 2-4 tokens per pass (weights from memory) up to 8% slower
 * at T=64, so those passes keep one row at a time (except down's short rows: down_rows_n). */
static inline __attribute__((always_inline)) void rows_dot2(const float *w, int64_t m, int64_t n,
                                                            const float *const *x, const int NR,
                                                            float *const *out, read_ahead *ra);
#if defined(__AVX512F__) /* one register: an empty asm that may have changed it (a no-op elsewhere) */
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define KEEP_IN_REGISTER(v) (void)(v)
#endif

/* out[r][j] = w[j, :] . x[r][:] for r < NR, j < m (w is [m, n], row-major): one pass over w,
 * each weight vector loaded once and multiplied into all NR tokens' sums; ra: NULL, or what to
 * prefetch a little of per row. One row at a time, in address order: with a few tokens per pass,
 * several rows at once (each token vector loaded once for all of them) measured up to 2x slower on
 * weights coming from memory, whose stream the hardware prefetcher then loses.
 * (The exceptions: passes of up to RB_QUAD tokens, rows_dot_quad below; of 5 or more, rows_dot2 above.) */
static inline __attribute__((always_inline)) void rows_dot(const float *w, int64_t m, int64_t n,
                                                           const float *const *x, const int NR,
                                                           float *const *out, read_ahead *ra) {
    const int64_t n1 = n - n % VL; /* whole vectors; the last n % VL floats one by one */
    for (int64_t j = 0; j < m; j++) {
        const float *wj = w + j * n;
        vec acc[RB];
        for (int r = 0; r < NR; r++) acc[r] = (vec){0};
        for (int64_t h = 0; h < n1; h += VL) {
            const vec wv = load(wj + h);
            if (NR >= STREAM_MIN_TOKENS) stream_ahead(wj + h);
            for (int r = 0; r < NR; r++) acc[r] += wv * load(x[r] + h);
        }
        if (ra) read_ahead_step(ra);
        float s[RB];
        hsum_many(acc, NR, s);
        for (int r = 0; r < NR; r++) {
            for (int64_t t = n1; t < n; t++) s[r] = madd(wj[t], x[r][t], s[r]);
            out[r][j] = s[r];
        }
    }
}

static inline __attribute__((always_inline)) void rows_dot2(const float *w, int64_t m, int64_t n,
                                                            const float *const *x, const int NR,
                                                            float *const *out, read_ahead *ra) {
    const int64_t n1 = n - n % VL, m2 = m - m % 2;
    for (int64_t j = 0; j < m2; j += 2) {
        const float *w0 = w + j * n, *w1 = w0 + n;
        vec acc0[RB], acc1[RB];
        for (int r = 0; r < NR; r++) acc0[r] = acc1[r] = (vec){0};
        for (int64_t h = 0; h < n1; h += VL) {
            vec wv0 = load(w0 + h), wv1 = load(w1 + h);
            KEEP_IN_REGISTER(wv0);
            KEEP_IN_REGISTER(wv1);
            stream_ahead(w0 + h);
            stream_ahead(w1 + h);
            for (int r = 0; r < NR; r++) {
                vec xv = load(x[r] + h);
                KEEP_IN_REGISTER(xv); /* else GCC folds it into both multiply-adds: two loads, not one */
                acc0[r] += wv0 * xv;
                acc1[r] += wv1 * xv;
            }
        }
        if (ra) {
            read_ahead_step(ra);
            read_ahead_step(ra);
        }
        float s0[RB], s1[RB];
        hsum_many(acc0, NR, s0);
        hsum_many(acc1, NR, s1);
        for (int r = 0; r < NR; r++) {
            for (int64_t t = n1; t < n; t++) {
                s0[r] = madd(w0[t], x[r][t], s0[r]);
                s1[r] = madd(w1[t], x[r][t], s1[r]);
            }
            out[r][j] = s0[r];
            out[r][j + 1] = s1[r];
        }
    }
    if (m2 < m) { /* the last row of an odd m */
        float *last[RB];
        for (int r = 0; r < NR; r++) last[r] = out[r] + m2;
        rows_dot(w + m2 * n, 1, n, x, NR, last, ra);
    }
}

static void rows_dot_n(const float *w, int64_t m, int64_t n, const float *const *x, int nr,
                       float *const *out, read_ahead *ra) {
    switch (nr) { /* a constant row count: the accumulators stay in registers */
    case 1: rows_dot(w, m, n, x, 1, out, ra); break;
    case 2: rows_dot(w, m, n, x, 2, out, ra); break;
    case 3: rows_dot(w, m, n, x, 3, out, ra); break;
#if RB > 4
    case 4: rows_dot(w, m, n, x, 4, out, ra); break;
    case 5: rows_dot2(w, m, n, x, 5, out, ra); break; /* 5 and more tokens: two rows at a time */
    case 6: rows_dot2(w, m, n, x, 6, out, ra); break;
    case 7: rows_dot2(w, m, n, x, 7, out, ra); break;
    default: rows_dot2(w, m, n, x, 8, out, ra); break;
#else
    default: rows_dot(w, m, n, x, 4, out, ra); break;
#endif
    }
}

/* The down projection [H, I] for passes of more than RB_QUAD tokens: rows_dot_n, but 3-4 tokens also take two rows
 * at a time (rows_dot2), where 32 vector registers hold their accumulators. Down's rows are short (I floats: 512
 * bytes here), so rows j and j + 1 lie in one stretch of memory that the hardware prefetcher follows as one stream;
 * the rows of gate and up (H floats) lie 2 KB apart: two streams. Measured (1 thread, in-process A/B, bitwise the
 * same results): the bench layer's forward 3% faster at T=48-64 (1-4% in four runs), level at T=16-32 and
 * 96-256; the small preset (weights in cache) 5-10% at T=12-16. One expert in L2: down at 3 and 4 tokens 5.8 and
 * 7.3 us instead of 8.0 and 9.2; gate and up two rows at a time measured 12-21% slower from memory (T=64), so they
 * keep one. */
static void down_rows_n(const float *w, int64_t m, int64_t n, const float *const *x, int nr, float *const *out,
                        read_ahead *ra) {
    switch (nr) {
#if RB > 4
    case 3: rows_dot2(w, m, n, x, 3, out, ra); break;
    case 4: rows_dot2(w, m, n, x, 4, out, ra); break;
#endif
    default: rows_dot_n(w, m, n, x, nr, out, ra); break;
    }
}

/* Four streams from memory at once, for passes of 1 to RB_QUAD tokens: rows j and j + m/2 of both wa and
 * wb (gate and up; the four quarters of down; the router's two halves), each token vector loaded once for
 * all four rows, each row summed exactly as rows_dot sums it: bitwise the same results (an odd m's last row
 * by rows_dot).
 * A token or two do too little work per weight for one stream's loads to keep memory busy. Measured
 * (1 thread, in-process A/B of the layer's forward, bench size): with one token about 2% faster than
 * two streams (seven runs: -5% to +7%; eight streams were 10% slower); with passes of two tokens too
 * (RB_QUAD 2), 4-10% faster at T=16 and level at T=64. Passes of 3-4 tokens this way measured level at
 * T=16 and 3-10% slower at T=64 (where rows_dot's stream_ahead pays), so they keep rows_dot (again level
 * at T=16-256 for 3 tokens, a later session). */
static inline __attribute__((always_inline)) void rows_dot_quad(const float *wa, const float *wb, int64_t m,
                                                                int64_t n, const float *const *x, const int NR,
                                                                float *const *out_a, float *const *out_b,
                                                                read_ahead *ra) {
    const int64_t n1 = n - n % VL, m2 = m / 2;
    for (int64_t j = 0; j < m2; j++) {
        const float *w[4] = {wa + j * n, wa + (j + m2) * n, wb + j * n, wb + (j + m2) * n};
        vec acc[4][RB_QUAD];
        for (int q = 0; q < 4; q++)
            for (int r = 0; r < NR; r++) acc[q][r] = (vec){0};
        for (int64_t h = 0; h < n1; h += VL) {
            vec w0 = load(w[0] + h), w1 = load(w[1] + h), w2 = load(w[2] + h), w3 = load(w[3] + h);
            if (NR > 1) { /* in registers, and each token vector loaded once for all four (see rows_dot2) */
                KEEP_IN_REGISTER(w0);
                KEEP_IN_REGISTER(w1);
                KEEP_IN_REGISTER(w2);
                KEEP_IN_REGISTER(w3);
            }
            for (int r = 0; r < NR; r++) {
                vec xv = load(x[r] + h);
                if (NR > 1) KEEP_IN_REGISTER(xv);
                acc[0][r] += w0 * xv;
                acc[1][r] += w1 * xv;
                acc[2][r] += w2 * xv;
                acc[3][r] += w3 * xv;
            }
        }
        if (ra)
            for (int q = 0; q < 4; q++) read_ahead_step(ra);
        float s[4][RB_QUAD];
        for (int q = 0; q < 4; q++) hsum_many(acc[q], NR, s[q]);
        for (int r = 0; r < NR; r++) {
            for (int64_t t = n1; t < n; t++)
                for (int q = 0; q < 4; q++) s[q][r] = madd(w[q][t], x[r][t], s[q][r]);
            out_a[r][j] = s[0][r];
            out_a[r][j + m2] = s[1][r];
            out_b[r][j] = s[2][r];
            out_b[r][j + m2] = s[3][r];
        }
    }
    if (m % 2) { /* the last row of an odd m, of each matrix */
        float *last_a[RB_QUAD], *last_b[RB_QUAD];
        for (int r = 0; r < NR; r++) {
            last_a[r] = out_a[r] + m - 1;
            last_b[r] = out_b[r] + m - 1;
        }
        rows_dot_n(wa + (m - 1) * n, 1, n, x, NR, last_a, ra);
        rows_dot_n(wb + (m - 1) * n, 1, n, x, NR, last_b, ra);
    }
}

/* rows_dot_quad for 1 <= nr <= RB_QUAD tokens (a constant count: the accumulators stay in registers) */
static void rows_dot_quad_n(const float *wa, const float *wb, int64_t m, int64_t n, const float *const *x, int nr,
                            float *const *out_a, float *const *out_b, read_ahead *ra) {
    switch (nr) {
#if RB_QUAD >= 2
    case 2: rows_dot_quad(wa, wb, m, n, x, 2, out_a, out_b, ra); break;
#endif
#if RB_QUAD >= 3
    case 3: rows_dot_quad(wa, wb, m, n, x, 3, out_a, out_b, ra); break;
#endif
#if RB_QUAD >= 4
    case 4: rows_dot_quad(wa, wb, m, n, x, 4, out_a, out_b, ra); break;
#endif
    default: rows_dot_quad(wa, wb, m, n, x, 1, out_a, out_b, ra); break;
    }
}

/* One matrix w [m, n] through rows_dot_quad as its two halves (rows j, j + m/4, j + m/2, j + 3m/4), for
 * 1 <= nr <= RB_QUAD tokens; an odd m's last row by rows_dot: the down projection and the router */
static void rows_dot_halves(const float *w, int64_t m, int64_t n, const float *const *x, int nr,
                            float *const *out, read_ahead *ra) {
    const int64_t half = m / 2;
    float *second[RB_QUAD] = {NULL};
    for (int r = 0; r < nr; r++) second[r] = out[r] + half;
    rows_dot_quad_n(w, w + half * n, half, n, x, nr, out, second, ra);
    if (m % 2) { /* the last row of an odd m */
        for (int r = 0; r < nr; r++) second[r] = out[r] + m - 1;
        rows_dot_n(w + (m - 1) * n, 1, n, x, nr, second, ra);
    }
}

/* Counting sort of the T*K pairs by expert: offsets [E+1] (block e is offsets[e]:offsets[e+1]),
 * order [T*K] (pair indices t*K+k, grouped by expert, in token order within an expert).
 * Returns -1 - p for the first pair p whose expert id is outside [0, E), else 0. */
int64_t moe_sort(const int64_t *ids, int64_t pairs, int64_t E, int64_t *offsets, int64_t *order) {
    memset(offsets, 0, (size_t)(E + 1) * sizeof *offsets);
    for (int64_t p = 0; p < pairs; p++) {
        if (ids[p] < 0 || ids[p] >= E) return -1 - p;
        offsets[ids[p] + 1]++;
    }
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    for (int64_t p = 0; p < pairs; p++) order[offsets[ids[p]]++] = p; /* offsets[e] -> end of block e */
    memmove(offsets + 1, offsets, (size_t)E * sizeof *offsets);
    offsets[0] = 0;
    return 0;
}

/* yr[r] = down @ (silu(gate @ xr[r]) * (up @ xr[r])) for r < nr: one SwiGLU expert on nr <= RB
 * tokens. gate, up [I, H] and down [H, I] row-major; g holds RB rows of [2I], a RB rows of [I]. */
static void swiglu_rows(const float *gate, const float *up, const float *down, int64_t H, int64_t I,
                        const float *const *xr, int nr, float *const *yr, float *const *g, float *const *a,
                        float *const *hr /* NULL, or where to keep each row's [gate, up] for the backward */,
                        read_ahead *ra) {
    float *u[RB];
    for (int r = 0; r < RB; r++) u[r] = g[r] + I; /* the up half of each [2I] row */
    if (nr <= RB_QUAD) /* a few tokens: two gate rows and two up rows read together */
        rows_dot_quad_n(gate, up, I, H, xr, nr, g, u, ra);
    else {
        rows_dot_n(gate, I, H, xr, nr, g, ra);
        rows_dot_n(up, I, H, xr, nr, u, ra);
    }
    if (hr)
        for (int r = 0; r < nr; r++) memcpy(hr[r], g[r], (size_t)(2 * I) * sizeof(float));
    for (int r = 0; r < nr; r++) swish_n(g[r], u[r], a[r], I, 1); /* silu(gate) * up */
    if (nr <= RB_QUAD) /* a few tokens: four rows of down (two in each half) read together */
        rows_dot_halves(down, H, I, (const float *const *)a, nr, yr, ra);
    else
        down_rows_n(down, H, I, (const float *const *)a, nr, yr, ra);
}

static void split_scratch(float *scratch, int64_t I, float **g, float **a) {
    for (int r = 0; r < RB; r++) {
        g[r] = scratch + r * 2 * I;          /* [2I]: gate then up */
        a[r] = scratch + RB * 2 * I + r * I; /* [I]: silu(gate) * up */
    }
}

/* moe_experts' work for one expert e (with at least one pair), reading ahead expert `next` (-1: none);
 * g and a: split_scratch's rows */
static void expert_forward(const float *x, const int64_t *order, const int64_t *offsets, int64_t e, int64_t next,
                           int64_t K, const float *gate_up, const float *down, int64_t H, int64_t I, float *y,
                           float *const *g, float *const *a, float *hsave) {
    const float *gu = gate_up + e * 2 * I * H, *dn = down + e * H * I;
    read_ahead ra = read_ahead_of(offsets, e, next, gate_up, down, H, I);
    for (int64_t p = offsets[e]; p < offsets[e + 1]; p += RB) {
        const int nr = (int)(offsets[e + 1] - p < RB ? offsets[e + 1] - p : RB);
        const float *xr[RB];
        float *yr[RB], *hr[RB];
        for (int r = 0; r < nr; r++) {
            xr[r] = x + (order[p + r] / K) * H;
            yr[r] = y + order[p + r] * H;
            hr[r] = hsave ? hsave + order[p + r] * 2 * I : NULL;
        }
        swiglu_rows(gu, gu + I * H, dn, H, I, xr, nr, yr, g, a, hsave ? hr : NULL, &ra);
    }
}

/* the next expert after e in [e, e1) with a pair, or -1 */
static int64_t next_touched(const int64_t *offsets, int64_t e, int64_t e1) {
    int64_t next = e + 1;
    while (next < e1 && offsets[next + 1] == offsets[next]) next++;
    return next < e1 ? next : -1;
}

/* y[p] = expert_e(x[p / K]) for every pair p of the experts e in [e0, e1).
 * gate_up [E, 2I, H] (gate rows first), down [E, H, I]; scratch holds RB * 3 * I floats;
 * hsave: NULL, or [T*K, 2I] to keep each pair's gate and up pre-activations for moe_experts_bwd. */
void moe_experts(const float *x, const int64_t *order, const int64_t *offsets, int64_t e0, int64_t e1,
                 int64_t K, const float *gate_up, const float *down, int64_t H, int64_t I, float *y,
                 float *scratch, float *hsave) {
    float *g[RB], *a[RB];
    split_scratch(scratch, I, g, a);
    for (int64_t e = e0; e < e1; e++)
        if (offsets[e + 1] > offsets[e])
            expert_forward(x, order, offsets, e, next_touched(offsets, e, e1), K, gate_up, down, H, I, y, g, a, hsave);
}

/* mlp_forward, keeping each token's gate and up pre-activations in hsave [T, 2I] if not NULL */
static void mlp_rows(const float *x, int64_t T, const float *gate, const float *up, const float *down, int64_t H,
                     int64_t I, float *y, float *scratch, float *hsave) {
    float *g[RB], *a[RB];
    split_scratch(scratch, I, g, a);
    for (int64_t t = 0; t < T; t += RB) {
        const int nr = (int)(T - t < RB ? T - t : RB);
        const float *xr[RB];
        float *yr[RB], *hr[RB];
        for (int r = 0; r < nr; r++) {
            xr[r] = x + (t + r) * H;
            yr[r] = y + (t + r) * H;
            hr[r] = hsave ? hsave + (t + r) * 2 * I : NULL;
        }
        swiglu_rows(gate, up, down, H, I, xr, nr, yr, g, a, hsave ? hr : NULL, NULL);
    }
}

/* y[t] = down @ (silu(gate @ x[t]) * (up @ x[t])) for t < T: a SwiGLU MLP (the shared expert)
 * with gate, up [I, H] and down [H, I]; scratch holds RB * 3 * I floats. */
void mlp_forward(const float *x, int64_t T, const float *gate, const float *up, const float *down,
                 int64_t H, int64_t I, float *y, float *scratch) {
    mlp_rows(x, T, gate, up, down, H, I, y, scratch, NULL);
}

/* out[t] = sum_k w[t, k] * y[t*K + k] for the T tokens, summed in slot order, then + add[t]
 * (add: NULL, or [T, H], e.g. the shared expert's output) */
void moe_combine(const float *y, const float *w, int64_t T, int64_t K, int64_t H, const float *add, float *out) {
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * H;
        for (int64_t h = 0; h < H; h++) o[h] = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            const float wk = w[t * K + k];
            const float *yk = y + (t * K + k) * H;
            for (int64_t h = 0; h < H; h++) o[h] += wk * yk[h];
        }
        if (add)
            for (int64_t h = 0; h < H; h++) o[h] += add[t * H + h];
    }
}

/* ---- the router (inference) ------------------------------------------------------------------ */

/* Insert (v, i) into the n best so far, kept in descending order in bv/bi (capacity cap):
 * strictly greater values go first, so equal values end up next to each other. */
static void keep_best(float v, int64_t i, float *bv, int64_t *bi, int64_t *n, int64_t cap) {
    if (*n == cap && !(v > bv[cap - 1])) return;
    int64_t j = *n < cap ? (*n)++ : cap - 1;
    while (j > 0 && v > bv[j - 1]) {
        bv[j] = bv[j - 1];
        bi[j] = bi[j - 1];
        j--;
    }
    bv[j] = v;
    bi[j] = i;
}

/* The GLM-4.5 router (sigmoid scores) as glm4moe_lib.router.TopkRouter, for T tokens:
 *     logits = x @ weight.T [T, E];  scores = sigmoid(logits);  choice = scores + bias
 *     keep the topk_group groups whose two best choices sum highest (n_group > 1);
 *     idx = the K best choices, in descending order;  w = scores[idx] (/ their sum), * scale
 * A tie decides nothing here: if two of the K+1 best choices (or two group scores at the
 * boundary) are equal, or a choice is not finite, it returns 1 + t for the first such token t
 * and the caller routes with torch instead (whose topk breaks ties its own way). Else 0.
 * Out: logits, scores [T, E]; idx, w [T, K]. */
static int64_t moe_route(const float *x, int64_t T, int64_t H, const float *weight, const float *bias, int64_t E,
                  int64_t K, int64_t n_group, int64_t topk_group, int norm, float scale, float *logits,
                  float *scores, int64_t *idx, float *w) {
    for (int64_t t = 0; t < T; t += RB) { /* logits: one pass over the router's rows per RB tokens */
        const int nr = (int)(T - t < RB ? T - t : RB);
        const float *xr[RB];
        float *lr[RB];
        for (int r = 0; r < nr; r++) {
            xr[r] = x + (t + r) * H;
            lr[r] = logits + (t + r) * E;
        }
        if (nr <= RB_QUAD) /* a token or two: four rows at a time (each summed as rows_dot sums it) */
            rows_dot_halves(weight, E, H, xr, nr, lr, NULL);
        else
            rows_dot_n(weight, E, H, xr, nr, lr, NULL);
    }
    const int grouped = n_group > 1 && topk_group < n_group;
    const int64_t per_group = E / n_group;
    float bv[K + 1], gv[n_group + 1], g2[2];
    int64_t bi[K + 1], gi[n_group + 1], g2i[2];
    unsigned char allowed[n_group];
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        float *s = scores + t * E;
        for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-l[e]));
        for (int64_t g = 0; g < n_group; g++) allowed[g] = 1;
        if (grouped) { /* a group's score: its two best choices; keep the topk_group best groups */
            int64_t ng = 0;
            for (int64_t g = 0; g < n_group; g++) {
                int64_t n2 = 0;
                for (int64_t e = g * per_group; e < (g + 1) * per_group; e++) {
                    const float c = s[e] + (bias ? bias[e] : 0.0f);
                    if (!isfinite(c)) return 1 + t;
                    keep_best(c, e, g2, g2i, &n2, 2);
                }
                keep_best(g2[0] + g2[1], g, gv, gi, &ng, topk_group + 1);
            }
            for (int64_t j = 0; j + 1 < ng; j++)
                if (gv[j] == gv[j + 1]) return 1 + t;
            for (int64_t g = 0; g < n_group; g++) allowed[g] = 0;
            for (int64_t j = 0; j < topk_group; j++) allowed[gi[j]] = 1;
        }
        int64_t n = 0;
        for (int64_t e = 0; e < E; e++) {
            if (!allowed[e / per_group]) continue;
            const float c = s[e] + (bias ? bias[e] : 0.0f);
            if (!isfinite(c)) return 1 + t;
            keep_best(c, e, bv, bi, &n, K + 1);
        }
        for (int64_t j = 0; j + 1 < n; j++)
            if (bv[j] == bv[j + 1]) return 1 + t;
        float sum = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            idx[t * K + k] = bi[k];
            w[t * K + k] = s[bi[k]];
            sum += s[bi[k]];
        }
        for (int64_t k = 0; k < K; k++) {
            if (norm) w[t * K + k] = w[t * K + k] / (sum + 1e-20f);
            w[t * K + k] *= scale;
        }
    }
    return 0;
}

/* ---- backward -------------------------------------------------------------------------------- */

/* Gradients are written, not read: streaming (non-temporal) stores, where the CPU has them, send
 * a cache line to memory without first reading it in (as a plain store must) and without evicting
 * the weights from the cache. Measured here: 96 MB of zeros in 1.2 ms, against 4.9 ms with
 * memset in expert-sized pieces. Elsewhere (no SSE2, e.g. ARM) they are plain stores.
 * Only a gradient written in one go is streamed (the expert's tokens fit one block): one that earlier
 * blocks wrote is in the cache, and a streaming store to a cached line must first push it out.
 * Measured (with the row-at-a-time kernel before the strips below): the backward 12-17% faster at
 * T=64-256 and about 5% at T=1024 than streaming every last block, level at T=16. */
static inline int streamable(const float *p) { return ((uintptr_t)p & 63) == 0; }

/* *p = v for a cache-line-aligned p (see streamable), bypassing the cache where possible */
static inline void store_stream(float *p, vec v) {
#if defined(__AVX512F__)
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
    float *q = (float *)&v;
    _mm256_stream_ps(p, _mm256_loadu_ps(q));
    _mm256_stream_ps(p + 8, _mm256_loadu_ps(q + 8));
#elif defined(__SSE2__)
    float *q = (float *)&v;
    for (int j = 0; j < VL; j += 4) _mm_stream_ps(p + j, _mm_loadu_ps(q + j));
#else
    *(vec_u *)p = v;
#endif
}

static inline void stream_fence(void) { /* streaming stores are weakly ordered: finish them */
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* p[0:n] = 0, streamed */
static void zero_stream(float *p, int64_t n) {
    int64_t i = 0;
    for (; i < n && !streamable(p + i); i++) p[i] = 0.0f; /* up to a cache-line boundary */
    for (; i + VL <= n; i += VL) store_stream(p + i, (vec){0});
    for (; i < n; i++) p[i] = 0.0f;
}

/* The backward reads each weight in strips of columns (nv vectors: 8 for one pair, 4 for two, 2 for up
 * to 4, 1 for more), a tile of rows (about TILE_BYTES) at a time: for every row of the tile each pair's
 * part of d x (or of down^T g) on the strip stays in registers (narrower strips without AVX-512), where reading whole rows one at a time
 * loads and stores each pair's d x for every row (five stores per eight multiply-adds). Measured (1
 * thread, in-process A/B against that row kernel, which read later blocks two rows at a time): backward
 * 19-27% faster at T=64-128 for the bench layer (with one block for up to 8 pairs, see RBB), 4% at T=256
 * (20% skewed), 13% at T=1024, level at T=1-16; 14-20% for the small preset (weights in cache) at
 * T=16-1024. Tiles of 8-16 KB measured alike, 32 KB up to 14% slower from memory; without the prefetch
 * of the next tile 15-25% slower from memory (a strip reads one piece of each row: too far apart for
 * the hardware prefetcher). */
#define CV_MAX 8
#define TILE_BYTES 16384

/* Rows [i0, i1) of one strip of columns [c, c + nv*VL) of a weight w [rows, n] for NR pairs,
 * the strip's sums in registers:
 *     acc_r[strip] += sum_i coef_r[at + i] * w[i, strip]
 *     d w[i, strip] = sum_r gscale_r coef_r[at + i] * right_r[strip]   (written if first, else added)
 * gate_up: coef = d h, gscale = 1, right = x, acc = d x. down: coef = g (d out), gscale = w (the routing
 * weight), right = a, acc = down^T g. */
static inline __attribute__((always_inline)) void strip_bwd(const float *w, float *gw, int64_t n, int64_t i0,
                                                            int64_t i1, int64_t c, const int nv, const int NR,
                                                            const float *const *right, float *const *acc_mem,
                                                            const float *const *coef, int64_t at, const float *gscale,
                                                            int first, int stream) {
    vec acc[RBB][CV_MAX], rv[RBB][CV_MAX];
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < nv; v++) {
            acc[r][v] = load(acc_mem[r] + c + v * VL);
            rv[r][v] = load(right[r] + c + v * VL);
        }
    const float *row = w + i0 * n + c;
    float *grow = gw + i0 * n + c;
    for (int64_t i = i0; i < i1; i++, row += n, grow += n) {
        float d[RBB], dg[RBB];
        for (int r = 0; r < NR; r++) {
            d[r] = coef[r][at + i];
            dg[r] = gscale[r] * d[r];
        }
        for (int v = 0; v < nv; v++) {
            const vec wv = load(row + v * VL);
            vec g = first ? (vec){0} : load(grow + v * VL);
            for (int r = 0; r < NR; r++) {
                acc[r][v] += d[r] * wv;
                g += dg[r] * rv[r][v];
            }
            if (stream)
                store_stream(grow + v * VL, g);
            else
                *(vec_u *)(grow + v * VL) = g;
        }
    }
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < nv; v++) *(vec_u *)(acc_mem[r] + c + v * VL) = acc[r][v];
}

/* strip_bwd over a whole weight [rows, n]: tiles of about TILE_BYTES of rows (read from memory about in
 * order, the next tile prefetched into L2 a piece per strip while this one runs), each by strips, then
 * the last n % VL columns one by one */
static inline __attribute__((always_inline)) void weight_bwd(const float *w, float *gw, int64_t rows, int64_t n,
                                                             const int NR, const float *const *right,
                                                             float *const *acc_mem, const float *const *coef,
                                                             int64_t at, const float *gscale, int first, int last) {
    const int stream = first && last && streamable(gw) && n % VL == 0;
    int64_t tile = TILE_BYTES / (int64_t)(n * sizeof(float));
    if (tile < 1) tile = 1;
#if defined(__AVX512F__)
    const int nvm = NR == 1 ? 8 : NR == 2 ? 4 : NR <= 4 ? 2 : 1; /* 2 * NR * nvm of 32 registers */
#else /* a vec is 2 (AVX) or 4 (SSE, NEON) registers */
    const int nvm = NR == 1 ? 2 : 1;
#endif
    const int64_t strips = (n + nvm * VL - 1) / (nvm * VL);
    for (int64_t i0 = 0; i0 < rows; i0 += tile) {
        const int64_t i1 = i0 + tile < rows ? i0 + tile : rows;
        const char *pf = (const char *)(w + i1 * n);
        const char *pf_end = (const char *)(w + (i1 + tile < rows ? i1 + tile : rows) * n);
        const int64_t pf_step = ((pf_end - pf) / 64 + strips - 1) / strips * 64; /* bytes per strip */
        int64_t c = 0;
        for (; c + nvm * VL <= n; c += nvm * VL) {
            for (const char *q = pf; q < pf + pf_step && q < pf_end; q += 64) __builtin_prefetch(q, 0, 2);
            pf += pf_step;
            switch (nvm) {
            case 8: strip_bwd(w, gw, n, i0, i1, c, 8, NR, right, acc_mem, coef, at, gscale, first, stream); break;
            case 4: strip_bwd(w, gw, n, i0, i1, c, 4, NR, right, acc_mem, coef, at, gscale, first, stream); break;
            case 2: strip_bwd(w, gw, n, i0, i1, c, 2, NR, right, acc_mem, coef, at, gscale, first, stream); break;
            default: strip_bwd(w, gw, n, i0, i1, c, 1, NR, right, acc_mem, coef, at, gscale, first, stream); break;
            }
        }
        for (; c + VL <= n; c += VL)
            strip_bwd(w, gw, n, i0, i1, c, 1, NR, right, acc_mem, coef, at, gscale, first, stream);
        for (; c < n; c++)
            for (int64_t i = i0; i < i1; i++) {
                const float wv = w[i * n + c];
                float g = first ? 0.0f : gw[i * n + c];
                for (int r = 0; r < NR; r++) {
                    acc_mem[r][c] = madd(coef[r][at + i], wv, acc_mem[r][c]);
                    g = madd(gscale[r] * coef[r][at + i], right[r][c], g);
                }
                gw[i * n + c] = g;
            }
    }
}

/* The backward of one block of NR pairs of one expert: gate and up [I, H] (the two halves of
 * gate_up_proj, or the shared expert's gate_proj and up_proj), down [H, I]. d w of a pair, g . (down a),
 * is a . (down^T g): the down pass sums down^T g for d a anyway, so no dot product per row. */
static inline __attribute__((always_inline)) void expert_block_bwd(
    const float *gate, const float *up, const float *dn, float *dgate, float *dup, float *ddn, int64_t H, int64_t I,
    const int NR, const float *const *xr, const float *const *gr, const float *wr, const float *const *hr,
    float *const *dxr, float *dwr, float *const *a, float *const *da, float *const *dh, int first, int last) {
    static const float ones[8] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    for (int r = 0; r < NR; r++) {
        swish_n(hr[r], hr[r] + I, a[r], I, 1); /* a = silu(gate) * up, as the forward */
        for (int64_t i = 0; i < I; i++) da[r][i] = 0.0f;
        for (int64_t h = 0; h < H; h++) dxr[r][h] = 0.0f;
    }
    /* down [H, I]: da_r = down^T g_r for now; d down[j] = sum_r w_r g_r[j] a_r */
    weight_bwd(dn, ddn, H, I, NR, (const float *const *)a, da, gr, 0, wr, first, last);
    for (int r = 0; r < NR; r++) {
        float dw = 0.0f; /* d w_r = g_r . (down a_r) = a_r . (down^T g_r) */
        for (int64_t i = 0; i < I; i++) {
            dw = madd(a[r][i], da[r][i], dw);
            da[r][i] *= wr[r];
        }
        dwr[r] = dw;
        swish_n(hr[r], NULL, dh[r], I, 0); /* the sigmoid of gate, for now */
        for (int64_t i = 0; i < I; i++) { /* through silu(gate) * up */
            const float g = hr[r][i], u = hr[r][I + i], s = dh[r][i];
            dh[r][i] = da[r][i] * u * s * (1.0f + g * (1.0f - s));
            dh[r][I + i] = da[r][i] * g * s;
        }
    }
    weight_bwd(gate, dgate, I, H, NR, xr, dxr, (const float *const *)dh, 0, ones, first, last);
    weight_bwd(up, dup, I, H, NR, xr, dxr, (const float *const *)dh, I, ones, first, last);
}

/* expert_block_bwd for nr <= RBB pairs, with nr a constant in each copy: the per-pair values stay in registers */
static void block_bwd(const float *gate, const float *up, const float *dn, float *dgate, float *dup, float *ddn,
                      int64_t H, int64_t I, int nr, const float *const *xr, const float *const *gr, const float *wr,
                      const float *const *hr, float *const *dxr, float *dwr, float *const *a, float *const *da,
                      float *const *dh, int first, int last) {
    switch (nr) {
    case 1: expert_block_bwd(gate, up, dn, dgate, dup, ddn, H, I, 1, xr, gr, wr, hr, dxr, dwr, a, da, dh, first, last); break;
    case 2: expert_block_bwd(gate, up, dn, dgate, dup, ddn, H, I, 2, xr, gr, wr, hr, dxr, dwr, a, da, dh, first, last); break;
    case 3: expert_block_bwd(gate, up, dn, dgate, dup, ddn, H, I, 3, xr, gr, wr, hr, dxr, dwr, a, da, dh, first, last); break;
    case 4: expert_block_bwd(gate, up, dn, dgate, dup, ddn, H, I, 4, xr, gr, wr, hr, dxr, dwr, a, da, dh, first, last); break;
    case 5: expert_block_bwd(gate, up, dn, dgate, dup, ddn, H, I, 5, xr, gr, wr, hr, dxr, dwr, a, da, dh, first, last); break;
    case 6: expert_block_bwd(gate, up, dn, dgate, dup, ddn, H, I, 6, xr, gr, wr, hr, dxr, dwr, a, da, dh, first, last); break;
    case 7: expert_block_bwd(gate, up, dn, dgate, dup, ddn, H, I, 7, xr, gr, wr, hr, dxr, dwr, a, da, dh, first, last); break;
    default: expert_block_bwd(gate, up, dn, dgate, dup, ddn, H, I, 8, xr, gr, wr, hr, dxr, dwr, a, da, dh, first, last); break;
    }
}

static void split_scratch_bwd(float *scratch, int64_t I, float **a, float **da, float **dh) {
    for (int r = 0; r < RBB; r++) {
        a[r] = scratch + r * I;
        da[r] = scratch + RBB * I + r * I;
        dh[r] = scratch + 2 * RBB * I + r * 2 * I;
    }
}

/* moe_experts_bwd's work for one expert e (a zero gradient if it has no pair), without the closing
 * stream_fence (the caller's, once all its experts are done); a, da, dh: split_scratch_bwd's rows */
static void expert_backward(const float *x, const int64_t *order, const int64_t *offsets, int64_t e, int64_t K,
                            const float *w, const float *grad, const float *gate_up, const float *down,
                            const float *hsave, int64_t H, int64_t I, float *dx_slots, float *dw, float *d_gate_up,
                            float *d_down, float *const *a, float *const *da, float *const *dh) {
    const float *gu = gate_up + e * 2 * I * H, *dn = down + e * H * I;
    float *dgu = d_gate_up + e * 2 * I * H, *ddn = d_down + e * H * I;
    if (offsets[e + 1] == offsets[e]) { /* no token: a zero gradient, written once */
        zero_stream(dgu, 2 * I * H);
        zero_stream(ddn, H * I);
        return;
    }
    const int64_t block = offsets[e + 1] - offsets[e] <= RBB ? RBB : RBB_MANY;
    for (int64_t p = offsets[e]; p < offsets[e + 1]; p += block) {
        const int nr = (int)(offsets[e + 1] - p < block ? offsets[e + 1] - p : block);
        const float *xr[RBB], *gr[RBB], *hr[RBB];
        float wr[RBB], *dxr[RBB], dwr[RBB];
        for (int r = 0; r < nr; r++) {
            const int64_t slot = order[p + r];
            xr[r] = x + (slot / K) * H;
            gr[r] = grad + (slot / K) * H;
            hr[r] = hsave + slot * 2 * I;
            wr[r] = w[slot];
            dxr[r] = dx_slots + slot * H;
        }
        const int first = p == offsets[e], last = p + block >= offsets[e + 1];
        block_bwd(gu, gu + I * H, dn, dgu, dgu + I * H, ddn, H, I, nr, xr, gr, wr, hr, dxr, dwr, a, da, dh, first,
                  last);
        for (int r = 0; r < nr; r++) dw[order[p + r]] = dwr[r];
    }
}

/* The backward of moe_experts + moe_combine for the experts e in [e0, e1), reading each touched
 * expert's weights once more (the forward kept each pair's gate and up pre-activations in hsave
 * [T*K, 2I]) and writing each expert's gradient once: zeros for the experts that got no token.
 * In: grad = d out [T, H]; w [T*K] routing weights. Out: dx_slots [T*K, H] (pair p's part of
 * d x[p / K]), dw [T*K], d_gate_up [E, 2I, H], d_down [E, H, I]. scratch: RBB * 4 * I floats. */
void moe_experts_bwd(const float *x, const int64_t *order, const int64_t *offsets, int64_t e0, int64_t e1,
                     int64_t K, const float *w, const float *grad, const float *gate_up, const float *down,
                     const float *hsave, int64_t H, int64_t I, float *dx_slots, float *dw, float *d_gate_up,
                     float *d_down, float *scratch) {
    float *a[RBB], *da[RBB], *dh[RBB];
    split_scratch_bwd(scratch, I, a, da, dh);
    for (int64_t e = e0; e < e1; e++)
        expert_backward(x, order, offsets, e, K, w, grad, gate_up, down, hsave, H, I, dx_slots, dw, d_gate_up, d_down,
                        a, da, dh);
    stream_fence();
}

/* ---- the experts on several threads: torch's own OpenMP threads ------------------------------ */

/* Where cpu_kernel.py builds this file with -fopenmp (Linux, torch on GNU OpenMP, whose libgomp.so.1 the
 * library then shares: one runtime, one set of threads), moe_experts_parallel and moe_experts_bwd_parallel
 * run the experts on the threads torch's own ops run on: each thread its range of about equal cost (expert_range),
 * then what the others have left (share_out, claim).
 * Python threads instead (cpu_kernel._parallel's pool) meet torch's OpenMP workers still spinning after
 * the op before (libgomp spins for a while before it sleeps): on two cores the two then share one core.
 * Measured (2 threads, T=256, bench layer): the routed experts 7.1 ms after a pause but 10.5 ms right
 * after a torch matmul through the pool. Each expert is computed as on one thread: the same bits. */
int64_t moe_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

/* [e0, e1): part `part` of `parts` ranges of about equal cost (the OpenMP calls below; cpu_kernel._parallel's
 * Python threads ask moe_expert_range). An expert's cost: its pairs plus
 * EXPERT_READ_COST for reading its weights if it has any (by pairs alone one thread got the few hot experts
 * of a skewed routing and the other all the rest to read: 2 threads, bench layer, wall clock, skewed T=16
 * forward 0.75x the time with this cost and T=64 0.88x, balanced level; 6 measured within 3% of 3, 10 up
 * to 11% slower), or, without any, `idle_cost`: the backward writes its zero gradient (EXPERT_ZERO_COST:
 * 0 measured 1.39x the time at T=1 skewed, where all but 8 experts are zeros; 1-3 within noise), the
 * forward skips it (0). */
#define EXPERT_READ_COST 3
#define EXPERT_ZERO_COST 2
#define HEAD_ROUTER_COST 2 /* routing up to RB tokens, beside the experts (the one-call layer) */
static inline int64_t expert_cost(const int64_t *offsets, int64_t e, int64_t idle_cost) {
    const int64_t pairs = offsets[e + 1] - offsets[e];
    return pairs ? pairs + EXPERT_READ_COST : idle_cost;
}
static void expert_range(const int64_t *offsets, int64_t E, int64_t idle_cost, int64_t head_cost, int64_t part,
                         int64_t parts, int64_t *e0, int64_t *e1) {
    int64_t total = head_cost; /* (work the first thread does before its experts: the shared expert's) */
    for (int64_t e = 0; e < E; e++) total += expert_cost(offsets, e, idle_cost);
    int64_t bound[2];
    for (int b = 0; b < 2; b++) {
        const int64_t j = part + b;
        if (j == 0 || j == parts) {
            bound[b] = j == 0 ? 0 : E;
            continue;
        }
        int64_t e = 0, before = head_cost; /* the first expert whose cost starts at or after j/parts of the total */
        while (e < E && (double)before < (double)total * j / parts) before += expert_cost(offsets, e++, idle_cost);
        bound[b] = e;
    }
    *e0 = bound[0];
    *e1 = bound[1] > bound[0] ? bound[1] : bound[0];
}

/* expert_range for Python (cpu_kernel._chunks): bounds = [e0, e1) of part `part`, the backward's costs if
 * `backward` (an untouched expert's zero gradient), else the forward's */
void moe_expert_range(const int64_t *offsets, int64_t E, int64_t backward, int64_t part, int64_t parts,
                      int64_t *bounds) {
    expert_range(offsets, E, backward ? EXPERT_ZERO_COST : 0, 0, part, parts, bounds, bounds + 1);
}

/* Sharing the experts out among the threads: each thread starts on its own range of about equal cost
 * (expert_range), in address order, then takes what the others have left, from the back of the range
 * with the most left. Without other work on the machine the ranges finish together and nothing moves;
 * where one thread runs slower (another process on its core, a slower core) the others take over its
 * last experts. Measured (2 threads, bench layer, wall clock, in-process A/B against fixed ranges): with
 * a busy loop on the second core the forward 0.72-0.76x the time at T=16-256 and forward+backward
 * 0.77-0.92x (T=1-8 swing both ways from run to run: a time slice of the busy loop decides them); on an
 * idle machine level (within 1%) for balanced routing and 0.94-0.97x forward, 0.84-0.95x forward+backward
 * for skewed T=16-64. Which thread runs an expert changes nothing in its result: the same bits.
 * The same queue serves torch's OpenMP threads (below) and cpu_kernel._parallel's Python threads
 * (moe_share_out, moe_experts_claimed, moe_experts_bwd_claimed): a queue is QUEUE_WORDS(parts) int64s,
 * a lock word, then each thread's [lo, hi) of the list still unclaimed. */
#define QUEUE_WORDS(parts) (1 + 2 * (parts))

static int64_t idle_owner = -1; /* tests (moe_schedule_test): this thread claims nothing of its own range */
static int64_t taken_over = 0;  /* tests (moe_taken_over): experts run by a thread outside its own range */

static inline void queue_lock(int64_t *lock) { /* a spin lock: held for a few dozen instructions */
    while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(lock, __ATOMIC_RELAXED)) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
}
static inline void queue_unlock(int64_t *lock) { __atomic_store_n(lock, 0, __ATOMIC_RELEASE); }

/* list: the experts with work (those with a pair, or with idle_cost all E), in order; queue: each thread's
 * range of it, as expert_range splits the experts. Returns the list's length. */
static int64_t share_out(const int64_t *offsets, int64_t E, int64_t idle_cost, int64_t head_cost, int64_t parts,
                         int64_t *list, int64_t *queue) {
    int64_t n = 0;
    queue[0] = 0; /* unlocked */
    for (int64_t part = 0; part < parts; part++) {
        int64_t e0, e1;
        expert_range(offsets, E, idle_cost, head_cost, part, parts, &e0, &e1);
        queue[1 + 2 * part] = n;
        for (int64_t e = e0; e < e1; e++)
            if (idle_cost || offsets[e + 1] > offsets[e]) list[n++] = e;
        queue[2 + 2 * part] = n;
    }
    return n;
}

/* The next list item for thread `part` (-1: none left): the first left of its own range, else the last
 * left of the range with the most left. *next: the item after it in its own range (-1: none, or taken
 * from another range), to read ahead. */
static int64_t claim(int64_t *queue, int64_t parts, int64_t part, int64_t *next) {
    int64_t i = -1, from = -1, *lo = queue + 1, *hi = queue + 2; /* lo[2 * q], hi[2 * q]: thread q's range */
    *next = -1;
    queue_lock(queue);
    if (part != __atomic_load_n(&idle_owner, __ATOMIC_RELAXED) && lo[2 * part] < hi[2 * part]) {
        i = lo[2 * part]++;
        if (lo[2 * part] < hi[2 * part]) *next = lo[2 * part];
    } else {
        int64_t most = 0;
        for (int64_t q = 0; q < parts; q++)
            if (hi[2 * q] - lo[2 * q] > most) {
                most = hi[2 * q] - lo[2 * q];
                from = q;
            }
        if (from >= 0) i = --hi[2 * from];
    }
    queue_unlock(queue);
    if (from >= 0) __atomic_fetch_add(&taken_over, 1, __ATOMIC_RELAXED);
    return i;
}

/* thread `part`'s share of the routed experts' forward (list and queue: share_out's);
 * scratch: RB_MAX * 3 * I floats, as moe_experts */
void moe_experts_claimed(const float *x, const int64_t *order, const int64_t *offsets, const int64_t *list,
                         int64_t *queue, int64_t parts, int64_t part, int64_t K, const float *gate_up,
                         const float *down, int64_t H, int64_t I, float *y, float *scratch, float *hsave) {
    float *g[RB], *a[RB];
    split_scratch(scratch, I, g, a);
    int64_t i, next;
    while ((i = claim(queue, parts, part, &next)) >= 0)
        expert_forward(x, order, offsets, list[i], next < 0 ? -1 : list[next], K, gate_up, down, H, I, y, g, a, hsave);
}

/* the same for the backward (every expert: an untouched one writes its zero gradient); scratch as
 * moe_experts_bwd */
void moe_experts_bwd_claimed(const float *x, const int64_t *order, const int64_t *offsets, const int64_t *list,
                             int64_t *queue, int64_t parts, int64_t part, int64_t K, const float *w,
                             const float *grad, const float *gate_up, const float *down, const float *hsave,
                             int64_t H, int64_t I, float *dx_slots, float *dw, float *d_gate_up, float *d_down,
                             float *scratch) {
    float *a[RBB], *da[RBB], *dh[RBB];
    split_scratch_bwd(scratch, I, a, da, dh);
    int64_t i, next;
    while ((i = claim(queue, parts, part, &next)) >= 0)
        expert_backward(x, order, offsets, list[i], K, w, grad, gate_up, down, hsave, H, I, dx_slots, dw, d_gate_up,
                        d_down, a, da, dh);
    stream_fence();
}

/* For Python's threads (cpu_kernel._parallel): the list [E] and queue [QUEUE_WORDS(parts)] of `parts`
 * threads, the backward's (every expert) if `backward`; returns the list's length. Then each thread
 * calls moe_experts_claimed or moe_experts_bwd_claimed (above) with its `part`. */
int64_t moe_share_out(const int64_t *offsets, int64_t E, int64_t backward, int64_t parts, int64_t *list,
                      int64_t *queue) {
    return share_out(offsets, E, backward ? EXPERT_ZERO_COST : 0, 0, parts, list, queue);
}

/* For tests: thread `owner` of each parallel call (-1: none) claims nothing of its own range, so the others
 * must take all of it over; moe_taken_over: how many experts ran outside their own range since the last
 * call. */
void moe_schedule_test(int64_t owner) { __atomic_store_n(&idle_owner, owner, __ATOMIC_RELAXED); }
int64_t moe_taken_over(void) { return __atomic_exchange_n(&taken_over, 0, __ATOMIC_RELAXED); }

/* moe_experts over all E experts on `threads` threads; scratch: threads * scratch_floats floats */
void moe_experts_parallel(const float *x, const int64_t *order, const int64_t *offsets, int64_t E, int64_t K,
                          const float *gate_up, const float *down, int64_t H, int64_t I, float *y, float *scratch,
                          int64_t scratch_floats, float *hsave, int64_t threads) {
#if defined(_OPENMP)
    int64_t list[E];
    int64_t queue[QUEUE_WORDS(threads)];
#pragma omp parallel num_threads((int)threads)
    {
        const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
#pragma omp single
        share_out(offsets, E, 0, 0, parts, list, queue);
        moe_experts_claimed(x, order, offsets, list, queue, parts, part, K, gate_up, down, H, I, y,
                            scratch + part * scratch_floats, hsave);
    }
#else
    (void)threads, (void)scratch_floats;
    moe_experts(x, order, offsets, 0, E, K, gate_up, down, H, I, y, scratch, hsave);
#endif
}

/* moe_experts_bwd over all E experts on `threads` threads; scratch: threads * scratch_floats floats */
void moe_experts_bwd_parallel(const float *x, const int64_t *order, const int64_t *offsets, int64_t E, int64_t K,
                              const float *w, const float *grad, const float *gate_up, const float *down,
                              const float *hsave, int64_t H, int64_t I, float *dx_slots, float *dw, float *d_gate_up,
                              float *d_down, float *scratch, int64_t scratch_floats, int64_t threads) {
#if defined(_OPENMP)
    int64_t list[E];
    int64_t queue[QUEUE_WORDS(threads)];
#pragma omp parallel num_threads((int)threads)
    {
        const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
#pragma omp single
        share_out(offsets, E, EXPERT_ZERO_COST, 0, parts, list, queue);
        moe_experts_bwd_claimed(x, order, offsets, list, queue, parts, part, K, w, grad, gate_up, down, hsave, H,
                                I, dx_slots, dw, d_gate_up, d_down, scratch + part * scratch_floats);
    }
#else
    (void)threads, (void)scratch_floats;
    moe_experts_bwd(x, order, offsets, 0, E, K, w, grad, gate_up, down, hsave, H, I, dx_slots, dw, d_gate_up, d_down,
                    scratch);
#endif
}

/* ---- the whole layer (one thread): forward for inference and training, backward ------------- */

#if defined(_OPENMP)
/* [t0, t1): part `part` of `parts` ranges of T tokens, whole passes of RB tokens where it can */
static void token_range(int64_t T, int64_t part, int64_t parts, int64_t *t0, int64_t *t1) {
    int64_t chunk = (T + parts - 1) / parts;
    chunk = (chunk + RB - 1) / RB * RB;
    *t0 = part * chunk < T ? part * chunk : T;
    *t1 = *t0 + chunk < T ? *t0 + chunk : T;
}
#endif

/* moe_layer (below) keeping what moe_layer_bwd needs: offsets [E+1] and order [T*K] (as moe_sort), hsave
 * [T*K, 2I] (each pair's gate and up pre-activations) and sh_hsave [T, 2Is] (the shared expert's; unused
 * without one; both NULL: nothing kept), beside scores [T, E], ids and w [T, K]. logits [T, E] may be scratch.
 * work: at least T * K * H + T * H + threads * RB_MAX * 3 * max(I, Is) floats. Returns what moe_layer returns.
 * With threads > 1 (where built with OpenMP: torch's own threads) each thread routes and runs the shared
 * expert for a range of tokens, then the routed experts of its range (about equal cost) and what the others
 * leave (share_out), then sums its tokens' slots: each value is computed as on one thread, so the same bits. */
int64_t moe_layer_train(const float *x, int64_t T, int64_t H, const float *router_w, const float *bias, int64_t E,
                        int64_t K, int64_t n_group, int64_t topk_group, int norm, float scale, const float *gate_up,
                        const float *down, int64_t I, const float *sh_gate, const float *sh_up,
                        const float *sh_down, int64_t Is, float *logits, float *scores, int64_t *ids, float *w,
                        int64_t *offsets, int64_t *order, float *hsave, float *sh_hsave, float *out, float *work,
                        int64_t threads) {
    float *y = work, *shared = y + T * K * H, *scratch = shared + T * H;
#if defined(_OPENMP)
    if (threads > 1) {
        const int64_t scratch_floats = RB_MAX * 3 * (I > Is ? I : Is);
        /* up to RB tokens the first thread routes them all and runs the shared expert: it takes fewer experts
         * (2 threads, bench layer: 0.96x the time at T=4-8, level at T=1-2) */
        const int64_t head = T <= RB ? (sh_gate ? T + EXPERT_READ_COST : 0) + HEAD_ROUTER_COST : 0;
        int64_t tie = 0, list[E];
        int64_t queue[QUEUE_WORDS(threads)];
#pragma omp parallel num_threads((int)threads)
        {
            const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
            int64_t t0, t1;
            token_range(T, part, parts, &t0, &t1);
            float *mine = scratch + part * scratch_floats;
            if (t1 > t0) {
                const int64_t t = moe_route(x + t0 * H, t1 - t0, H, router_w, bias, E, K, n_group, topk_group, norm,
                                            scale, logits + t0 * E, scores + t0 * E, ids + t0 * K, w + t0 * K);
                if (t) {
#pragma omp critical(moe_layer_tie)
                    if (!tie || t0 + t < tie) tie = t0 + t; /* the first tie over all tokens */
                }
            }
#pragma omp barrier
            if (!tie) { /* (the same for every thread: written before the barrier) */
#pragma omp single
                {
                    moe_sort(ids, T * K, E, offsets, order);
                    share_out(offsets, E, 0, head, parts, list, queue);
                }
                /* the shared expert first: what a thread leaves of its experts the others then take */
                if (sh_gate && t1 > t0)
                    mlp_rows(x + t0 * H, t1 - t0, sh_gate, sh_up, sh_down, H, Is, shared + t0 * H, mine,
                             sh_hsave ? sh_hsave + t0 * 2 * Is : NULL);
                moe_experts_claimed(x, order, offsets, list, queue, parts, part, K, gate_up, down, H, I, y, mine,
                                    hsave);
#pragma omp barrier
                if (t1 > t0)
                    moe_combine(y + t0 * K * H, w + t0 * K, t1 - t0, K, H, sh_gate ? shared + t0 * H : NULL,
                                out + t0 * H);
            }
        }
        return tie;
    }
#endif
    (void)threads;
    const int64_t tie =
        moe_route(x, T, H, router_w, bias, E, K, n_group, topk_group, norm, scale, logits, scores, ids, w);
    if (tie) return tie;
    moe_sort(ids, T * K, E, offsets, order);
    moe_experts(x, order, offsets, 0, E, K, gate_up, down, H, I, y, scratch, hsave);
    if (sh_gate) mlp_rows(x, T, sh_gate, sh_up, sh_down, H, Is, shared, scratch, sh_hsave);
    moe_combine(y, w, T, K, H, sh_gate ? shared : NULL, out);
    return 0;
}

/* moe_route, moe_sort, moe_experts, the shared expert and moe_combine in one call, for a few
 * tokens where each call from Python costs about as much as the work itself.
 * shared: sh_gate, sh_up [Is, H] and sh_down [H, Is], or NULL (Is ignored).
 * work: at least 2 * (E + 1) + 2 * T * K + T * K * H + T * H + threads * RB_MAX * 3 * max(I, Is) floats.
 * Returns what moe_route returns (1 + t for a tie: nothing else is done), else 0. threads: as moe_layer_train. */
int64_t moe_layer(const float *x, int64_t T, int64_t H, const float *router_w, const float *bias, int64_t E,
                  int64_t K, int64_t n_group, int64_t topk_group, int norm, float scale, const float *gate_up,
                  const float *down, int64_t I, const float *sh_gate, const float *sh_up, const float *sh_down,
                  int64_t Is, float *logits, float *scores, int64_t *ids, float *w, float *out, float *work,
                  int64_t threads) {
    int64_t *offsets = (int64_t *)work, *order = offsets + (E + 1); /* moe_layer_train, keeping nothing */
    return moe_layer_train(x, T, H, router_w, bias, E, K, n_group, topk_group, norm, scale, gate_up, down, I, sh_gate,
                           sh_up, sh_down, Is, logits, scores, ids, w, offsets, order, NULL, NULL, out,
                           (float *)(order + T * K), threads);
}

/* moe_layer_bwd's shared expert: blocks of its T tokens with weight 1 (scratch: RBB * 4 * Is floats); no
 * tokens: zero gradients (the blocks below write them only where a block runs) */
static void shared_bwd(const float *x, int64_t T, int64_t H, const float *sh_gate, const float *sh_up,
                       const float *sh_down, int64_t Is, const float *sh_hsave, const float *grad, float *d_sh_gate,
                       float *d_sh_up, float *d_sh_down, float *dx_sh, float *scratch) {
    if (T == 0) {
        memset(d_sh_gate, 0, (size_t)(Is * H) * sizeof(float));
        memset(d_sh_up, 0, (size_t)(Is * H) * sizeof(float));
        memset(d_sh_down, 0, (size_t)(H * Is) * sizeof(float));
        return;
    }
    float *a[RBB], *da[RBB], *dh[RBB];
    split_scratch_bwd(scratch, Is, a, da, dh);
    const int64_t block = T <= RBB ? RBB : RBB_MANY;
    for (int64_t t = 0; t < T; t += block) {
        const int nr = (int)(T - t < block ? T - t : block);
        const float *xr[RBB], *gr[RBB], *hr[RBB];
        float wr[RBB], *dxr[RBB], dwr[RBB];
        for (int r = 0; r < nr; r++) {
            xr[r] = x + (t + r) * H;
            gr[r] = grad + (t + r) * H;
            hr[r] = sh_hsave + (t + r) * 2 * Is;
            wr[r] = 1.0f;
            dxr[r] = dx_sh + (t + r) * H;
        }
        block_bwd(sh_gate, sh_up, sh_down, d_sh_gate, d_sh_up, d_sh_down, H, Is, nr, xr, gr, wr, hr, dxr, dwr, a, da,
                  dh, t == 0, t + block >= T);
    }
    stream_fence();
}

/* moe_layer_bwd's router and the sum of dx's parts (see there), once the experts' parts are done */
static void router_bwd(const float *x, int64_t T, int64_t H, const float *router_w, int64_t E, int64_t K, int norm,
                       float scale, int shared, const float *scores, const int64_t *ids, const float *dx_slots,
                       const float *dw, const float *dx_sh, float *dx, float *d_router) {
    memset(d_router, 0, (size_t)(E * H) * sizeof *d_router);
    for (int64_t t = 0; t < T; t++) {
        float *dxt = dx + t * H;
        const float *xt = x + t * H;
        for (int64_t h = 0; h < H; h++) dxt[h] = shared ? dx_sh[t * H + h] : 0.0f;
        for (int64_t k = 0; k < K; k++) { /* the routed experts' parts, in slot order */
            const float *d = dx_slots + (t * K + k) * H;
            for (int64_t h = 0; h < H; h++) dxt[h] += d[h];
        }
        const int64_t *it = ids + t * K;
        const float *gw = dw + t * K;
        float sum = 0.0f, dot = 0.0f; /* sum_k s_k and sum_k d w_k * s_k */
        for (int64_t k = 0; k < K; k++) {
            const float s = scores[t * E + it[k]];
            sum += s;
            dot += gw[k] * s;
        }
        const float denom = sum + 1e-20f;
        for (int64_t k = 0; k < K; k++) {
            const float s = scores[t * E + it[k]];
            /* d s_k: through w_k = scale * s_k / denom (the denominator holds every s_j) or scale * s_k */
            const float ds = norm ? scale * (gw[k] / denom - dot / (denom * denom)) : scale * gw[k];
            const float dl = ds * s * (1.0f - s);
            float *dr = d_router + it[k] * H;
            const float *wrow = router_w + it[k] * H;
            for (int64_t h = 0; h < H; h++) {
                dr[h] += dl * xt[h];
                dxt[h] += dl * wrow[h];
            }
        }
    }
}

/* The backward of moe_layer_train, given grad = d out [T, H] and what it kept:
 *   routed experts: moe_experts_bwd (d_gate_up, d_down; each pair's d x and d w);
 *   shared expert: the same blocks over its T tokens with weight 1 (d_sh_gate, d_sh_up, d_sh_down);
 *   router: w = scale * s / (sum_k s_k + 1e-20) (or scale * s without norm) with s = sigmoid(logits) at
 *   the chosen experts, so d logit = d s * s * (1 - s); d_router [E, H] += d logit * x (zero for the rows
 *   no token chose), d x += d logit * router row. The choice itself (selection bias, groups) has no
 *   gradient, as in torch.
 * Out: dx [T, H] (the three parts summed), d_router [E, H], d_gate_up, d_down (every expert's: zeros
 * for untouched ones), d_sh_* (unused without a shared expert).
 * work: at least T * K * H + T * K + T * H + threads * RBB * 4 * max(I, Is) floats. threads > 1 (where built
 * with OpenMP): the shared expert on the first thread, the experts in ranges of about equal cost (the first one
 * smaller) and what the others leave (share_out), then the router on one thread; each gradient computed as on
 * one thread: the same bits. */
void moe_layer_bwd(const float *x, int64_t T, int64_t H, const float *router_w, int64_t E, int64_t K, int norm,
                   float scale, const float *gate_up, const float *down, int64_t I, const float *sh_gate,
                   const float *sh_up, const float *sh_down, int64_t Is, const float *scores, const int64_t *ids,
                   const float *w, const int64_t *offsets, const int64_t *order, const float *hsave,
                   const float *sh_hsave, const float *grad, float *dx, float *d_router, float *d_gate_up,
                   float *d_down, float *d_sh_gate, float *d_sh_up, float *d_sh_down, float *work, int64_t threads) {
    float *dx_slots = work, *dw = dx_slots + T * K * H, *dx_sh = dw + T * K, *scratch = dx_sh + T * H;
#if defined(_OPENMP)
    if (threads > 1) { /* the first thread takes the shared expert and fewer experts; then one the router */
        const int64_t scratch_floats = RBB * 4 * (I > Is ? I : Is);
        const int64_t head = sh_gate ? T + EXPERT_READ_COST : 0;
        int64_t list[E];
        int64_t queue[QUEUE_WORDS(threads)];
#pragma omp parallel num_threads((int)threads)
        {
            const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
            float *mine = scratch + part * scratch_floats;
#pragma omp single
            share_out(offsets, E, EXPERT_ZERO_COST, head, parts, list, queue);
            if (part == 0 && sh_gate)
                shared_bwd(x, T, H, sh_gate, sh_up, sh_down, Is, sh_hsave, grad, d_sh_gate, d_sh_up, d_sh_down, dx_sh,
                           mine);
            moe_experts_bwd_claimed(x, order, offsets, list, queue, parts, part, K, w, grad, gate_up, down, hsave,
                                    H, I, dx_slots, dw, d_gate_up, d_down, mine);
#pragma omp barrier
#pragma omp single
            router_bwd(x, T, H, router_w, E, K, norm, scale, sh_gate != NULL, scores, ids, dx_slots, dw, dx_sh, dx,
                       d_router);
        }
        return;
    }
#endif
    (void)threads;
    moe_experts_bwd(x, order, offsets, 0, E, K, w, grad, gate_up, down, hsave, H, I, dx_slots, dw, d_gate_up,
                    d_down, scratch);
    if (sh_gate)
        shared_bwd(x, T, H, sh_gate, sh_up, sh_down, Is, sh_hsave, grad, d_sh_gate, d_sh_up, d_sh_down, dx_sh,
                   scratch);
    router_bwd(x, T, H, router_w, E, K, norm, scale, sh_gate != NULL, scores, ids, dx_slots, dw, dx_sh, dx, d_router);
}
