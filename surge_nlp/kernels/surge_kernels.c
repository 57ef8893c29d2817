/* Popcount kernels for surge_nlp inference: 1-bit weights times 1-, 2- or 4-bit activations.
 *
 * Operands are bit-packed along the reduction dimension into 64-bit words (bit j of word w holds
 * element 64*w + j; padding bits are 0 on both sides, so they never count). A row of the A operand
 * (the activations) holds `planes` bit-planes one after the other: a b-bit level l is stored as its
 * code u = l + offset in [0, 2^b), bit p of u in plane p (bit-serial).
 *   XOR mode (signed 1-bit x signed, bit 1 = +1):  dot = K - 2 popcount(a ^ b)
 *   AND mode (levels x signed):                    dot = sum_p 2^p (2 popcount(a_p & b) - popcount(a_p))
 *                                                        - offset (2 popcount(b) - K)
 *     unsigned 1-bit inputs {0, 1} are one plane with offset 0; the signed LSQ levels -Qn..Qp of
 *     ActivationQuantizer have offset Qn.
 * The epilogue applies the scales and shifts in the simulated path's order, so that both give the
 * same floats: out = (float)dot * scale * col_scale[n] + bias[n] (no FMA contraction: build.py).
 *
 * Outer-product form: B rows are laid out in panels of 8 (word w of the 8 rows side by side). Each
 * activation word is broadcast against a panel, so each vector lane accumulates one output: no
 * horizontal reduction, and any K runs at full vector width. Weights are laid out once
 * (surge_weight_panels, at deploy); other B operands per call.
 *
 * Built generic (no -march): the AVX2 and AVX-512 VPOPCNTDQ variants are compiled with target
 * attributes and picked at run time from cpuid, so one cached library serves every x86-64 CPU.
 * Threads: OpenMP (the process shares PyTorch's libgomp, loaded first under the same soname).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SURGE_X86 1
#endif

#define SURGE_API __attribute__((visibility("default")))
/* Inlined with constant arguments (the mode, the micro-kernel), so that each variant's inner loop
 * is compiled once per mode with the micro-kernel's accumulators in registers. */
#define INLINE static inline __attribute__((always_inline))

/* The interface, in one table: the ABI version, the variants (in the order of the enum below) and
 * every exported function's signature, "fn NAME RESULT ARGS..." with i = int, q = int64_t,
 * f = float, p = pointer, s = C string, v = void and N*t = N arguments of type t. build.py reads this table
 * from the source to declare the ctypes signatures and the variant list, and checks that a loaded
 * library returns the same table from surge_interface(). Change the table with the code. */
#define SURGE_INTERFACE                                                   \
    "abi 6\n"                                                             \
    "variants generic avx2 avx512_vpopcntdq\n"                            \
    "fn surge_interface s\n"                                              \
    "fn surge_variant_supported i i\n"                                    \
    "fn surge_set_variant i i\n"                                          \
    "fn surge_active_variant i\n"                                         \
    "fn surge_forced_variant i\n"                                         \
    "fn surge_binary_matmul i 3*i p p i p 15*q f p p 2*q i\n"             \
    "fn surge_weight_panels v p 3*q p\n"                                  \
    "fn surge_pack_signs v p 8*q p 4*q f p q i\n"                         \
    "fn surge_pack_levels v p 8*q p 4*q p 4*q 2*f 3*i p q i\n"            \
    "fn surge_gather_signs i p 3*q p q p p i\n"                          \
    "fn surge_peak_xor_popcount q p p q q i\n"

enum { VARIANT_GENERIC = 0, VARIANT_AVX2 = 1, VARIANT_AVX512 = 2 };
enum { MODE_XOR = 0, MODE_AND = 1 };
/* Inside the variants, `mode` also says which epilogue operands there are, so that each combination
 * is compiled without tests in the epilogue (see DISPATCH). */
enum { WITH_SCALE = 2, WITH_BIAS = 4 };

#define PANEL 8   /* B rows per panel: one 512-bit vector of words */
#define MR 4      /* A rows (bit-planes) per micro-kernel: a 4-bit row, two 2-bit rows or four 1-bit rows */
#define NP_MAX 4  /* panels per micro-kernel, at most (the AVX-512 one) */
/* Cache blocking (overridable with -D for experiments): a task sweeps A_BLOCK_BYTES of A rows per
 * group of panels, over B_BLOCK_PANELS panels (128 B rows). Measured on Zen 5 (2 threads, 1024
 * tokens): 8 KiB for 1-bit rows (4 KiB: 768x768 and 768x3072 10-25% slower); rows of several planes
 * want fewer rows per block, 4 KiB (with 8 KiB or more, 2-bit rows at 768x3072 ran up to 2-3x slower). */
#ifndef A_BLOCK_BYTES
#define A_BLOCK_BYTES(planes) ((planes) == 1 ? 8 * 1024 : 4 * 1024)
#endif
#ifndef B_BLOCK_PANELS
#define B_BLOCK_PANELS 16
#endif

SURGE_API const char *surge_interface(void) { return SURGE_INTERFACE; }

/* One product, as the micro-kernels' driver sees it (one batch entry). */
typedef struct {
    int mode, planes;
    int64_t m, n, words, k_bits;
    const uint64_t *a; /* plane p of row i at a + i * lda + p * words */
    int64_t lda;
    const uint64_t *panels; /* ceil(n / 8) panels of words * 8 words */
    float *out;
    int64_t ldo;
    float scale;
    const float *col_scale, *bias; /* NULL: none (bias: this batch entry's) */
    const int32_t *row_term;       /* AND: sum_p 2^p popcount(a_p) per row */
    const int32_t *col_term;       /* AND with an offset: offset (2 popcount(b) - K) per column; else NULL */
} product;

/* One block: the MR A' rows `ap` (rows i.. of the product, `rows` of them real, their planes
 * consecutive) against the NP panels `bq` (columns j0.., `cols` of them real): popcounts, then the
 * epilogue into P->out. */
typedef void (*micro_fn)(const product *P, int mode, const uint64_t *const *ap, const uint64_t *const *bq,
                         int64_t i, int64_t rows, int64_t j0, int64_t cols);

INLINE uint64_t combine(const int mode, uint64_t a, uint64_t b) { return mode & MODE_AND ? (a & b) : (a ^ b); }

INLINE int32_t popcount_row(const uint64_t *row, int64_t words) {
    int32_t count = 0;
    for (int64_t w = 0; w < words; w++) count += __builtin_popcountll(row[w]);
    return count;
}

/* The block's outputs from its counts: planes summed with their weights, the mode's dot product,
 * then the scales in the simulated path's order. */
