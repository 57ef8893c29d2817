/* Binary x binary kernels for surge_nlp inference.
 *
 * Operands are bit-packed along the reduction dimension into 64-bit words (bit j of word w holds
 * element 64*w + j; padding bits are 0 on both sides, so they never count).
 *   XOR mode (signed x signed, bit 1 = +1):      dot = K - 2 * popcount(a ^ b)
 *   AND mode (unsigned {0,1} x signed):          dot = 2 * popcount(a & b) - popcount(a)
 * and the epilogue applies the scales and shifts: out = dot * scale * col_scale[n] + bias[n].
 *
 * Built generic (no -march): the AVX2 and AVX-512 VPOPCNTDQ variants are compiled with target
 * attributes and picked at run time from cpuid, so one cached library serves every x86-64 CPU.
 * Threads: OpenMP (the process shares PyTorch's libgomp, loaded first under the same soname).
 */
#include <stdint.h>
#include <stddef.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SURGE_X86 1
#endif

#define SURGE_API __attribute__((visibility("default")))
/* Inlined with a constant `mode`, so that each variant's inner loop is compiled once per mode. */
#define INLINE static inline __attribute__((always_inline))

/* The interface, in one table: the ABI version, the variants (in the order of the enum below) and
 * every exported function's signature, "fn NAME RESULT ARGS..." with i = int, q = int64_t,
 * f = float, p = pointer, s = C string, v = void and N*t = N arguments of type t. build.py reads this table
 * from the source to declare the ctypes signatures and the variant list, and checks that a loaded
 * library returns the same table from surge_interface(). Change the table with the code. */
#define SURGE_INTERFACE                                                   \
    "abi 3\n"                                                             \
    "variants generic avx2 avx512_vpopcntdq\n"                            \
    "fn surge_interface s\n"                                              \
    "fn surge_variant_supported i i\n"                                    \
    "fn surge_set_variant i i\n"                                          \
    "fn surge_active_variant i\n"                                         \
    "fn surge_forced_variant i\n"                                         \
    "fn surge_binary_matmul v i p p p 15*q f p p i\n"                     \
    "fn surge_pack_signs v p 8*q p 4*q f p q i\n"                         \
    "fn surge_pack_probs v p 8*q p 4*q 3*f p q i\n"                      \
    "fn surge_peak_xor_popcount q p p q q i\n"

enum { VARIANT_GENERIC = 0, VARIANT_AVX2 = 1, VARIANT_AVX512 = 2 };
enum { MODE_XOR = 0, MODE_AND = 1 };

/* Tile sizes: a tile's NB packed B rows (NB * words * 8 bytes; 24 KiB at K = 3072) stay in L1
 * while the MB rows of A stream over them. */
#define MB 16
#define NB 64

#define MODE_SPECIALIZED(attr, name)                                                                           \
    attr static void name(int mode, const uint64_t *a, int64_t lda, const uint64_t *b, int64_t ldb, int64_t rows, \
                          int64_t cols, int64_t words, int32_t *counts, int32_t *row_counts) {                  \
        if (mode == MODE_AND) name##_impl(MODE_AND, a, lda, b, ldb, rows, cols, words, counts, row_counts);    \
        else name##_impl(MODE_XOR, a, lda, b, ldb, rows, cols, words, counts, row_counts);                    \
    }

typedef void (*tile_fn)(int mode, const uint64_t *a, int64_t lda, const uint64_t *b, int64_t ldb,
                        int64_t rows, int64_t cols, int64_t words, int32_t *counts, int32_t *row_counts);

SURGE_API const char *surge_interface(void) { return SURGE_INTERFACE; }

/* ------------------------------------------------------------------ generic (portable) */

INLINE uint64_t combine(const int mode, uint64_t a, uint64_t b) { return mode == MODE_AND ? (a & b) : (a ^ b); }

/* Scalar pieces every variant shares: a row's set bits, and one combined row pair's. */
INLINE int32_t popcount_row(const uint64_t *row, int64_t words) {
    int32_t count = 0;
    for (int64_t w = 0; w < words; w++) count += __builtin_popcountll(row[w]);
    return count;
}

