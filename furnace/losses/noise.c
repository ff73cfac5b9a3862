/* Fast standard normal fill for the aleatoric loss's Monte Carlo noise (CPU, float32).
 *
 * Built on first use by furnace/losses/noise.py (any C99 compiler, loaded with ctypes); when no
 * compiler is found the loss uses torch's normal_ instead.  Why: on CPU the T noise draws are
 * most of the loss's time, and torch's normal_ (one mt19937 stream, scalar) is ~5x slower than
 * this loop, which the compiler vectorises.
 *
 * Algorithm (tests/test_losses_noise.py re-implements it in numpy and compares bit for bit):
 *   - LANES = 16 independent xoshiro128++ generators (Blackman & Vigna), state words seeded by
 *     splitmix64 from the 64-bit seed: lane l takes the outputs 2l and 2l+1, as
 *     s0 = lo32(a), s1 = hi32(a), s2 = lo32(b), s3 = hi32(b) | 1.
 *   - Blocks of 2 * PAIRS 32-bit words: word j of a block is output j / LANES of lane
 *     j % LANES.  Word i < PAIRS gives the radius, word PAIRS + i the angle of pair i.
 *   - Box-Muller: out[i] = r cos(a), out[PAIRS + i] = r sin(a), with
 *       u = ((w >> 1) + 0.5) / 2^31 in (0, 1] (float32 rounding), r = sqrt(-2 ln u),
 *       a = q pi/2 + x, q = w >> 30, x = (((w >> 6) & (2^24 - 1)) / 2^24 - 1/2) pi/2.
 *     ln u and sin/cos x are float32 polynomials (below), accurate to a few float32 ulps; the
 *     largest |value| is sqrt(64 ln 2) = 6.66.
 *   - The last block is cut to the n requested values.
 * Built with -ffp-contract=off and no fast-math, so every build (SSE2, AVX2, scalar) gives the
 * same bits for the same seed.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define PAIRS 256 /* multiple of LANES */

typedef struct { uint32_t s[4][LANES]; } lanes_t;

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void seed_lanes(lanes_t *g, uint64_t seed) {
    for (int l = 0; l < LANES; l++) {
        uint64_t a = splitmix64(&seed), b = splitmix64(&seed);
        g->s[0][l] = (uint32_t)a;
        g->s[1][l] = (uint32_t)(a >> 32);
        g->s[2][l] = (uint32_t)b;
        g->s[3][l] = (uint32_t)(b >> 32) | 1u; /* a state is never all zero */
    }
}

/* n (multiple of LANES) words, lane-interleaved; one vectorisable xoshiro128++ step per row */
static void draw_words(lanes_t *restrict g, uint32_t *restrict out, int n) {
    uint32_t *restrict s0 = g->s[0], *restrict s1 = g->s[1];
    uint32_t *restrict s2 = g->s[2], *restrict s3 = g->s[3];
    for (int i = 0; i < n; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            uint32_t a = s0[l], b = s1[l], c = s2[l], d = s3[l];
            uint32_t sum = a + d;
            out[i + l] = ((sum << 7) | (sum >> 25)) + a;
            uint32_t t = b << 9;
            c ^= a;
            d ^= b;
            b ^= c;
            a ^= d;
            c ^= t;
            d = (d << 11) | (d >> 21);
            s0[l] = a;
            s1[l] = b;
            s2[l] = c;
            s3[l] = d;
        }
    }
}

static inline float as_float(uint32_t i) { float f; memcpy(&f, &i, 4); return f; }
static inline uint32_t as_bits(float f) { uint32_t i; memcpy(&i, &f, 4); return i; }

/* sqrt(-2 ln u) for u = ((w >> 1) + 0.5) / 2^31 */
static inline float radius(uint32_t w) {
    float u = ((float)(int32_t)(w >> 1) + 0.5f) * (1.0f / 2147483648.0f);
    uint32_t b = as_bits(u);
    /* u = 2^e m with m in [sqrt(1/2), sqrt(2)): mantissas above sqrt(2) move down an octave */
    uint32_t big = (b & 0x007fffffu) > 0x003504f3u;
    int32_t e = (int32_t)(b >> 23) - 127 + (int32_t)big;
    float m = as_float(((b & 0x007fffffu) | 0x3f800000u) - (big << 23));
    /* ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172: series to s^9 */
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float p = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
    float q = -2.0f * ((float)e * 0.693147180559945f + 2.0f * s * p);
    return __builtin_sqrtf(q > 0.0f ? q : 0.0f); /* u = 1 may round q to -0 */
}

/* cos and sin of q pi/2 + x, x in [-pi/4, pi/4): Taylor to x^9 / x^10, then q quarter turns */
static inline void turn(uint32_t w, float *c, float *s) {
    uint32_t q = w >> 30;
    float x = ((float)(int32_t)((w >> 6) & 0x00ffffffu) * (1.0f / 16777216.0f) - 0.5f) *
              1.5707963267948966f;
    float x2 = x * x;
    float sx = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 +
                    x2 * (1.0f / 362880)))));
    float cx = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320 +
               x2 * (-1.0f / 3628800)))));
    uint32_t odd = q & 1u; /* a quarter turn swaps cos and sin; signs follow the quadrant */
    float a = odd ? sx : cx, b = odd ? cx : sx;
    *c = as_float(as_bits(a) ^ (((q ^ (q >> 1)) & 1u) << 31));
    *s = as_float(as_bits(b) ^ ((q >> 1) << 31));
}

/* Fill out[0:n] with N(0, 1) numbers from the stream of `seed`. */
void furnace_normal_fill(float *out, size_t n, uint64_t seed) {
    lanes_t g;
    uint32_t w[2 * PAIRS];
    float blk[2 * PAIRS];
    seed_lanes(&g, seed);
    for (size_t done = 0; done < n; done += 2 * PAIRS) {
        draw_words(&g, w, 2 * PAIRS);
        for (int i = 0; i < PAIRS; i++) {
            float r = radius(w[i]), c, s;
            turn(w[PAIRS + i], &c, &s);
            blk[i] = r * c;
            blk[PAIRS + i] = r * s;
        }
        size_t m = n - done < 2 * PAIRS ? n - done : 2 * PAIRS;
        memcpy(out + done, blk, m * sizeof(float));
    }
}