INLINE void block_epilogue(const product *P, int32_t counts[MR][NP_MAX * PANEL], int64_t i, int64_t rows,
                           int64_t j0, int64_t cols) {
    const int planes = P->planes;
    const float scale = P->scale;
    const float *restrict cs = P->col_scale ? P->col_scale + j0 : NULL;
    const float *restrict bias = P->bias ? P->bias + j0 : NULL;
    for (int64_t r = 0; r < rows; r++) {
        int32_t dot[NP_MAX * PANEL];
        int32_t base = P->mode == MODE_AND ? -P->row_term[i + r] : (int32_t)P->k_bits;
        int32_t step = P->mode == MODE_AND ? 2 : -2;
        for (int64_t j = 0; j < cols; j++) {
            int32_t c = 0;
            for (int p = 0; p < planes; p++) c += counts[r * planes + p][j] << p;
            dot[j] = base + step * c - (P->col_term ? P->col_term[j0 + j] : 0);
        }
        float *restrict o = P->out + (i + r) * P->ldo + j0;
        if (cs && bias)
            for (int64_t j = 0; j < cols; j++) o[j] = (float)dot[j] * scale * cs[j] + bias[j];
        else if (cs)
            for (int64_t j = 0; j < cols; j++) o[j] = (float)dot[j] * scale * cs[j];
        else if (bias)
            for (int64_t j = 0; j < cols; j++) o[j] = (float)dot[j] * scale + bias[j];
        else
            for (int64_t j = 0; j < cols; j++) o[j] = (float)dot[j] * scale;
    }
}

/* Rows [i0, i1) x panels [q0, q1): per group of NP panels (kept in L1), every block of rows. */
INLINE void run_blocks(const product *shared, const int mode, const int NP, const micro_fn micro,
                       int64_t i0, int64_t i1, int64_t q0, int64_t q1) {
    /* a local copy: the stores through `out` (intrinsics may alias anything) cannot reload its fields */
    const product local = *shared, *P = &local;
    const int planes = P->planes;
    const int64_t per_block = MR / planes, words = P->words;
    int64_t row_of[MR], plane_at[MR]; /* A' row r of a block: row r / planes of it, plane r % planes */
    for (int r = 0; r < MR; r++) row_of[r] = r / planes, plane_at[r] = (r % planes) * words;
    for (int64_t q = q0; q < q1; q += NP) {
        int64_t np = q1 - q < NP ? q1 - q : NP;
        const uint64_t *bq[NP_MAX];
        for (int x = 0; x < NP; x++) bq[x] = P->panels + (q + (x < np ? x : 0)) * words * PANEL; /* spare: discarded */
        int64_t cols = P->n - q * PANEL < np * PANEL ? P->n - q * PANEL : np * PANEL;
        for (int64_t i = i0; i < i1; i += per_block) {
            int64_t rows = i1 - i < per_block ? i1 - i : per_block;
            const uint64_t *ap[MR];
            for (int r = 0; r < MR; r++) /* spare rows repeat the first: discarded */
                ap[r] = P->a + (i + (row_of[r] < rows ? row_of[r] : 0)) * P->lda + plane_at[r];
            micro(P, mode, ap, bq, i, rows, q * PANEL, cols);
        }
    }
}

/* run_blocks with the mode and the epilogue's operands as constants: eight compiled combinations. */
#define DISPATCH(P, NP, micro, i0, i1, q0, q1)                                                        \
    switch ((P)->mode | ((P)->col_scale ? WITH_SCALE : 0) | ((P)->bias ? WITH_BIAS : 0)) {          \
    case 0: run_blocks(P, 0, NP, micro, i0, i1, q0, q1); break;                                       \
    case 1: run_blocks(P, 1, NP, micro, i0, i1, q0, q1); break;                                       \
    case 2: run_blocks(P, 2, NP, micro, i0, i1, q0, q1); break;                                       \
    case 3: run_blocks(P, 3, NP, micro, i0, i1, q0, q1); break;                                       \
    case 4: run_blocks(P, 4, NP, micro, i0, i1, q0, q1); break;                                       \
    case 5: run_blocks(P, 5, NP, micro, i0, i1, q0, q1); break;                                       \
    case 6: run_blocks(P, 6, NP, micro, i0, i1, q0, q1); break;                                       \
    default: run_blocks(P, 7, NP, micro, i0, i1, q0, q1);                                             \
    }

/* ------------------------------------------------------------------ generic (portable) */

INLINE void micro_generic(const product *P, const int mode, const uint64_t *const *ap, const uint64_t *const *bq,
                          int64_t i, int64_t rows, int64_t j0, int64_t cols) {
    int32_t counts[MR][NP_MAX * PANEL];
    for (int r = 0; r < MR; r++)
        for (int l = 0; l < PANEL; l++) {
            int32_t c = 0;
            for (int64_t w = 0; w < P->words; w++) c += __builtin_popcountll(combine(mode, ap[r][w], bq[0][w * PANEL + l]));
            counts[r][l] = c;
        }
    block_epilogue(P, counts, i, rows, j0, cols);
}

static void run_generic(const product *P, int64_t i0, int64_t i1, int64_t q0, int64_t q1) {
    if (P->mode == MODE_AND) run_blocks(P, MODE_AND, 1, micro_generic, i0, i1, q0, q1);
    else run_blocks(P, MODE_XOR, 1, micro_generic, i0, i1, q0, q1);
}

#ifdef SURGE_X86
/* ------------------------------------------------------------------ AVX2 (nibble lookup popcount) */
#define TARGET_AVX2 __attribute__((target("avx2,popcnt")))

TARGET_AVX2 static inline __m256i popcount_bytes_avx2(__m256i v) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(v, low);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

TARGET_AVX2 INLINE __m256i combine_avx2(const int mode, __m256i a, __m256i b) {
    return mode & MODE_AND ? _mm256_and_si256(a, b) : _mm256_xor_si256(a, b);
}

/* The epilogue of one panel of 8 columns (those before `end` written), in vectors: `count[r]` holds
 * the 8 counts of A' row r; the planes of each real row are summed with their weights (a switch, so
 * that the indices are constants and the counts stay in registers), then the scales in the scalar
 * epilogue's order. Masked loads and stores only at the last panel of a row. */
TARGET_AVX2 INLINE void store_row8(const product *P, const int mode, __m256i c, int64_t i, int64_t j, int64_t end) {
    __m256i dot;
    if (mode & MODE_AND) {
        dot = _mm256_sub_epi32(_mm256_slli_epi32(c, 1), _mm256_set1_epi32(P->row_term[i]));
        if (P->col_term) dot = _mm256_sub_epi32(dot, _mm256_loadu_si256((const __m256i *)(P->col_term + j))); /* padded to whole panels */
    } else {
        dot = _mm256_sub_epi32(_mm256_set1_epi32((int32_t)P->k_bits), _mm256_slli_epi32(c, 1));
    }
    __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(P->scale));
    float *o = P->out + i * P->ldo + j;
    if (end - j >= 8) {
        if (mode & WITH_SCALE) f = _mm256_mul_ps(f, _mm256_loadu_ps(P->col_scale + j));
        if (mode & WITH_BIAS) f = _mm256_add_ps(f, _mm256_loadu_ps(P->bias + j));
        _mm256_storeu_ps(o, f);
    } else {
        __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)(end - j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        if (mode & WITH_SCALE) f = _mm256_mul_ps(f, _mm256_maskload_ps(P->col_scale + j, valid));
        if (mode & WITH_BIAS) f = _mm256_add_ps(f, _mm256_maskload_ps(P->bias + j, valid));
        _mm256_maskstore_ps(o, valid, f);
    }
}