INLINE int32_t popcount_pair(const int mode, const uint64_t *a, const uint64_t *b, int64_t words) {
    int32_t count = 0;
    for (int64_t w = 0; w < words; w++) count += __builtin_popcountll(combine(mode, a[w], b[w]));
    return count;
}

INLINE void tile_generic_impl(const int mode, const uint64_t *a, int64_t lda, const uint64_t *b, int64_t ldb,
                         int64_t rows, int64_t cols, int64_t words, int32_t *counts, int32_t *row_counts) {
    for (int64_t i = 0; i < rows; i++) {
        const uint64_t *ar = a + i * lda;
        row_counts[i] = popcount_row(ar, words);
        for (int64_t j = 0; j < cols; j++) counts[i * NB + j] = popcount_pair(mode, ar, b + j * ldb, words);
    }
}

#define NO_TARGET
MODE_SPECIALIZED(NO_TARGET, tile_generic)

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

/* Four 4 x u64 accumulators -> their four totals, in one vector. */
TARGET_AVX2 static inline __m256i reduce4_avx2(__m256i t0, __m256i t1, __m256i t2, __m256i t3) {
    __m256i s01 = _mm256_add_epi64(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
    __m256i s23 = _mm256_add_epi64(_mm256_unpacklo_epi64(t2, t3), _mm256_unpackhi_epi64(t2, t3));
    return _mm256_add_epi64(_mm256_permute2x128_si256(s01, s23, 0x20), _mm256_permute2x128_si256(s01, s23, 0x31));
}

TARGET_AVX2 INLINE __m256i combine_avx2(const int mode, __m256i a, __m256i b) {
    return mode == MODE_AND ? _mm256_and_si256(a, b) : _mm256_xor_si256(a, b);
}

/* One A row against four B rows per step; byte counters absorb up to 31 steps (31 * 8 < 256)
 * before they are widened with SAD, which keeps the inner loop at one add per product. */
TARGET_AVX2 INLINE void tile_avx2_impl(const int mode, const uint64_t *a, int64_t lda, const uint64_t *b, int64_t ldb,
                                       int64_t rows, int64_t cols, int64_t words, int32_t *counts, int32_t *row_counts) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    int64_t vec_words = words & ~(int64_t)3, rest = words - vec_words;
    /* the last 1-3 words: masked loads read zeros beyond the row, which count nothing */
    const __m256i tail = _mm256_cmpgt_epi64(_mm256_set1_epi64x(rest), _mm256_setr_epi64x(0, 1, 2, 3));
    for (int64_t i = 0; i < rows; i++) {
        const uint64_t *ar = a + i * lda;
        row_counts[i] = popcount_row(ar, words);
        int64_t j = 0;
        if (words == 1) {
            /* one-word rows (attention heads of up to 64 channels): four B rows side by side in one
             * vector, so SAD leaves each product's count in its own lane and nothing is reduced */
            const __m256i va = _mm256_set1_epi64x((long long)ar[0]);
            for (; j + 4 <= cols; j += 4) {
                __m256i vb = ldb == 1 ? _mm256_loadu_si256((const __m256i *)(b + j))
                                      : _mm256_setr_epi64x((long long)b[j * ldb], (long long)b[(j + 1) * ldb],
                                                           (long long)b[(j + 2) * ldb], (long long)b[(j + 3) * ldb]);
                __m256i c = _mm256_sad_epu8(popcount_bytes_avx2(combine_avx2(mode, va, vb)), zero);
                _mm_storeu_si128((__m128i *)(counts + i * NB + j), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c, pick)));
            }
        } else if (words == 2 && ldb == 2) {
            /* two-word rows (probabilities over up to 128 keys): two B rows per vector, lane pairs summed */
            const __m256i va = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)ar));
            const __m256i order = _mm256_setr_epi32(0, 4, 2, 6, 0, 4, 2, 6);
            for (; j + 4 <= cols; j += 4) {
                __m256i c01 = _mm256_sad_epu8(popcount_bytes_avx2(combine_avx2(mode, va, _mm256_loadu_si256((const __m256i *)(b + 2 * j)))), zero);
                __m256i c23 = _mm256_sad_epu8(popcount_bytes_avx2(combine_avx2(mode, va, _mm256_loadu_si256((const __m256i *)(b + 2 * j + 4)))), zero);
                /* lanes: j, j+2, j+1, j+3 */
                __m256i c = _mm256_add_epi64(_mm256_unpacklo_epi64(c01, c23), _mm256_unpackhi_epi64(c01, c23));
                _mm_storeu_si128((__m128i *)(counts + i * NB + j), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c, order)));
            }
        }
        for (; j + 4 <= cols; j += 4) {
            const uint64_t *b0 = b + j * ldb, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
            __m256i t0 = zero, t1 = zero, t2 = zero, t3 = zero;
            int64_t w = 0;
            while (w < vec_words) {
                int64_t stop = w + 31 * 4 < vec_words ? w + 31 * 4 : vec_words;
                __m256i c0 = zero, c1 = zero, c2 = zero, c3 = zero;
                for (; w < stop; w += 4) {
                    __m256i va = _mm256_loadu_si256((const __m256i *)(ar + w));
                    c0 = _mm256_add_epi8(c0, popcount_bytes_avx2(combine_avx2(mode, va, _mm256_loadu_si256((const __m256i *)(b0 + w)))));
                    c1 = _mm256_add_epi8(c1, popcount_bytes_avx2(combine_avx2(mode, va, _mm256_loadu_si256((const __m256i *)(b1 + w)))));
                    c2 = _mm256_add_epi8(c2, popcount_bytes_avx2(combine_avx2(mode, va, _mm256_loadu_si256((const __m256i *)(b2 + w)))));
                    c3 = _mm256_add_epi8(c3, popcount_bytes_avx2(combine_avx2(mode, va, _mm256_loadu_si256((const __m256i *)(b3 + w)))));
                }
                t0 = _mm256_add_epi64(t0, _mm256_sad_epu8(c0, zero));
                t1 = _mm256_add_epi64(t1, _mm256_sad_epu8(c1, zero));
                t2 = _mm256_add_epi64(t2, _mm256_sad_epu8(c2, zero));
                t3 = _mm256_add_epi64(t3, _mm256_sad_epu8(c3, zero));
            }
            if (rest) {
#define TAIL_LOAD(p) _mm256_maskload_epi64((const long long *)((p) + vec_words), tail)
                __m256i va = TAIL_LOAD(ar);
                t0 = _mm256_add_epi64(t0, _mm256_sad_epu8(popcount_bytes_avx2(combine_avx2(mode, va, TAIL_LOAD(b0))), zero));
                t1 = _mm256_add_epi64(t1, _mm256_sad_epu8(popcount_bytes_avx2(combine_avx2(mode, va, TAIL_LOAD(b1))), zero));
                t2 = _mm256_add_epi64(t2, _mm256_sad_epu8(popcount_bytes_avx2(combine_avx2(mode, va, TAIL_LOAD(b2))), zero));
                t3 = _mm256_add_epi64(t3, _mm256_sad_epu8(popcount_bytes_avx2(combine_avx2(mode, va, TAIL_LOAD(b3))), zero));
#undef TAIL_LOAD
            }
            /* totals < 2^31: keep the low halves of the four 64-bit sums */
            __m256i totals = _mm256_permutevar8x32_epi32(reduce4_avx2(t0, t1, t2, t3), pick);
            _mm_storeu_si128((__m128i *)(counts + i * NB + j), _mm256_castsi256_si128(totals));
        }
        for (; j < cols; j++) counts[i * NB + j] = popcount_pair(mode, ar, b + j * ldb, words);
    }
}

