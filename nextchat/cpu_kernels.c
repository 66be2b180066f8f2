/* Decode-step kernels for x86 CPUs with AVX2 (loaded by nextchat/cpu_kernels.py, which builds this file with the
 * system C compiler at first use; torch's kernels run where it cannot).
 *
 * A decode step multiplies a few activation rows by every weight of the language model and attends one query per
 * row to every cached key, so its speed is how fast those bytes stream from memory.
 *
 * nextchat_int8_matvec: out[m, n] = scale[n] * sum_k x[m, k] * weight[n, k], weight int8. Each weight row is read once
 * and used for every activation row while it sits in L1. The activations are rounded to int16 per row (steps of
 * absmax / 16383: as fine as bfloat16's or finer for every value at least 1/64 of the row's largest), so the inner
 * loop is sign-extend, multiply-add pairs, add: 16 weights an instruction, with no float conversion of the weight.
 *
 * nextchat_bf16_matvec: the same product with a bfloat16 weight (the language model's head, which stays 16-bit).
 *
 * nextchat_single_query_attention: below.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define X_MAX 16383.0f
/* An int32 lane gains at most 2 * 16383 * 127 per multiply-add and takes at most 4096 / 16 of them per chunk
 * (about 2^30): no overflow. The lanes are then summed in float, where the sum of all of them could not be in int32. */
#define CHUNK 4096

enum { KIND_F32 = 0, KIND_BF16 = 1 };

static inline float bf16_to_f32(uint16_t bits) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)bits << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float value) {
    union { uint32_t u; float f; } v;
    v.f = value;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);                 /* round to nearest even */
}

static inline float load(const void* data, int kind, long i) {
    return kind == KIND_BF16 ? bf16_to_f32(((const uint16_t*)data)[i]) : ((const float*)data)[i];
}

static inline __m256 load8(const void* base, int kind, long i) {
    if (kind == KIND_BF16) {
        __m128i bits = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    }
    return _mm256_loadu_ps((const float*)base + i);
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

/* xq[k] = round(x[offset + k] / step) with step = absmax / X_MAX (vectorised: a 7B step quantizes 224 rows); -2 if
 * the row holds a NaN or an infinity. k_len % 16 == 0 */
static int quantize_row(const void* x, int kind, long offset, int k_len, int16_t* xq, float* step) {
    const __m256 sign = _mm256_set1_ps(-0.0f), infinity = _mm256_set1_ps(INFINITY);
    __m256 largest = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int k = 0; k < k_len; k += 8) {
        __m256 magnitude = _mm256_andnot_ps(sign, load8(x, kind, offset + k));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(magnitude, infinity, _CMP_NLT_UQ)); /* inf, or NaN (unordered) */
        largest = _mm256_max_ps(largest, magnitude);
    }
    if (_mm256_movemask_ps(bad)) return -2;
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float absmax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 0x55)));
    *step = absmax / X_MAX;
    __m256 to_int = _mm256_set1_ps(absmax > 0.f ? X_MAX / absmax : 0.f);
    for (int k = 0; k < k_len; k += 16) { /* round to nearest even, as lrintf does */
        __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, kind, offset + k), to_int));
        __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, kind, offset + k + 8), to_int));
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xd8); /* packs works per 128 bits */
        _mm256_storeu_si256((__m256i*)(xq + k), packed);
    }
    return 0;
}

/* The sum of the int32 lanes of a and b, in float */
static inline float sum_lanes(__m256i a, __m256i b) {
    __m256 v = _mm256_add_ps(_mm256_cvtepi32_ps(a), _mm256_cvtepi32_ps(b));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

#define WIDENED(weights, off) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)((weights) + k + (off))))
#define WEIGHTS(off) WIDENED(row, off)
#define ROW_INPUTS(inputs, off) _mm256_loadu_si256((const __m256i*)((inputs) + k + (off)))
#define INPUTS(off) ROW_INPUTS(xq, off)

/* sum_k row[k] * xq[k] in float; k_len % 16 == 0 */
static float dot(const int8_t* row, const int16_t* xq, int k_len) {
    float total = 0.f;
    for (int start = 0; start < k_len; start += CHUNK) {
        int end = start + CHUNK < k_len ? start + CHUNK : k_len;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        int k = start;
        for (; k + 64 <= end; k += 64) {
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(WEIGHTS(0), INPUTS(0)));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(WEIGHTS(16), INPUTS(16)));
            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(WEIGHTS(32), INPUTS(32)));
            a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(WEIGHTS(48), INPUTS(48)));
        }
        for (; k < end; k += 16) a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(WEIGHTS(0), INPUTS(0)));
        total += sum_lanes(a0, a1) + sum_lanes(a2, a3);
    }
    return total;
}