TARGET_AVX2 INLINE void store_panel(const product *P, const int mode, __m256i count[MR], int64_t i, int64_t rows,
                                    int64_t j, int64_t end) {
    switch (P->planes) {
    case 1:
        for (int r = 0; r < MR; r++)
            if (r < rows) store_row8(P, mode, count[r], i + r, j, end);
        break;
    case 2:
        for (int r = 0; r < MR / 2; r++)
            if (r < rows) store_row8(P, mode, _mm256_add_epi32(count[2 * r], _mm256_slli_epi32(count[2 * r + 1], 1)), i + r, j, end);
        break;
    default: /* 4 */
        store_row8(P, mode, _mm256_add_epi32(_mm256_add_epi32(count[0], _mm256_slli_epi32(count[1], 1)),
                                             _mm256_add_epi32(_mm256_slli_epi32(count[2], 2), _mm256_slli_epi32(count[3], 3))), i, j, end);
    }
}

/* MR rows x one panel (two 4-lane halves). Byte counters absorb up to 31 words (31 * 8 < 256)
 * before SAD widens them into each 64-bit lane's total: one add per product in the inner loop. */
TARGET_AVX2 INLINE void micro_avx2(const product *P, const int mode, const uint64_t *const *ap, const uint64_t *const *bq,
                                   int64_t i, int64_t rows, int64_t j0, int64_t cols) {
    const int64_t words = P->words;
    const __m256i zero = _mm256_setzero_si256();
    __m256i total[MR][2];
    for (int r = 0; r < MR; r++) total[r][0] = total[r][1] = zero;
    for (int64_t w = 0; w < words;) {
        int64_t stop = words - w < 31 ? words : w + 31;
        __m256i c[MR][2];
        for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = zero;
        for (; w < stop; w++) {
            __m256i b0 = _mm256_loadu_si256((const __m256i *)(bq[0] + w * PANEL));
            __m256i b1 = _mm256_loadu_si256((const __m256i *)(bq[0] + w * PANEL + 4));
            for (int r = 0; r < MR; r++) {
                __m256i a = _mm256_set1_epi64x((long long)ap[r][w]);
                c[r][0] = _mm256_add_epi8(c[r][0], popcount_bytes_avx2(combine_avx2(mode, a, b0)));
                c[r][1] = _mm256_add_epi8(c[r][1], popcount_bytes_avx2(combine_avx2(mode, a, b1)));
            }
        }
        for (int r = 0; r < MR; r++) {
            total[r][0] = _mm256_add_epi64(total[r][0], _mm256_sad_epu8(c[r][0], zero));
            total[r][1] = _mm256_add_epi64(total[r][1], _mm256_sad_epu8(c[r][1], zero));
        }
    }
    /* totals < 2^31: the low halves of the 64-bit lanes, both halves of the panel in one vector */
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    __m256i count[MR];
    for (int r = 0; r < MR; r++)
        count[r] = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(total[r][0], pick),
                                             _mm256_permutevar8x32_epi32(total[r][1], pick), 0x20);
    store_panel(P, mode, count, i, rows, j0, j0 + cols);
}

/* Harley-Seal: per pair of words a carry-save adder folds both products into `ones` and a carry
 * vector `twos`, and only the carries are counted (weight 2): 2 combines + 5 logic ops + one nibble
 * popcount per two words instead of two popcounts. One half-panel (4 lanes) at a time, so that the
 * MR x (ones, byte counts) state stays in registers. Measured on Zen 5 against micro_avx2 (2 threads):
 * 5-12% faster at K = 3072, 2-8% slower at K = 768; so it runs from HARLEY_SEAL_WORDS on. */
#define HARLEY_SEAL_WORDS 32
TARGET_AVX2 INLINE void micro_avx2_hs(const product *P, const int mode, const uint64_t *const *ap, const uint64_t *const *bq,
                                      int64_t i, int64_t rows, int64_t j0, int64_t cols) {
    const int64_t words = P->words;
    const __m256i zero = _mm256_setzero_si256();
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    __m128i half_counts[MR][2];
    for (int h = 0; h < 2; h++) {
        __m256i ones[MR], total[MR];
        for (int r = 0; r < MR; r++) ones[r] = total[r] = zero;
        int64_t w = 0;
        while (w + 1 < words) {
            int64_t stop = words - w < 62 ? words - 1 : w + 62; /* 31 pairs: byte counts below 256 */
            __m256i c[MR];
            for (int r = 0; r < MR; r++) c[r] = zero;
            for (; w < stop; w += 2) {
                __m256i b0 = _mm256_loadu_si256((const __m256i *)(bq[0] + w * PANEL + 4 * h));
                __m256i b1 = _mm256_loadu_si256((const __m256i *)(bq[0] + (w + 1) * PANEL + 4 * h));
                for (int r = 0; r < MR; r++) {
                    __m256i x0 = combine_avx2(mode, _mm256_set1_epi64x((long long)ap[r][w]), b0);
                    __m256i x1 = combine_avx2(mode, _mm256_set1_epi64x((long long)ap[r][w + 1]), b1);
                    __m256i u = _mm256_xor_si256(ones[r], x0);
                    __m256i twos = _mm256_or_si256(_mm256_and_si256(ones[r], x0), _mm256_and_si256(u, x1));
                    ones[r] = _mm256_xor_si256(u, x1);
                    c[r] = _mm256_add_epi8(c[r], popcount_bytes_avx2(twos));
                }
            }
            for (int r = 0; r < MR; r++) total[r] = _mm256_add_epi64(total[r], _mm256_sad_epu8(c[r], zero));
        }
        for (int r = 0; r < MR; r++) {
            __m256i rest = ones[r];
            if (w < words) { /* an odd last word: counted directly */
                __m256i b = _mm256_loadu_si256((const __m256i *)(bq[0] + w * PANEL + 4 * h));
                rest = _mm256_add_epi8(popcount_bytes_avx2(rest),
                                       popcount_bytes_avx2(combine_avx2(mode, _mm256_set1_epi64x((long long)ap[r][w]), b)));
            } else {
                rest = popcount_bytes_avx2(rest);
            }
            __m256i count = _mm256_add_epi64(_mm256_slli_epi64(total[r], 1), _mm256_sad_epu8(rest, zero));
            half_counts[r][h] = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(count, pick));
        }
    }
    __m256i count[MR];
    for (int r = 0; r < MR; r++) count[r] = _mm256_set_m128i(half_counts[r][1], half_counts[r][0]);
    store_panel(P, mode, count, i, rows, j0, j0 + cols);
}