MODE_SPECIALIZED(TARGET_AVX2, tile_avx2)

/* ------------------------------------------------------------------ AVX-512 VPOPCNTDQ */
#define TARGET_AVX512 __attribute__((target("avx512f,avx512vpopcntdq,popcnt")))

TARGET_AVX512 INLINE __m512i combine_avx512(const int mode, __m512i a, __m512i b) {
    return mode == MODE_AND ? _mm512_and_si512(a, b) : _mm512_xor_si512(a, b);
}

TARGET_AVX512 INLINE void tile_avx512_impl(const int mode, const uint64_t *a, int64_t lda, const uint64_t *b, int64_t ldb,
                                      int64_t rows, int64_t cols, int64_t words, int32_t *counts, int32_t *row_counts) {
    int64_t full = words & ~(int64_t)7;
    __mmask8 tail = (__mmask8)((1u << (words - full)) - 1u);
    for (int64_t i = 0; i < rows; i++) {
        const uint64_t *ar = a + i * lda;
        row_counts[i] = popcount_row(ar, words);
        int64_t j = 0;
        for (; j + 4 <= cols; j += 4) {
            const uint64_t *b0 = b + j * ldb, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
            __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
            int64_t w = 0;
            for (; w < full; w += 8) {
                __m512i va = _mm512_loadu_si512(ar + w);
                s0 = _mm512_add_epi64(s0, _mm512_popcnt_epi64(combine_avx512(mode, va, _mm512_loadu_si512(b0 + w))));
                s1 = _mm512_add_epi64(s1, _mm512_popcnt_epi64(combine_avx512(mode, va, _mm512_loadu_si512(b1 + w))));
                s2 = _mm512_add_epi64(s2, _mm512_popcnt_epi64(combine_avx512(mode, va, _mm512_loadu_si512(b2 + w))));
                s3 = _mm512_add_epi64(s3, _mm512_popcnt_epi64(combine_avx512(mode, va, _mm512_loadu_si512(b3 + w))));
            }
            if (tail) {
                __m512i va = _mm512_maskz_loadu_epi64(tail, ar + w);
                s0 = _mm512_add_epi64(s0, _mm512_popcnt_epi64(combine_avx512(mode, va, _mm512_maskz_loadu_epi64(tail, b0 + w))));
                s1 = _mm512_add_epi64(s1, _mm512_popcnt_epi64(combine_avx512(mode, va, _mm512_maskz_loadu_epi64(tail, b1 + w))));
                s2 = _mm512_add_epi64(s2, _mm512_popcnt_epi64(combine_avx512(mode, va, _mm512_maskz_loadu_epi64(tail, b2 + w))));
                s3 = _mm512_add_epi64(s3, _mm512_popcnt_epi64(combine_avx512(mode, va, _mm512_maskz_loadu_epi64(tail, b3 + w))));
            }
            int32_t *c = counts + i * NB + j;
            c[0] = (int32_t)_mm512_reduce_add_epi64(s0); c[1] = (int32_t)_mm512_reduce_add_epi64(s1);
            c[2] = (int32_t)_mm512_reduce_add_epi64(s2); c[3] = (int32_t)_mm512_reduce_add_epi64(s3);
        }
        for (; j < cols; j++) counts[i * NB + j] = popcount_pair(mode, ar, b + j * ldb, words);
    }
}
MODE_SPECIALIZED(TARGET_AVX512, tile_avx512)
#endif /* SURGE_X86 */