/* sums[0] = sum_k row_a[k] * x_a[k] and sums[1] = sum_k row_b[k] * x_b[k], in one pass; k_len % 16 == 0.
 * Two weight rows with one activation row: two weight streams at once keep more of the memory's bandwidth busy than
 * one (measured: about 1.2x). One weight row with two activation rows: the row is read from memory once. */
static void dot_pair(const int8_t* row_a, const int16_t* x_a, const int8_t* row_b, const int16_t* x_b, int k_len,
                     float* sums) {
    sums[0] = sums[1] = 0.f;
    for (int start = 0; start < k_len; start += CHUNK) {
        int end = start + CHUNK < k_len ? start + CHUNK : k_len;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
        int k = start;
        for (; k + 32 <= end; k += 32) {
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(WIDENED(row_a, 0), ROW_INPUTS(x_a, 0)));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(WIDENED(row_a, 16), ROW_INPUTS(x_a, 16)));
            b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(WIDENED(row_b, 0), ROW_INPUTS(x_b, 0)));
            b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(WIDENED(row_b, 16), ROW_INPUTS(x_b, 16)));
        }
        for (; k < end; k += 16) {
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(WIDENED(row_a, 0), ROW_INPUTS(x_a, 0)));
            b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(WIDENED(row_b, 0), ROW_INPUTS(x_b, 0)));
        }
        sums[0] += sum_lanes(a0, a1);
        sums[1] += sum_lanes(b0, b1);
    }
}

static inline void store(void* out, int kind, long i, float value) {
    if (kind == KIND_BF16) ((uint16_t*)out)[i] = f32_to_bf16(value);
    else ((float*)out)[i] = value;
}

/* x [rows, k_len] and scale [n_len] of `kind`; weight [n_len, k_len] int8; out [rows, n_len] of `kind`.
 * xq [rows, k_len] int16 and x_step [rows] float are the caller's scratch. Returns 0; -1 if k_len % 16 != 0 and
 * -2 if x holds a NaN or an infinity (the caller then uses a float kernel, which carries them as torch would). */
int nextchat_int8_matvec(const void* x, int kind, int rows, int k_len, const int8_t* weight, const void* scale,
                         int n_len, void* out, int16_t* xq, float* x_step, int threads) {
    if (k_len % 16 != 0 || rows < 1) return -1;
    for (int m = 0; m < rows; ++m)
        if (quantize_row(x, kind, (long)m * k_len, k_len, xq + (long)m * k_len, x_step + m) != 0) return -2;
    if (rows == 1) { /* rows n and n + half together */
        int half = n_len / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int n = 0; n < half; ++n) {
            float sums[2];
            dot_pair(weight + (long)n * k_len, xq, weight + (long)(n + half) * k_len, xq, k_len, sums);
            store(out, kind, n, sums[0] * x_step[0] * load(scale, kind, n));
            store(out, kind, n + half, sums[1] * x_step[0] * load(scale, kind, n + half));
        }
        if (n_len % 2) {
            int last = n_len - 1;
            store(out, kind, last, dot(weight + (long)last * k_len, xq, k_len) * x_step[0] * load(scale, kind, last));
        }
        return 0;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < n_len; ++n) {
        const int8_t* row = weight + (long)n * k_len;
        float row_scale = load(scale, kind, n);
        int m = 0;
        for (; m + 2 <= rows; m += 2) {
            float sums[2];
            dot_pair(row, xq + (long)m * k_len, row, xq + (long)(m + 1) * k_len, k_len, sums);
            store(out, kind, (long)m * n_len + n, sums[0] * x_step[m] * row_scale);
            store(out, kind, (long)(m + 1) * n_len + n, sums[1] * x_step[m + 1] * row_scale);
        }
        if (m < rows) store(out, kind, (long)m * n_len + n, dot(row, xq + (long)m * k_len, k_len) * x_step[m] * row_scale);
    }
    return 0;
}