TARGET_AVX2 static void run_avx2(const product *P, int64_t i0, int64_t i1, int64_t q0, int64_t q1) {
    if (P->words >= HARLEY_SEAL_WORDS) DISPATCH(P, 1, micro_avx2_hs, i0, i1, q0, q1)
    else DISPATCH(P, 1, micro_avx2, i0, i1, q0, q1)
}

/* ------------------------------------------------------------------ AVX-512 VPOPCNTDQ */
#define TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512vpopcntdq,avx2,popcnt")))
#define NP_AVX512 4

TARGET_AVX512 INLINE __m512i combine_avx512(const int mode, __m512i a, __m512i b) {
    return mode & MODE_AND ? _mm512_and_si512(a, b) : _mm512_xor_si512(a, b);
}

/* Two panels' 64-bit counts -> 16 int32 lanes (counts < 2^31). */
TARGET_AVX512 INLINE __m512i counts16(__m512i low, __m512i high) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(low)), _mm512_cvtepi64_epi32(high), 1);
}

TARGET_AVX512 INLINE __m512i planes4_avx512(__m512i p0, __m512i p1, __m512i p2, __m512i p3) {
    return _mm512_add_epi64(_mm512_add_epi64(p0, _mm512_slli_epi64(p1, 1)),
                            _mm512_add_epi64(_mm512_slli_epi64(p2, 2), _mm512_slli_epi64(p3, 3)));
}

/* The epilogue of 16 columns of row i (those before `end` written): store_row8's arithmetic, 16 lanes
 * wide, with mask registers at the last columns. */
TARGET_AVX512 INLINE void store16_avx512(const product *P, const int mode, __m512i c, int64_t i, int64_t j, int64_t end) {
    const __mmask16 valid = end - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (end - j)) - 1u);
    __m512i dot;
    if (mode & MODE_AND) {
        dot = _mm512_sub_epi32(_mm512_slli_epi32(c, 1), _mm512_set1_epi32(P->row_term[i]));
        if (P->col_term) dot = _mm512_sub_epi32(dot, _mm512_maskz_loadu_epi32(valid, P->col_term + j));
    } else {
        dot = _mm512_sub_epi32(_mm512_set1_epi32((int32_t)P->k_bits), _mm512_slli_epi32(c, 1));
    }
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(P->scale));
    if (mode & WITH_SCALE) f = _mm512_mul_ps(f, _mm512_maskz_loadu_ps(valid, P->col_scale + j));
    if (mode & WITH_BIAS) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(valid, P->bias + j));
    _mm512_mask_storeu_ps(P->out + i * P->ldo + j, valid, f);
}

/* MR rows x 4 panels: 16 accumulators of 8 outputs; per word 4 panel loads, and per product one
 * broadcast-combine, one VPOPCNTQ and one add (the same three operations as the peak). */
TARGET_AVX512 INLINE void micro_avx512(const product *P, const int mode, const uint64_t *const *ap, const uint64_t *const *bq,
                                       int64_t i, int64_t rows, int64_t j0, int64_t cols) {
    const int64_t words = P->words;
    __m512i acc[MR][NP_AVX512];
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < NP_AVX512; q++) acc[r][q] = _mm512_setzero_si512();
    for (int64_t w = 0; w < words; w++) {
        __m512i b[NP_AVX512];
        for (int q = 0; q < NP_AVX512; q++) b[q] = _mm512_loadu_si512(bq[q] + w * PANEL);
        for (int r = 0; r < MR; r++) {
            __m512i a = _mm512_set1_epi64((long long)ap[r][w]);
            for (int q = 0; q < NP_AVX512; q++)
                acc[r][q] = _mm512_add_epi64(acc[r][q], _mm512_popcnt_epi64(combine_avx512(mode, a, b[q])));
        }
    }
    if (P->planes == 1 && rows == MR && cols == NP_AVX512 * PANEL) { /* the common full block: straight-line */
        for (int r = 0; r < MR; r++)
            for (int q = 0; q < NP_AVX512; q += 2)
                store16_avx512(P, mode, counts16(acc[r][q], acc[r][q + 1]), i + r, j0 + q * PANEL, j0 + cols);
        return;
    }
    /* two panels per 16-lane vector; the planes of a real row summed with their weights in 64 bits */
    for (int q = 0; q < NP_AVX512; q += 2) {
        if (q * PANEL >= cols) break;
        switch (P->planes) {
        case 1:
            for (int r = 0; r < MR; r++)
                if (r < rows) store16_avx512(P, mode, counts16(acc[r][q], acc[r][q + 1]), i + r, j0 + q * PANEL, j0 + cols);
            break;
        case 2:
            for (int r = 0; r < MR / 2; r++)
                if (r < rows)
                    store16_avx512(P, mode, counts16(_mm512_add_epi64(acc[2 * r][q], _mm512_slli_epi64(acc[2 * r + 1][q], 1)),
                                                     _mm512_add_epi64(acc[2 * r][q + 1], _mm512_slli_epi64(acc[2 * r + 1][q + 1], 1))),
                                   i + r, j0 + q * PANEL, j0 + cols);
            break;
        default: /* 4 */
            store16_avx512(P, mode, counts16(planes4_avx512(acc[0][q], acc[1][q], acc[2][q], acc[3][q]),
                                             planes4_avx512(acc[0][q + 1], acc[1][q + 1], acc[2][q + 1], acc[3][q + 1])),
                           i, j0 + q * PANEL, j0 + cols);
        }
    }
}

TARGET_AVX512 static void run_avx512(const product *P, int64_t i0, int64_t i1, int64_t q0, int64_t q1) {
    DISPATCH(P, NP_AVX512, micro_avx512, i0, i1, q0, q1)
}
#endif /* SURGE_X86 */

/* ------------------------------------------------------------------ dispatch */