/* ------------------------------------------------------------------ dispatch */

static int variant_supported(int variant) {
    if (variant == VARIANT_GENERIC) return 1;
#ifdef SURGE_X86
    __builtin_cpu_init();
    if (variant == VARIANT_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    if (variant == VARIANT_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
#endif
    return 0;
}

static int best_variant(void) {
    for (int v = VARIANT_AVX512; v > VARIANT_GENERIC; v--)
        if (variant_supported(v)) return v;
    return VARIANT_GENERIC;
}

static int active_variant = -1;
/* A variant set explicitly runs every product itself (the tests force each one); automatic
 * selection (-1) may hand small products to a faster neighbour. */
static int forced_variant = -1;

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

static tile_fn current_tile(void) {
#ifdef SURGE_X86
    switch (surge_active_variant()) {
    case VARIANT_AVX512: return tile_avx512;
    case VARIANT_AVX2: return tile_avx2;
    default: break;
    }
#endif
    return tile_generic;
}

static int thread_count(int requested, int64_t work) {
    /* Below ~64k word products a thread team costs more than it saves. */
    if (requested < 1 || work < 65536) return 1;
    return requested;
}

/* ------------------------------------------------------------------ the binary peak */

/* XOR + popcount over L1-resident words and nothing else (no epilogue, no packing, no cache misses):
 * the ceiling a binary product can reach with the active variant's popcount. Four independent
 * accumulators hide the popcount latency. Returns the set bits of `reps` passes over a ^ b. */
static uint64_t peak_generic(const uint64_t *a, const uint64_t *b, int64_t words, int64_t reps) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t r = 0; r < reps; r++)
        for (int64_t w = 0; w + 4 <= words; w += 4) {
            s0 += (uint64_t)__builtin_popcountll(a[w] ^ b[w]);
            s1 += (uint64_t)__builtin_popcountll(a[w + 1] ^ b[w + 1]);
            s2 += (uint64_t)__builtin_popcountll(a[w + 2] ^ b[w + 2]);
            s3 += (uint64_t)__builtin_popcountll(a[w + 3] ^ b[w + 3]);
        }
    return s0 + s1 + s2 + s3;
}

