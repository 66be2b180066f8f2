/* Decode-step products with int8 weights on x86 CPUs with AVX2: out[m, n] = scale[n] * sum_k x[m, k] * weight[n, k].
 *
 * A decode step multiplies a few activation rows by every weight of the language model, so its speed is how fast
 * the weights stream from memory. Each weight row is read once and used for every activation row while it sits in
 * L1. The activations are rounded to int16 per row (steps of absmax / 16383: as fine as bfloat16's or finer for every
 * value at least 1/64 of the row's largest), so the inner loop is sign-extend, multiply-add pairs, add: 16 weights an
 * instruction, with no float conversion of the weight.
 *
 * Built at first use by nextchat/int8_matvec.py with the system C compiler; torch's own kernel is used when it is
 * not available.
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

/* The sum of the int32 lanes of a and b, in float */
static inline float sum_lanes(__m256i a, __m256i b) {
    __m256 v = _mm256_add_ps(_mm256_cvtepi32_ps(a), _mm256_cvtepi32_ps(b));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

#define WEIGHTS(off) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(row + k + (off))))
#define INPUTS(off) _mm256_loadu_si256((const __m256i*)(xq + k + (off)))

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

/* The two sums of row[k] * x0[k] and row[k] * x1[k] in one pass (each weight widened once); k_len % 16 == 0 */
static void dot2(const int8_t* row, const int16_t* x0, const int16_t* x1, int k_len, float* sums) {
    sums[0] = sums[1] = 0.f;
    for (int start = 0; start < k_len; start += CHUNK) {
        int end = start + CHUNK < k_len ? start + CHUNK : k_len;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
        int k = start;
        for (; k + 32 <= end; k += 32) {
            __m256i w0 = WEIGHTS(0), w1 = WEIGHTS(16);
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(x0 + k))));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(x0 + k + 16))));
            b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(x1 + k))));
            b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(x1 + k + 16))));
        }
        for (; k < end; k += 16) {
            __m256i w0 = WEIGHTS(0);
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(x0 + k))));
            b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(x1 + k))));
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
    for (int m = 0; m < rows; ++m) {
        float absmax = 0.f;
        for (int k = 0; k < k_len; ++k) {
            float magnitude = fabsf(load(x, kind, (long)m * k_len + k));
            if (!isfinite(magnitude)) return -2;
            absmax = fmaxf(absmax, magnitude);
        }
        float to_int = absmax > 0.f ? X_MAX / absmax : 0.f;
        x_step[m] = absmax / X_MAX;
        for (int k = 0; k < k_len; ++k) xq[(long)m * k_len + k] = (int16_t)lrintf(load(x, kind, (long)m * k_len + k) * to_int);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < n_len; ++n) {
        const int8_t* row = weight + (long)n * k_len;
        float row_scale = load(scale, kind, n);
        int m = 0;
        for (; m + 2 <= rows; m += 2) {
            float sums[2];
            dot2(row, xq + (long)m * k_len, xq + (long)(m + 1) * k_len, k_len, sums);
            store(out, kind, (long)m * n_len + n, sums[0] * x_step[m] * row_scale);
            store(out, kind, (long)(m + 1) * n_len + n, sums[1] * x_step[m + 1] * row_scale);
        }
        if (m < rows) store(out, kind, (long)m * n_len + n, dot(row, xq + (long)m * k_len, k_len) * x_step[m] * row_scale);
    }
    return 0;
}