static int variant_supported(int variant) {
    if (variant == VARIANT_GENERIC) return 1;
#ifdef SURGE_X86
    __builtin_cpu_init();
    if (variant == VARIANT_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    if (variant == VARIANT_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#endif
    return 0;
}

static int best_variant(void) {
    for (int v = VARIANT_AVX512; v > VARIANT_GENERIC; v--)
        if (variant_supported(v)) return v;
    return VARIANT_GENERIC;
}

static int active_variant = -1;
static int forced_variant = -1; /* a variant set explicitly (the tests force each one); -1: automatic */

SURGE_API int surge_variant_supported(int variant) { return variant_supported(variant); }

/* Select a variant, forced (-1: automatic, the best this CPU supports). Returns the active
 * variant, or -1 if unsupported. */
SURGE_API int surge_set_variant(int variant) {
    int chosen = variant < 0 ? best_variant() : variant;
    if (!variant_supported(chosen)) return -1;
    active_variant = chosen;
    forced_variant = variant < 0 ? -1 : variant;
    return chosen;
}

SURGE_API int surge_forced_variant(void) { return forced_variant; }

SURGE_API int surge_active_variant(void) {
    if (active_variant < 0) active_variant = best_variant();
    return active_variant;
}

typedef void (*run_fn)(const product *P, int64_t i0, int64_t i1, int64_t q0, int64_t q1);

static run_fn current_run(void) {
#ifdef SURGE_X86
    switch (surge_active_variant()) {
    case VARIANT_AVX512: return run_avx512;
    case VARIANT_AVX2: return run_avx2;
    default: break;
    }
#endif
    return run_generic;
}

/* Packing a word costs as much as ~256 word products (64 floats in, compared, gathered into bits). */
#define PACK_WORD_WORK 256

static int thread_count(int requested, int64_t work) {
    /* Below ~64k word products a thread team costs more than it saves. */
    if (requested < 1 || work < 65536) return 1;
    return requested;
}

/* ------------------------------------------------------------------ the binary peak */

/* XOR + popcount + accumulate over L1-resident words and nothing else (no epilogue, no packing, no
 * cache misses): the ceiling a binary product can reach with the active variant's popcount. As in the
 * matmul's micro-kernels, each loaded word of b meets four words held in registers, so loads do not
 * bound it. Counts reps * sum_w sum_{r<4} popcount(a[8r + w % 8] ^ b[w]): four products per word of b. */
static uint64_t peak_generic(const uint64_t *a, const uint64_t *b, int64_t words, int64_t reps) {
    uint64_t s[4] = {0, 0, 0, 0};
    for (int64_t r = 0; r < reps; r++)
        for (int64_t w = 0; w < words; w++)
            for (int i = 0; i < 4; i++) s[i] += (uint64_t)__builtin_popcountll(a[8 * i + w % 8] ^ b[w]);
    return s[0] + s[1] + s[2] + s[3];
}

#ifdef SURGE_X86
TARGET_AVX2 static uint64_t peak_avx2(const uint64_t *a, const uint64_t *b, int64_t words, int64_t reps) {
    /* as the matmul's inner loop: nibble-lookup byte counts, widened with SAD every 15 steps of 16 */
    const __m256i zero = _mm256_setzero_si256();
    __m256i lo[4], hi[4], total = zero;
    for (int i = 0; i < 4; i++) {
        lo[i] = _mm256_loadu_si256((const __m256i *)(a + 8 * i));
        hi[i] = _mm256_loadu_si256((const __m256i *)(a + 8 * i + 4));
    }
    for (int64_t r = 0; r < reps; r++)
        for (int64_t w = 0; w < words;) {
            int64_t stop = words - w < 15 * 8 ? words : w + 15 * 8;
            __m256i c[4] = {zero, zero, zero, zero};
            for (; w < stop; w += 8) {
                __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + w)), b1 = _mm256_loadu_si256((const __m256i *)(b + w + 4));
                for (int i = 0; i < 4; i++)
                    c[i] = _mm256_add_epi8(_mm256_add_epi8(c[i], popcount_bytes_avx2(_mm256_xor_si256(lo[i], b0))),
                                           popcount_bytes_avx2(_mm256_xor_si256(hi[i], b1)));
            }
            for (int i = 0; i < 4; i++) total = _mm256_add_epi64(total, _mm256_sad_epu8(c[i], zero));
        }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, total);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

TARGET_AVX512 static uint64_t peak_avx512(const uint64_t *a, const uint64_t *b, int64_t words, int64_t reps) {
    __m512i va[4], s[8];
    for (int i = 0; i < 4; i++) va[i] = _mm512_loadu_si512(a + 8 * i);
    for (int i = 0; i < 8; i++) s[i] = _mm512_setzero_si512();
    for (int64_t r = 0; r < reps; r++)
        for (int64_t w = 0; w < words; w += 16) {
            __m512i b0 = _mm512_loadu_si512(b + w), b1 = _mm512_loadu_si512(b + w + 8);
            for (int i = 0; i < 4; i++) {
                s[i] = _mm512_add_epi64(s[i], _mm512_popcnt_epi64(_mm512_xor_si512(va[i], b0)));
                s[4 + i] = _mm512_add_epi64(s[4 + i], _mm512_popcnt_epi64(_mm512_xor_si512(va[i], b1)));
            }
        }
    for (int i = 1; i < 8; i++) s[0] = _mm512_add_epi64(s[0], s[i]);
    return (uint64_t)_mm512_reduce_add_epi64(s[0]);
}
#endif

/* `words` (a multiple of 32, L1-sized) words of b against the first 32 of a, `reps` passes on each of `threads` threads
 * (each its own copy of the passes); returns the set bits counted over all threads. */
SURGE_API int64_t surge_peak_xor_popcount(const uint64_t *a, const uint64_t *b, int64_t words, int64_t reps, int threads) {
    int variant = surge_active_variant();
    uint64_t total = 0;
    int nt = threads < 1 ? 1 : threads;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : total) if (nt > 1)
    for (int t = 0; t < nt; t++) {
#ifdef SURGE_X86
        if (variant == VARIANT_AVX512) total += peak_avx512(a, b, words, reps);
        else if (variant == VARIANT_AVX2) total += peak_avx2(a, b, words, reps);
        else
#endif
            total += peak_generic(a, b, words, reps);
    }
    (void)variant;
    return (int64_t)total;
}

/* ------------------------------------------------------------------ binary matmul */

/* B rows (row stride ldb words) -> panels: panel q, word w, lane l = row 8q + l (0 past n). */
static void lay_out_panel(const uint64_t *b, int64_t n, int64_t words, int64_t ldb, int64_t q, uint64_t *panel) {
    for (int64_t w = 0; w < words; w++)
        for (int l = 0; l < PANEL; l++) {
            int64_t row = q * PANEL + l;
            panel[w * PANEL + l] = row < n ? b[row * ldb + w] : 0;
        }
}

SURGE_API void surge_weight_panels(const uint64_t *b, int64_t n, int64_t words, int64_t ldb, uint64_t *panels) {
    for (int64_t q = 0; q < (n + PANEL - 1) / PANEL; q++) lay_out_panel(b, n, words, ldb, q, panels + q * words * PANEL);
}

/* out[g1, g2, i, j] = dot(a[g1, g2, i, :], b[g1, g2, j, :]) * scale * col_scale[j] + bias[g1, g2, j]
 * a: uint64 rows of `planes` planes of `words` words, strides in words (batch g1, batch g2, row);
 * b: rows with strides (b_s1, b_s2, ldb), or with b_panels the panel layout (batch strides in words,
 * ldb unused); out: float strides in elements. col_scale and bias may be NULL; bias has batch
 * strides bias_s1, bias_s2 (0: one vector for all; an additive attention mask over the keys is one
 * per sequence). k_bits: the true reduction length. planes: 1, 2 or 4 (AND mode for more than one);
 * offset: see the header. Returns 0, or -1 when the scratch buffers could not be allocated. */