#ifdef SURGE_X86
TARGET_AVX2 static uint64_t peak_avx2(const uint64_t *a, const uint64_t *b, int64_t words, int64_t reps) {
    /* as the matmul's inner loop: nibble-lookup byte counts, widened with SAD every 31 steps */
    const __m256i zero = _mm256_setzero_si256();
    __m256i total = zero;
    for (int64_t r = 0; r < reps; r++) {
        int64_t w = 0;
        while (w + 16 <= words) {
            int64_t stop = w + 31 * 16 < words ? w + 31 * 16 : words - 15;
            __m256i c0 = zero, c1 = zero, c2 = zero, c3 = zero;
            for (; w < stop; w += 16) {
                c0 = _mm256_add_epi8(c0, popcount_bytes_avx2(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a + w)), _mm256_loadu_si256((const __m256i *)(b + w)))));
                c1 = _mm256_add_epi8(c1, popcount_bytes_avx2(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a + w + 4)), _mm256_loadu_si256((const __m256i *)(b + w + 4)))));
                c2 = _mm256_add_epi8(c2, popcount_bytes_avx2(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a + w + 8)), _mm256_loadu_si256((const __m256i *)(b + w + 8)))));
                c3 = _mm256_add_epi8(c3, popcount_bytes_avx2(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a + w + 12)), _mm256_loadu_si256((const __m256i *)(b + w + 12)))));
            }
            total = _mm256_add_epi64(total, _mm256_add_epi64(_mm256_add_epi64(_mm256_sad_epu8(c0, zero), _mm256_sad_epu8(c1, zero)),
                                                             _mm256_add_epi64(_mm256_sad_epu8(c2, zero), _mm256_sad_epu8(c3, zero))));
        }
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, total);
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

TARGET_AVX512 static uint64_t peak_avx512(const uint64_t *a, const uint64_t *b, int64_t words, int64_t reps) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t r = 0; r < reps; r++)
        for (int64_t w = 0; w + 32 <= words; w += 32) {
            s0 = _mm512_add_epi64(s0, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(a + w), _mm512_loadu_si512(b + w))));
            s1 = _mm512_add_epi64(s1, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(a + w + 8), _mm512_loadu_si512(b + w + 8))));
            s2 = _mm512_add_epi64(s2, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(a + w + 16), _mm512_loadu_si512(b + w + 16))));
            s3 = _mm512_add_epi64(s3, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(a + w + 24), _mm512_loadu_si512(b + w + 24))));
        }
    return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
}
#endif

/* `words` (a multiple of 32, L1-sized) words of a and b, `reps` passes on each of `threads` threads
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

/* out = dot * scale * col_scale + bias, with dot = base + step * count per row; one branch-free
 * loop per case so that the compiler vectorizes it. */
static void epilogue(int mode, const int32_t *counts, const int32_t *row_counts, int64_t rows, int64_t cols,
                     int64_t k_bits, float scale, const float *restrict col_scale, const float *restrict bias,
                     float *restrict out, int64_t ldo) {
    for (int64_t i = 0; i < rows; i++) {
        const int32_t *restrict c = counts + i * NB;
        float *restrict o = out + i * ldo;
        int32_t base = mode == MODE_AND ? -row_counts[i] : (int32_t)k_bits, step = mode == MODE_AND ? 2 : -2;
        if (col_scale && bias)
            for (int64_t j = 0; j < cols; j++) o[j] = (float)(base + step * c[j]) * scale * col_scale[j] + bias[j];
        else if (col_scale)
            for (int64_t j = 0; j < cols; j++) o[j] = (float)(base + step * c[j]) * scale * col_scale[j];
        else if (bias)
            for (int64_t j = 0; j < cols; j++) o[j] = (float)(base + step * c[j]) * scale + bias[j];
        else
            for (int64_t j = 0; j < cols; j++) o[j] = (float)(base + step * c[j]) * scale;
    }
}