/* out[m, n] = sum_k x[m, k] * weight[n, k] for one or two rows m; x [rows, k_len] float32 (the caller widens it),
 * weight [n_len, k_len] bfloat16, out [rows, n_len] float32. Returns -1 unless k_len % 8 == 0 and rows is 1 or 2. */
int nextchat_bf16_matvec(const float* x, int rows, int k_len, const uint16_t* weight, int n_len, float* out,
                         int threads) {
    if (k_len % 8 != 0 || rows < 1 || rows > 2) return -1;
    const float* x1 = x + (rows == 2 ? k_len : 0);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < n_len; ++n) {
        const uint16_t* row = weight + (long)n * k_len;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        int k = 0;
        for (; k + 16 <= k_len; k += 16) {
            __m256 w0 = load8(row, KIND_BF16, k), w1 = load8(row, KIND_BF16, k + 8);
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
            b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), b0);
            b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + k + 8), b1);
        }
        for (; k < k_len; k += 8) {
            __m256 w0 = load8(row, KIND_BF16, k);
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
            b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), b0);
        }
        out[n] = sum8(_mm256_add_ps(a0, a1));
        if (rows == 2) out[(long)n_len + n] = sum8(_mm256_add_ps(b0, b1));
    }
    return 0;
}

/* Single-query attention for decode steps, one (row, head) per task:
 *   out[b, h] = softmax_j(scale * q[b, h] . k[b, h / group, j]) . v[b, h / group, j], over the j that mask[b, j] allows.
 * q [rows, heads, head_dim] and out are float32 and contiguous; k and v (bfloat16 or float32 by `kind`) are read
 * through element strides (row, head, position; the last dimension is contiguous), so the cache's step window, a
 * view, is read in place. mask [rows, positions] (bytes, row stride mask_row) may be NULL. scores: scratch of
 * rows * heads * positions floats. head_dim % 8 == 0. A row with no allowed position gets NaN, as softmax over
 * nothing does. */
int nextchat_single_query_attention(const float* q, const void* k, const void* v, int kind, const long* k_strides,
                                    const long* v_strides, const uint8_t* mask, long mask_row, int rows, int heads,
                                    int kv_heads, int positions, int head_dim, float scale, float* out,
                                    float* scores, int threads) {
    if (head_dim % 8 != 0 || head_dim > 256 || heads % kv_heads != 0) return -1;
    int group = heads / kv_heads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int task = 0; task < rows * heads; ++task) {
        int b = task / heads, h = task % heads, kvh = h / group;
        const float* query = q + (long)task * head_dim;
        float* s = scores + (long)task * positions;
        long k_base = b * k_strides[0] + kvh * k_strides[1], v_base = b * v_strides[0] + kvh * v_strides[1];
        float best = -INFINITY;
        for (int j = 0; j < positions; ++j) {
            if (mask && !mask[b * mask_row + j]) { s[j] = -INFINITY; continue; }
            __m256 acc = _mm256_setzero_ps();
            long at = k_base + j * k_strides[2];
            for (int d = 0; d < head_dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), load8(k, kind, at + d), acc);
            s[j] = sum8(acc) * scale;
            best = fmaxf(best, s[j]);
        }
        float total = 0.f;
        for (int j = 0; j < positions; ++j) { s[j] = s[j] == -INFINITY ? 0.f : expf(s[j] - best); total += s[j]; }
        __m256 acc[32];
        for (int d = 0; d < head_dim / 8; ++d) acc[d] = _mm256_setzero_ps();
        for (int j = 0; j < positions; ++j) {
            if (s[j] == 0.f) continue;
            __m256 p = _mm256_set1_ps(s[j]);
            long at = v_base + j * v_strides[2];
            for (int d = 0; d < head_dim / 8; ++d) acc[d] = _mm256_fmadd_ps(p, load8(v, kind, at + 8 * d), acc[d]);
        }
        float inverse = 1.f / total; /* total == 0 (nothing allowed): inf, and 0 * inf gives the NaN softmax gives */
        for (int d = 0; d < head_dim / 8; ++d) _mm256_storeu_ps(out + (long)task * head_dim + 8 * d, _mm256_mul_ps(acc[d], _mm256_set1_ps(inverse)));
    }
    return 0;
}