SURGE_API int surge_binary_matmul(int mode, int planes, int offset, const uint64_t *a, const uint64_t *b, int b_panels,
                                   float *out, int64_t g1, int64_t g2, int64_t m, int64_t n, int64_t words, int64_t k_bits,
                                   int64_t a_s1, int64_t a_s2, int64_t lda,
                                   int64_t b_s1, int64_t b_s2, int64_t ldb,
                                   int64_t o_s1, int64_t o_s2, int64_t ldo,
                                   float scale, const float *col_scale, const float *bias, int64_t bias_s1,
                                   int64_t bias_s2, int threads) {
    run_fn run = current_run();
    const int64_t groups = g1 * g2, n_panels = (n + PANEL - 1) / PANEL, panel_words = n_panels * words * PANEL;
    uint64_t *laid_out = b_panels ? NULL : malloc((size_t)(groups * panel_words) * sizeof(uint64_t) + 1);
    int32_t *row_term = mode == MODE_AND ? malloc((size_t)(groups * m) * sizeof(int32_t) + 1) : NULL;
    int32_t *col_term = mode == MODE_AND && offset ? malloc((size_t)(groups * n_panels * PANEL) * sizeof(int32_t) + 1) : NULL;
    if ((!b_panels && !laid_out) || (mode == MODE_AND && !row_term) || (mode == MODE_AND && offset && !col_term)) {
        free(laid_out), free(row_term), free(col_term);
        return -1; /* out of memory for the operands' layout: the caller raises MemoryError */
    }
    /* Tasks: blocks of A rows (L1-sized) x blocks of panels; threads split the dimension with more
     * blocks, each taking a contiguous run of tasks, so that a thread keeps one side in cache. */
    const int64_t per_block = MR / planes;
    int64_t block_rows = A_BLOCK_BYTES(planes) / (planes * (words > 0 ? words : 1) * 8);
    block_rows = block_rows < per_block ? per_block : block_rows > 512 ? 512 : block_rows - block_rows % per_block;
    const int64_t m_blocks = (m + block_rows - 1) / block_rows, n_blocks = (n_panels + B_BLOCK_PANELS - 1) / B_BLOCK_PANELS;
    const int split_n = n_blocks > m_blocks;
    const int64_t tasks = groups * m_blocks * n_blocks;
    int nt = thread_count(threads, groups * m * n * planes * (words > 0 ? words : 1));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        if (laid_out) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < groups * n_panels; t++) {
                int64_t g = t / n_panels, q = t % n_panels;
                lay_out_panel(b + (g / g2) * b_s1 + (g % g2) * b_s2, n, words, ldb, q, laid_out + g * panel_words + q * words * PANEL);
            }
        }
        if (row_term) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < groups * m; t++) {
                int64_t g = t / m, i = t % m;
                const uint64_t *row = a + (g / g2) * a_s1 + (g % g2) * a_s2 + i * lda;
                int32_t term = 0;
                for (int p = 0; p < planes; p++) term += popcount_row(row + p * words, words) << p;
                row_term[t] = term;
            }
        }
        if (col_term) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < groups * n_panels * PANEL; t++) {
                int64_t g = t / (n_panels * PANEL), j = t % (n_panels * PANEL);
                const uint64_t *panel = (laid_out ? laid_out + g * panel_words : b + (g / g2) * b_s1 + (g % g2) * b_s2)
                                        + (j / PANEL) * words * PANEL;
                int32_t ones = 0;
                for (int64_t w = 0; w < words; w++) ones += __builtin_popcountll(panel[w * PANEL + j % PANEL]);
                col_term[t] = offset * (2 * ones - (int32_t)k_bits);
            }
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t g = t / (m_blocks * n_blocks), rest = t % (m_blocks * n_blocks);
            int64_t mb = split_n ? rest % m_blocks : rest / n_blocks, nb = split_n ? rest / m_blocks : rest % n_blocks;
            product P = {
                .mode = mode, .planes = planes, .m = m, .n = n, .words = words, .k_bits = k_bits,
                .a = a + (g / g2) * a_s1 + (g % g2) * a_s2, .lda = lda,
                .panels = laid_out ? laid_out + g * panel_words : b + (g / g2) * b_s1 + (g % g2) * b_s2,
                .out = out + (g / g2) * o_s1 + (g % g2) * o_s2, .ldo = ldo,
                .scale = scale, .col_scale = col_scale, .bias = bias ? bias + (g / g2) * bias_s1 + (g % g2) * bias_s2 : NULL,
                .row_term = row_term ? row_term + g * m : NULL,
                .col_term = col_term ? col_term + g * n_panels * PANEL : NULL,
            };
            int64_t i0 = mb * block_rows, i1 = i0 + block_rows < m ? i0 + block_rows : m;
            int64_t q0 = nb * B_BLOCK_PANELS, q1 = q0 + B_BLOCK_PANELS < n_panels ? q0 + B_BLOCK_PANELS : n_panels;
            run(&P, i0, i1, q0, q1);
        }
    }
    free(laid_out);
    free(row_term);
    free(col_term);
    return 0;
}

/* ------------------------------------------------------------------ packed embedding rows */

#ifdef SURGE_X86
TARGET_AVX2 static void expand_row_avx2(const uint8_t *row, float s, int64_t columns, float *o) {
    const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 plus = _mm256_set1_ps(s), minus = _mm256_set1_ps(-s);
    int64_t j = 0;
    for (; j + 8 <= columns; j += 8) {
        __m256i bit = _mm256_and_si256(_mm256_set1_epi32(row[j >> 3]), select);
        _mm256_storeu_ps(o + j, _mm256_blendv_ps(minus, plus, _mm256_castsi256_ps(_mm256_cmpeq_epi32(bit, select))));
    }
    for (; j < columns; j++) o[j] = (row[j >> 3] >> (j & 7)) & 1 ? s : -s;
}
#endif

/* out[t, :] = scales[ids[t]] * (+1 / -1) of the packed uint8 row ids[t] (8 signs per byte, least
 * significant bit first): the looked-up rows of a 1-bit embedding, as unpack_binary_weight computes
 * them (+-s exactly). A negative id counts from the end, as torch indexing does. Returns the first
 * out-of-range position, or -1. */
SURGE_API int surge_gather_signs(const uint8_t *packed, int64_t rows, int64_t row_bytes, int64_t columns,
                                 const int64_t *ids, int64_t count, const float *scales, float *out, int threads) {
    for (int64_t t = 0; t < count; t++)
        if (ids[t] < -rows || ids[t] >= rows) return (int)(t < 0x7fffffff ? t : 0x7fffffff);
    int nt = thread_count(threads, count * columns);
    int vector = surge_active_variant() != VARIANT_GENERIC;
    (void)vector;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < count; t++) {
        int64_t id = ids[t] < 0 ? ids[t] + rows : ids[t];
        const uint8_t *row = packed + id * row_bytes;
        float s = scales[id], *o = out + t * columns;
#ifdef SURGE_X86
        if (vector) {
            expand_row_avx2(row, s, columns, o);
            continue;
        }
#endif
        for (int64_t j = 0; j < columns; j++) o[j] = (row[j >> 3] >> (j & 7)) & 1 ? s : -s;
    }
    return -1;
}

/* ------------------------------------------------------------------ packing */