/* out[g1, g2, m, n] = dot(a[g1, g2, m, :], b[g1, g2, n, :]) * scale * col_scale[n] + bias[n]
 * a, b: uint64 words with strides in words (batch g1, batch g2, row); out: float strides in elements.
 * col_scale and bias may be NULL. k_bits: the true reduction length (XOR mode). */
SURGE_API void surge_binary_matmul(int mode, const uint64_t *a, const uint64_t *b, float *out,
                                   int64_t g1, int64_t g2, int64_t m, int64_t n, int64_t words, int64_t k_bits,
                                   int64_t a_s1, int64_t a_s2, int64_t lda,
                                   int64_t b_s1, int64_t b_s2, int64_t ldb,
                                   int64_t o_s1, int64_t o_s2, int64_t ldo,
                                   float scale, const float *col_scale, const float *bias, int threads) {
    tile_fn tile = current_tile();
#ifdef SURGE_X86
    /* rows of one or two words: the AVX2 lane-per-product paths beat 512-bit reductions (only
     * under automatic selection: a forced AVX-512 runs its own path) */
    if (tile == tile_avx512 && words <= 2 && forced_variant < 0) tile = tile_avx2;
#endif
    int64_t m_tiles = (m + MB - 1) / MB, n_tiles = (n + NB - 1) / NB;
    int64_t tiles = g1 * g2 * m_tiles * n_tiles;
    int nt = thread_count(threads, g1 * g2 * m * n * (words > 0 ? words : 1));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t t = 0; t < tiles; t++) {
        int32_t counts[MB * NB], row_counts[MB];
        /* n tiles innermost: consecutive tiles of one thread share the A rows */
        int64_t nt_i = t % n_tiles, rest = t / n_tiles;
        int64_t mt_i = rest % m_tiles; rest /= m_tiles;
        int64_t i2 = rest % g2, i1 = rest / g2;
        int64_t m0 = mt_i * MB, n0 = nt_i * NB;
        int64_t rows = m - m0 < MB ? m - m0 : MB, cols = n - n0 < NB ? n - n0 : NB;
        const uint64_t *at = a + i1 * a_s1 + i2 * a_s2 + m0 * lda;
        const uint64_t *bt = b + i1 * b_s1 + i2 * b_s2 + n0 * ldb;
        tile(mode, at, lda, bt, ldb, rows, cols, words, counts, row_counts);
        float *ot = out + i1 * o_s1 + i2 * o_s2 + m0 * ldo + n0;
        epilogue(mode, counts, row_counts, rows, cols, k_bits, scale, col_scale ? col_scale + n0 : NULL,
                 bias ? bias + n0 : NULL, ot, ldo);
    }
}

/* ------------------------------------------------------------------ packing */

#ifdef SURGE_X86
/* Contiguous rows (unit strides): eight lanes at a time, same float operations as the scalar loop. */
TARGET_AVX2 static void pack_signs_row_avx2(const float *xr, const float *br, int64_t bk, float alpha,
                                            int64_t k, uint64_t *o, int64_t words) {
    const __m256 va = _mm256_set1_ps(alpha), zero = _mm256_setzero_ps();
    for (int64_t w = 0; w < words; w++) {
        uint64_t word = 0;
        int64_t base = w * 64, count = k - base < 64 ? k - base : 64, j = 0;
        for (; j + 8 <= count; j += 8) {
            __m256 vb = bk ? _mm256_loadu_ps(br + base + j) : _mm256_set1_ps(br[0]);
            __m256 u = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + base + j), vb), va);
            word |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(u, zero, _CMP_GE_OQ)) << j;
        }
        for (; j < count; j++) {
            float u = (xr[base + j] - br[(base + j) * bk]) / alpha;
            word |= (uint64_t)(u >= 0.0f) << j;
        }
        o[w] = word;
    }
}