/* Offset of row r of a 3-D grid of rows (n0 x n1 x n2, row-major) in a tensor with strides s0, s1, s2. */
INLINE int64_t row_offset(int64_t r, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2) {
    return (r / (n1 * n2)) * s0 + ((r / n2) % n1) * s1 + (r % n2) * s2;
}

/* Round half to even of |v| < 2^22 in the default rounding mode, as torch.round (no libm). */
INLINE float round_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic;
}

/* The quantizer's code of one element: round(clamp((x - beta) / alpha, lo, hi)) + offset, in
 * torch's order (clamp, then round), 0 where masked. */
INLINE uint32_t level_code(float x, float beta, float alpha, float lo, float hi, int offset, int keep) {
    float u = (x - beta) / alpha;
    u = u < lo ? lo : u > hi ? hi : u;
    return keep ? (uint32_t)((int32_t)round_even(u) + offset) : 0u;
}

#ifdef SURGE_X86
/* Contiguous rows (unit strides), eight lanes at a time. The sign of (x - beta) / alpha is the sign
 * of x - beta for alpha > 0, except where the quotient underflows to -0 (which counts as +1): those
 * rows of eight are divided as the simulated quantizer does. */
TARGET_AVX2 static void pack_signs_row_avx2(const float *xr, const float *br, int64_t bk, float alpha,
                                            int64_t k, uint64_t *o, int64_t words) {
    const __m256 va = _mm256_set1_ps(alpha), zero = _mm256_setzero_ps();
    const __m256 near = _mm256_set1_ps(-(float)((double)alpha * 0x1p-100)); /* quotients of x - beta above this may underflow */
    for (int64_t w = 0; w < words; w++) {
        uint64_t word = 0;
        int64_t base = w * 64, count = k - base < 64 ? k - base : 64, j = 0;
        for (; j + 8 <= count; j += 8) {
            __m256 vb = bk ? _mm256_loadu_ps(br + base + j) : _mm256_set1_ps(br[0]);
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + base + j), vb);
            __m256 bit = _mm256_cmp_ps(d, zero, _CMP_GE_OQ);
            if (_mm256_movemask_ps(_mm256_andnot_ps(bit, _mm256_cmp_ps(d, near, _CMP_GT_OQ))))
                bit = _mm256_cmp_ps(_mm256_div_ps(d, va), zero, _CMP_GE_OQ);
            word |= (uint64_t)(uint32_t)_mm256_movemask_ps(bit) << j;
        }
        for (; j < count; j++) {
            float u = (xr[base + j] - br[(base + j) * bk]) / alpha;
            word |= (uint64_t)(u >= 0.0f) << j;
        }
        o[w] = word;
    }
}

/* Eight rows at once whose elements are adjacent across rows and strided along the reduction
 * (V packed along the tokens: rows = channels): per element of the reduction, one vector of the
 * eight rows' signs, kept as a byte; then each row's 64 bits gathered from the bytes' bit planes. */
TARGET_AVX2 static void pack_signs_8rows_avx2(const float *x, int64_t sk, const float *beta, int64_t b_row, float alpha,
                                              int64_t k, uint64_t *o, int64_t words) {
    const __m256 va = _mm256_set1_ps(alpha), zero = _mm256_setzero_ps();
    const __m256 near = _mm256_set1_ps(-(float)((double)alpha * 0x1p-100));
    const __m256 vb = b_row ? _mm256_loadu_ps(beta) : _mm256_set1_ps(beta[0]);
    for (int64_t w = 0; w < words; w++) {
        uint8_t signs[64] = {0};
        int64_t base = w * 64, count = k - base < 64 ? k - base : 64;
        for (int64_t j = 0; j < count; j++) {
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + (base + j) * sk), vb);
            __m256 bit = _mm256_cmp_ps(d, zero, _CMP_GE_OQ);
            if (_mm256_movemask_ps(_mm256_andnot_ps(bit, _mm256_cmp_ps(d, near, _CMP_GT_OQ))))
                bit = _mm256_cmp_ps(_mm256_div_ps(d, va), zero, _CMP_GE_OQ);
            signs[j] = (uint8_t)_mm256_movemask_ps(bit);
        }
        __m256i lo = _mm256_loadu_si256((const __m256i *)signs), hi = _mm256_loadu_si256((const __m256i *)(signs + 32));
        for (int row = 0; row < 8; row++) { /* bit `row` of each byte to its top bit, then the bytes' top bits */
            __m128i shift = _mm_cvtsi32_si128(7 - row);
            uint64_t low = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(lo, shift));
            uint64_t high = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(hi, shift));
            o[row * words + w] = low | high << 32;
        }
    }
}

/* The unsigned 1-bit quantizer, bit = (x - beta) / alpha > 0.5: x - beta compared with alpha / 2
 * outside a band of relative width 2^-20 around it (where the rounded quotient cannot be on the
 * other side), divided as the quantizer does inside the band. For 2^-100 <= alpha < 2^100. */
TARGET_AVX2 static void pack_unsigned_bits_row_avx2(const float *xr, const float *br, int64_t bk, const float *mr,
                                                    float mask_floor, float alpha, int64_t k, uint64_t *o, int64_t words) {
    const __m256 va = _mm256_set1_ps(alpha), half = _mm256_set1_ps(0.5f), floor = _mm256_set1_ps(mask_floor);
    const __m256 above = _mm256_set1_ps((float)(0.5 * alpha * (1.0 + 0x1p-20)));
    const __m256 below = _mm256_set1_ps((float)(0.5 * alpha * (1.0 - 0x1p-20)));
    for (int64_t w = 0; w < words; w++) {
        uint64_t word = 0;
        int64_t base = w * 64, count = k - base < 64 ? k - base : 64, j = 0;
        for (; j + 8 <= count; j += 8) {
            __m256 vb = bk ? _mm256_loadu_ps(br + base + j) : _mm256_set1_ps(br[0]);
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + base + j), vb);
            __m256 bit = _mm256_cmp_ps(d, above, _CMP_GT_OQ);
            if (_mm256_movemask_ps(_mm256_andnot_ps(bit, _mm256_cmp_ps(d, below, _CMP_NLT_UQ)))) /* in the band, or NaN */
                bit = _mm256_cmp_ps(_mm256_div_ps(d, va), half, _CMP_GT_OQ);
            if (mr) bit = _mm256_and_ps(bit, _mm256_cmp_ps(_mm256_loadu_ps(mr + base + j), floor, _CMP_NLE_UQ));
            word |= (uint64_t)(uint32_t)_mm256_movemask_ps(bit) << j;
        }
        for (; j < count; j++)
            word |= (uint64_t)level_code(xr[base + j], br[(base + j) * bk], alpha, 0.0f, 1.0f, 0, mr ? !(mr[base + j] <= mask_floor) : 1) << j;
        o[w] = word;
    }
}

TARGET_AVX2 static void pack_levels_row_avx2(const float *xr, const float *br, int64_t bk, const float *mr,
                                             float mask_floor, float alpha, float lo, float hi, int offset, int planes,
                                             int64_t k, uint64_t *o, int64_t words) {
    const __m256 va = _mm256_set1_ps(alpha), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    const __m256 floor = _mm256_set1_ps(mask_floor);
    const __m256i voffset = _mm256_set1_epi32(offset);
    for (int64_t w = 0; w < words; w++) {
        uint64_t plane_words[8] = {0};
        int64_t base = w * 64, count = k - base < 64 ? k - base : 64, j = 0;
        for (; j + 8 <= count; j += 8) {
            __m256 vb = bk ? _mm256_loadu_ps(br + base + j) : _mm256_set1_ps(br[0]);
            __m256 u = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + base + j), vb), va);
            u = _mm256_min_ps(_mm256_max_ps(u, vlo), vhi);
            __m256i code = _mm256_add_epi32(_mm256_cvttps_epi32(_mm256_round_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), voffset);
            if (mr) code = _mm256_and_si256(code, _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(mr + base + j), floor, _CMP_NLE_UQ)));
            for (int p = 0; p < planes; p++)
                plane_words[p] |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_sll_epi32(code, _mm_cvtsi32_si128(31 - p)))) << j;
        }
        for (; j < count; j++) {
            uint32_t code = level_code(xr[base + j], br[(base + j) * bk], alpha, lo, hi, offset, mr ? !(mr[base + j] <= mask_floor) : 1);
            for (int p = 0; p < planes; p++) plane_words[p] |= (uint64_t)((code >> p) & 1u) << j;
        }
        for (int p = 0; p < planes; p++) o[p * words + w] = plane_words[p];
    }
}
#endif

/* Bits of the quantizer's 1-bit signed output: bit = ((x - beta) / alpha >= 0), as the simulated
 * quantizer computes it (so a quotient that underflows to -0 still gives +1).
 * x and beta: 4-D strided (rows n0 x n1 x n2, reduction k); out: contiguous (n0, n1, n2, words). */
SURGE_API void surge_pack_signs(const float *x, int64_t n0, int64_t n1, int64_t n2, int64_t k,
                                int64_t s0, int64_t s1, int64_t s2, int64_t sk,
                                const float *beta, int64_t b0, int64_t b1, int64_t b2, int64_t bk,
                                float alpha, uint64_t *out, int64_t words, int threads) {
    int vector = surge_active_variant() != VARIANT_GENERIC && alpha > 0.0f && alpha < __builtin_inff();
    /* rows adjacent in memory, reduction strided (V along the tokens): eight rows at a time */
    int across = vector && sk != 1 && s2 == 1 && bk == 0 && (b2 == 0 || b2 == 1);
    int64_t per_task = across ? 8 : 1, groups = (n2 + per_task - 1) / per_task, tasks = n0 * n1 * groups;
    int nt = thread_count(threads, n0 * n1 * n2 * words * PACK_WORD_WORK);
    (void)across;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t first = (t / groups) * n2 + (t % groups) * per_task, last = first + per_task;
        if (last > (t / groups + 1) * n2) last = (t / groups + 1) * n2;
#ifdef SURGE_X86
        if (across && last - first == 8) {
            pack_signs_8rows_avx2(x + row_offset(first, n1, n2, s0, s1, s2), sk, beta + row_offset(first, n1, n2, b0, b1, b2),
                                  b2, alpha, k, out + first * words, words);
            continue;
        }
#endif
        for (int64_t r = first; r < last; r++) {
            const float *xr = x + row_offset(r, n1, n2, s0, s1, s2);
            const float *br = beta + row_offset(r, n1, n2, b0, b1, b2);
            uint64_t *o = out + r * words;
#ifdef SURGE_X86
            if (vector && sk == 1 && (bk == 1 || bk == 0)) {
                pack_signs_row_avx2(xr, br, bk, alpha, k, o, words);
                continue;
            }
#endif
            for (int64_t w = 0; w < words; w++) {
                uint64_t word = 0;
                int64_t base = w * 64, count = k - base < 64 ? k - base : 64;
                for (int64_t j = 0; j < count; j++) {
                    float u = (xr[(base + j) * sk] - br[(base + j) * bk]) / alpha;
                    word |= (uint64_t)(u >= 0.0f) << j;
                }
                o[w] = word;
            }
        }
    }
}

/* Bit-planes of the quantizer's levels: code = round(clamp((x - beta) / alpha, -q_neg, q_pos)) + q_neg
 * (round half to even, as torch.round), bit p of the code in plane p; 0 where the additive mask is
 * <= mask_floor (mask may be NULL). The unsigned 1-bit quantizer (the attention probabilities) is
 * q_neg = 0, q_pos = 1: bit = (x - beta) / alpha > 0.5. out: contiguous (n0, n1, n2, planes, words). */
SURGE_API void surge_pack_levels(const float *x, int64_t n0, int64_t n1, int64_t n2, int64_t k,
                                 int64_t s0, int64_t s1, int64_t s2, int64_t sk,
                                 const float *beta, int64_t b0, int64_t b1, int64_t b2, int64_t bk,
                                 const float *mask, int64_t m0, int64_t m1, int64_t m2, int64_t mk, float mask_floor,
                                 float alpha, int q_neg, int q_pos, int planes, uint64_t *out, int64_t words, int threads) {
    int64_t rows = n0 * n1 * n2;
    int nt = thread_count(threads, rows * words * planes * PACK_WORD_WORK);
    int vector = surge_active_variant() != VARIANT_GENERIC;
    const float lo = (float)-q_neg, hi = (float)q_pos;
    int unsigned_bits = q_neg == 0 && q_pos == 1 && alpha >= 0x1p-100f && alpha < 0x1p100f;
    (void)vector, (void)unsigned_bits;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + row_offset(r, n1, n2, s0, s1, s2);
        const float *br = beta + row_offset(r, n1, n2, b0, b1, b2);
        const float *mr = mask ? mask + row_offset(r, n1, n2, m0, m1, m2) : NULL;
        uint64_t *o = out + r * planes * words;
#ifdef SURGE_X86
        if (vector && sk == 1 && (bk == 1 || bk == 0) && (!mr || mk == 1)) {
            if (unsigned_bits) pack_unsigned_bits_row_avx2(xr, br, bk, mr, mask_floor, alpha, k, o, words);
            else pack_levels_row_avx2(xr, br, bk, mr, mask_floor, alpha, lo, hi, q_neg, planes, k, o, words);
            continue;
        }
#endif
        for (int64_t w = 0; w < words; w++) {
            uint64_t plane_words[8] = {0};
            int64_t base = w * 64, count = k - base < 64 ? k - base : 64;
            for (int64_t j = 0; j < count; j++) {
                uint32_t code = level_code(xr[(base + j) * sk], br[(base + j) * bk], alpha, lo, hi, q_neg,
                                           mr ? !(mr[(base + j) * mk] <= mask_floor) : 1);
                for (int p = 0; p < planes; p++) plane_words[p] |= (uint64_t)((code >> p) & 1u) << j;
            }
            for (int p = 0; p < planes; p++) o[p * words + w] = plane_words[p];
        }
    }
}