TARGET_AVX2 static void pack_probs_row_avx2(const float *pr, const float *mr, float mask_floor, float beta,
                                            float alpha, int64_t k, uint64_t *o, int64_t words) {
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta), half = _mm256_set1_ps(0.5f);
    const __m256 floor = _mm256_set1_ps(mask_floor);
    for (int64_t w = 0; w < words; w++) {
        uint64_t word = 0;
        int64_t base = w * 64, count = k - base < 64 ? k - base : 64, j = 0;
        for (; j + 8 <= count; j += 8) {
            __m256 u = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(pr + base + j), vb), va);
            __m256 bit = _mm256_cmp_ps(u, half, _CMP_GT_OQ);
            if (mr) bit = _mm256_and_ps(bit, _mm256_cmp_ps(_mm256_loadu_ps(mr + base + j), floor, _CMP_NLE_UQ));
            word |= (uint64_t)(uint32_t)_mm256_movemask_ps(bit) << j;
        }
        for (; j < count; j++) {
            float u = (pr[base + j] - beta) / alpha;
            int keep = mr ? !(mr[base + j] <= mask_floor) : 1;
            word |= (uint64_t)(keep && u > 0.5f) << j;
        }
        o[w] = word;
    }
}
#endif

/* Offset of row r of a 3-D grid of rows (n0 x n1 x n2, row-major) in a tensor with strides s0, s1, s2. */
INLINE int64_t row_offset(int64_t r, int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2) {
    return (r / (n1 * n2)) * s0 + ((r / n2) % n1) * s1 + (r % n2) * s2;
}

/* Bits of the quantizer's 1-bit signed output: bit = ((x - beta) / alpha >= 0), computed in float
 * exactly as the simulated quantizer does (so a quotient that underflows to -0 still gives +1).
 * x and beta: 4-D strided (rows n0 x n1 x n2, reduction k); out: contiguous (n0, n1, n2, words). */
SURGE_API void surge_pack_signs(const float *x, int64_t n0, int64_t n1, int64_t n2, int64_t k,
                                int64_t s0, int64_t s1, int64_t s2, int64_t sk,
                                const float *beta, int64_t b0, int64_t b1, int64_t b2, int64_t bk,
                                float alpha, uint64_t *out, int64_t words, int threads) {
    int64_t rows = n0 * n1 * n2;
    int nt = thread_count(threads, rows * words * 16);
    int vector = surge_active_variant() != VARIANT_GENERIC;
    (void)vector;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
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

/* Bits of the unsigned 1-bit probability quantizer, with masked keys cleared:
 * bit = (mask > mask_floor) && round(clip((p - beta) / alpha, 0, 1)) == 1, i.e. (p - beta) / alpha > 0.5
 * (round half to even sends 0.5 to 0). mask may be NULL. */
SURGE_API void surge_pack_probs(const float *p, int64_t n0, int64_t n1, int64_t n2, int64_t k,
                                int64_t s0, int64_t s1, int64_t s2, int64_t sk,
                                const float *mask, int64_t m0, int64_t m1, int64_t m2, int64_t mk, float mask_floor,
                                float beta, float alpha, uint64_t *out, int64_t words, int threads) {
    int64_t rows = n0 * n1 * n2;
    int nt = thread_count(threads, rows * words * 16);
    int vector = surge_active_variant() != VARIANT_GENERIC;
    (void)vector;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *pr = p + row_offset(r, n1, n2, s0, s1, s2);
        const float *mr = mask ? mask + row_offset(r, n1, n2, m0, m1, m2) : NULL;
        uint64_t *o = out + r * words;
#ifdef SURGE_X86
        if (vector && sk == 1 && (!mr || mk == 1)) {
            pack_probs_row_avx2(pr, mr, mask_floor, beta, alpha, k, o, words);
            continue;
        }
#endif
        for (int64_t w = 0; w < words; w++) {
            uint64_t word = 0;
            int64_t base = w * 64, count = k - base < 64 ? k - base : 64;
            for (int64_t j = 0; j < count; j++) {
                float u = (pr[(base + j) * sk] - beta) / alpha;
                int keep = mr ? !(mr[(base + j) * mk] <= mask_floor) : 1;
                word |= (uint64_t)(keep && u > 0.5f) << j;
            }
            o[w] = word;
        }
    }
}
