/* CPU attention over latent KV rows with keys stored after RoPE (``compression.keys: roped``).
 *
 * Decodes (one query token per request, kvc_roped_decode): for each request and head group, in one pass over its
 * cached rows, decode the key latent (integer codes and fp16 scales, or float latents) into a small buffer,
 * score it against the group's query heads (``q B_k^T``, already applied by the caller), softmax, then a second
 * pass decodes the value latents 16 rows at a time and accumulates the weighted sum ``u = p . c_v``; B_v (each
 * head's rows, plus the bias) turns u into the head outputs, written straight into the layer's output rows.
 * Nothing is materialised per token beyond one row's latent: no padded batch, no gather copies.
 * Prompts and chunked prefills (kvc_roped_prefill): every cached row of those requests is decoded once into a
 * float buffer, then one task per query token and head group scores the rows up to its own position (causal),
 * with the same softmax, weighted sum and B_v.
 *
 * The row layout is data (vllm_kvc/kernels/cpu_latent.py builds it from layout.LatentLayout): per part (K, V)
 * a list of segments, each ``{code byte offset, width, bits, scale base, scale stride per group, values per
 * scale}``; bits 8 (int8 * scale), 4 / 2 (level tables picked by the scale's sign, times |scale|: layout.py),
 * 16 (bfloat16), 17 (float16) or 32 (float32 latents, no scales). The value of code (group g, coordinate j)
 * of a segment of width w is packed value ``g * w + j`` from its byte offset, little end first; its scale is
 * fp16 number ``scale base + g * stride + j / values per scale`` of the row's scale area.
 *
 * Decoding is exactly layout.unpack's arithmetic (float32 products); the scores, softmax and sums accumulate
 * in float32 in another order than torch's, so results agree with the reference to float32 rounding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define SEG_FIELDS 6

static inline float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, f;
    if (exp == 0) {
        if (man == 0) {
            f = sign;
        } else { /* subnormal: normalise */
            exp = 113;
            while (!(man & 0x400u)) {
                man <<= 1;
                exp--;
            }
            f = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (man << 13);
    } else {
        f = sign | ((exp + 112) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &f, 4);
    return out;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t f = (uint32_t)h << 16;
    float out;
    memcpy(&out, &f, 4);
    return out;
}

/* One head group's latent of one part of a row -> out[sum of widths] (float32). */
static void decode_part(const uint8_t *row, const uint8_t *scales, const int64_t *seg, int nseg, int64_t g,
                        const float *t4, const float *t2, float *out) {
    for (int s = 0; s < nseg; s++) {
        const int64_t *d = seg + SEG_FIELDS * s;
        const int64_t off = d[0], w = d[1], bits = d[2], sbase = d[3], sstride = d[4], qg = d[5];
        const uint8_t *codes = row + off;
        const int64_t base = g * w;
        if (bits == 16 || bits == 17 || bits == 32) {
            for (int64_t j = 0; j < w; j++) {
                if (bits == 32) {
                    memcpy(&out[j], codes + 4 * (base + j), 4);
                } else {
                    uint16_t h;
                    memcpy(&h, codes + 2 * (base + j), 2);
                    out[j] = bits == 16 ? bf16_to_f32(h) : f16_to_f32(h);
                }
            }
            out += w;
            continue;
        }
        const int64_t span = qg ? qg : w, nsc = (w + span - 1) / span;
        for (int64_t c = 0; c < nsc; c++) {
            uint16_t h;
            memcpy(&h, scales + 2 * (sbase + g * sstride + c), 2);
            const float sc = f16_to_f32(h);
            const int64_t j0 = c * span, j1 = j0 + span < w ? j0 + span : w;
            if (bits == 8) {
                for (int64_t j = j0; j < j1; j++) out[j] = (float)(int8_t)codes[base + j] * sc;
            } else {
                const float a = fabsf(sc);
                const float *t = bits == 4 ? t4 + (sc < 0.0f ? 16 : 0) : t2 + (sc < 0.0f ? 4 : 0);
                int64_t j = j0;
#ifdef __AVX512F__
                /* 16 values per step: codes -> 16 int32 indices -> one in-register table lookup (vpermps of the
                 * 16 / 4 levels) -> times |scale|: the same float32 products as the scalar loop below */
                const __m512 av = _mm512_set1_ps(a);
                if (bits == 4 && !((base + j) & 1)) {
                    const __m512 tv = _mm512_loadu_ps(t);
                    const __m128i lo4 = _mm_set1_epi8(0x0f);
                    for (; j + 16 <= j1; j += 16) {
                        const __m128i b8 = _mm_loadl_epi64((const __m128i *)(codes + ((base + j) >> 1)));
                        const __m128i lo = _mm_and_si128(b8, lo4), hi = _mm_and_si128(_mm_srli_epi16(b8, 4), lo4);
                        const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
                        _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_permutexvar_ps(idx, tv), av));
                    }
                } else if (bits == 2 && !((base + j) & 3)) {
                    const __m512 tv = _mm512_castps128_ps512(_mm_loadu_ps(t));
                    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                    const __m512i m2 = _mm512_set1_epi32(3);
                    for (; j + 16 <= j1; j += 16) {
                        uint32_t word;
                        memcpy(&word, codes + ((base + j) >> 2), 4);
                        const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)word), sh), m2);
                        _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_permutexvar_ps(idx, tv), av));
                    }
                }
#endif
                if (bits == 4) {
                    for (; j < j1; j++) {
                        const int64_t i = base + j;
                        out[j] = t[(codes[i >> 1] >> ((i & 1) * 4)) & 15] * a;
                    }
                } else {
                    for (; j < j1; j++) {
                        const int64_t i = base + j;
                        out[j] = t[(codes[i >> 2] >> ((i & 3) * 2)) & 3] * a;
                    }
                }
            }
        }
        out += w;
    }
}

#define VTILE 16 /* value rows decoded per step of the weighted sum */

#ifdef __AVX512F__
static inline __mmask16 tail16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
#endif

/* dst[h * stride] = scale * (q_h . k) for the hpg query heads of a group (q [hpg, rk]): k is read once per
 * chunk of 16 coordinates for up to 8 heads at a time. */
static void score_row(const float *q, int64_t hpg, int64_t rk, const float *k, float scale, float *dst,
                      int64_t stride) {
#ifdef __AVX512F__
    for (int64_t h0 = 0; h0 < hpg; h0 += 8) {
        const int64_t nh = hpg - h0 < 8 ? hpg - h0 : 8;
        __m512 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t j = 0; j < rk; j += 16) {
            const __mmask16 m = tail16(rk - j);
            const __m512 kv = _mm512_maskz_loadu_ps(m, k + j);
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                if (i < nh) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + (h0 + i) * rk + j), kv, acc[i]);
        }
        for (int i = 0; i < nh; i++) dst[(h0 + i) * stride] = _mm512_reduce_add_ps(acc[i]) * scale;
    }
#else
    for (int64_t h = 0; h < hpg; h++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < rk; j++) acc += q[h * rk + j] * k[j];
        dst[h * stride] = acc * scale;
    }
#endif
}

/* u[h] += sum_t p[h * T + t] * v[t] over nt decoded value rows v [nt, rv], for the hpg heads: up to 8 heads'
 * accumulators per 16 coordinates stay in registers while each value row is loaded once. */
static void weighted_rows(const float *p, int64_t T, int64_t hpg, int64_t rv, const float *v, int64_t nt,
                          float *u) {
#ifdef __AVX512F__
    for (int64_t h0 = 0; h0 < hpg; h0 += 8) {
        const int64_t nh = hpg - h0 < 8 ? hpg - h0 : 8;
        for (int64_t j = 0; j < rv; j += 16) {
            const __mmask16 m = tail16(rv - j);
            __m512 acc[8];
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                if (i < nh) acc[i] = _mm512_maskz_loadu_ps(m, u + (h0 + i) * rv + j);
            for (int64_t t = 0; t < nt; t++) {
                const __m512 vt = _mm512_maskz_loadu_ps(m, v + t * rv + j);
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++)
                    if (i < nh) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[(h0 + i) * T + t]), vt, acc[i]);
            }
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                if (i < nh) _mm512_mask_storeu_ps(u + (h0 + i) * rv + j, m, acc[i]);
        }
    }
#else
    for (int64_t h = 0; h < hpg; h++)
        for (int64_t t = 0; t < nt; t++)
            for (int64_t j = 0; j < rv; j++) u[h * rv + j] += p[h * T + t] * v[t * rv + j];
#endif
}

/* Softmax of each of the hpg rows p[h * T .. h * T + T - 1], in place. */
static void softmax_heads(float *p, int64_t hpg, int64_t T) {
    for (int64_t h = 0; h < hpg; h++) {
        float *ph = p + h * T, m = ph[0], sum = 0.0f;
        for (int64_t t = 1; t < T; t++) m = ph[t] > m ? ph[t] : m;
        for (int64_t t = 0; t < T; t++) {
            ph[t] = expf(ph[t] - m);
            sum += ph[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < T; t++) ph[t] *= inv;
    }
}

#define MAX_HD 512 /* apply_bv's buffer: head_dim up to this (cpu_latent.py MAX_HEAD_DIM, checked there) */

/* The attention output of one token for the hpg heads of a group: out_h = u_h . bv[h] (+ bias[h]), bv the heads'
 * rows of B_v [hpg, rv, hd], written at dst in float32 (32), bfloat16 (16, round to nearest even) or float16 (17). */
static void apply_bv(const float *ug, int64_t hpg, int64_t rv, int64_t hd, const float *bv, const float *bias,
                     void *dst, int out_bits) {
    float o[MAX_HD];
    for (int64_t h = 0; h < hpg; h++) {
        for (int64_t d = 0; d < hd; d++) o[d] = bias ? bias[h * hd + d] : 0.0f;
        const float *uh = ug + h * rv, *bh = bv + h * rv * hd;
        for (int64_t j = 0; j < rv; j++) {
            const float uj = uh[j], *row = bh + j * hd;
            for (int64_t d = 0; d < hd; d++) o[d] += uj * row[d];
        }
        for (int64_t d = 0; d < hd; d++) {
            const int64_t i = h * hd + d;
            if (out_bits == 32) {
                ((float *)dst)[i] = o[d];
            } else if (out_bits == 16) {
                uint32_t f;
                memcpy(&f, &o[d], 4);
                ((uint16_t *)dst)[i] = isnan(o[d]) ? (uint16_t)((f >> 16) | 0x40u)
                                                   : (uint16_t)((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
            } else {
#ifdef __F16C__
                ((uint16_t *)dst)[i] = _cvtss_sh(o[d], _MM_FROUND_TO_NEAREST_INT);
#endif
            }
        }
    }
}

/* The arguments both kernels share: queries q [*, Hq, rk] float32 (query heads of a group consecutive), the
 * token of each request's query in q / out given by q_rows; cache rows at
 * cache + block * block_stride + slot * token_stride (bytes); block_table [R, bt_stride] int32; seq_lens [R]
 * int32; kseg / vseg the row's segments (module doc); bv [Hq, rv, hd] each head's rows of B_v; bias [Hq, hd] or
 * NULL; out [tokens, Hq, hd] at out_stride elements per token, of out_bits (apply_bv). */

/* One query token per request (decodes). Returns 0, or -1 when a buffer cannot be allocated. */
int kvc_roped_decode(const float *q, const int32_t *q_rows, int64_t B, int64_t Hq, const uint8_t *cache,
                     int64_t block_stride, int64_t token_stride, int64_t block_size, const int32_t *block_table,
                     int64_t bt_stride, const int32_t *seq_lens, const int64_t *kseg, int nk, const int64_t *vseg,
                     int nv, int64_t scale_off, int64_t groups, int64_t rk, int64_t rv, const float *t4,
                     const float *t2, float scale, const float *bv, const float *bias, int64_t hd, void *out,
                     int64_t out_stride, int out_bits, int nthreads) {
    const int64_t hpg = Hq / groups, tasks = B * groups, esz = out_bits == 32 ? 4 : 2;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / groups, g = task % groups, T = seq_lens[b], n = q_rows[b];
        const float *qg = q + (n * Hq + g * hpg) * rk;
        float *p = malloc(sizeof(float) * (hpg * (T > 0 ? T : 0) + rk + VTILE * rv + hpg * rv));
        if (!p) {
            failed = 1;
            continue;
        }
        float *kb = p + hpg * T, *vb = kb + rk, *ug = vb + VTILE * rv;
        memset(ug, 0, sizeof(float) * hpg * rv);
        const int32_t *bt = block_table + b * bt_stride;
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *row = cache + (int64_t)bt[t / block_size] * block_stride + (t % block_size) * token_stride;
            decode_part(row, row + scale_off, kseg, nk, g, t4, t2, kb);
            score_row(qg, hpg, rk, kb, scale, p + t, T);
        }
        if (T > 0) softmax_heads(p, hpg, T);
        for (int64_t t0 = 0; t0 < T; t0 += VTILE) {
            const int64_t nt = T - t0 < VTILE ? T - t0 : VTILE;
            for (int64_t i = 0; i < nt; i++) {
                const int64_t t = t0 + i;
                const uint8_t *row = cache + (int64_t)bt[t / block_size] * block_stride + (t % block_size) * token_stride;
                decode_part(row, row + scale_off, vseg, nv, g, t4, t2, vb + i * rv);
            }
            weighted_rows(p + t0, T, hpg, rv, vb, nt, ug);
        }
        apply_bv(ug, hpg, rv, hd, bv + g * hpg * rv * hd, bias ? bias + g * hpg * hd : NULL,
                 (char *)out + (n * out_stride + g * hpg * hd) * esz, out_bits);
        free(p);
    }
    return failed ? -1 : 0;
}

/* Several query tokens per request (prompts, chunked prefills; one-token requests are fine too): request r's
 * query tokens are q_rows[q_start[r]] .. q_rows[q_start[r + 1] - 1], at positions seq_lens[r] - n_r + i, each
 * attending to the request's cached rows 0 .. its position (causal). Phase 1 decodes every cached row of these
 * requests once per group into kbuf [groups, rows, rk] and vbuf [groups, rows, rv] (request r's rows from
 * row_start[r]); phase 2 runs one task per query token and group: scores against the decoded key latents,
 * softmax, weighted sum of the value latents, B_v, for the N query tokens att[0..N-1] (indices into q_rows; the
 * caller may attend the others itself from kbuf / vbuf). tok_req: each query's request. Returns 0, or -1 when a
 * buffer cannot be allocated. */
int kvc_roped_prefill(const float *q, const int32_t *q_rows, const int32_t *q_start, const int32_t *tok_req,
                      const int32_t *att, int64_t R, int64_t N, int64_t Hq, const uint8_t *cache, int64_t block_stride,
                      int64_t token_stride, int64_t block_size, const int32_t *block_table, int64_t bt_stride,
                      const int32_t *seq_lens, const int64_t *row_start, const int64_t *kseg, int nk,
                      const int64_t *vseg, int nv, int64_t scale_off, int64_t groups, int64_t rk, int64_t rv,
                      const float *t4, const float *t2, float scale, float *kbuf, float *vbuf, const float *bv,
                      const float *bias, int64_t hd, void *out, int64_t out_stride, int out_bits, int nthreads) {
    const int64_t hpg = Hq / groups, rows = row_start[R], esz = out_bits == 32 ? 4 : 2;
    int64_t tmax = 1;
    for (int64_t r = 0; r < R; r++) tmax = seq_lens[r] > tmax ? seq_lens[r] : tmax;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        for (int64_t r = 0; r < R; r++) {
            const int32_t *bt = block_table + r * bt_stride;
#pragma omp for schedule(static) nowait
            for (int64_t t = 0; t < seq_lens[r]; t++) {
                const uint8_t *row = cache + (int64_t)bt[t / block_size] * block_stride + (t % block_size) * token_stride;
                for (int64_t g = 0; g < groups; g++) {
                    decode_part(row, row + scale_off, kseg, nk, g, t4, t2, kbuf + (g * rows + row_start[r] + t) * rk);
                    decode_part(row, row + scale_off, vseg, nv, g, t4, t2, vbuf + (g * rows + row_start[r] + t) * rv);
                }
            }
        }
#pragma omp barrier
        float *p = malloc(sizeof(float) * hpg * (tmax + rv));
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < N * groups; task++) {
            if (!p) continue;
            const int64_t i = att[task / groups], g = task % groups, r = tok_req[i], n = q_rows[i];
            const int64_t T = seq_lens[r] - (q_start[r + 1] - q_start[r]) + (i - q_start[r]) + 1;
            float *ug = p + hpg * tmax;
            memset(ug, 0, sizeof(float) * hpg * rv);
            if (T > 0) {
                const float *qg = q + (n * Hq + g * hpg) * rk, *kg = kbuf + (g * rows + row_start[r]) * rk;
                for (int64_t t = 0; t < T; t++) score_row(qg, hpg, rk, kg + t * rk, scale, p + t, T);
                softmax_heads(p, hpg, T);
                weighted_rows(p, T, hpg, rv, vbuf + (g * rows + row_start[r]) * rv, T, ug);
            }
            apply_bv(ug, hpg, rv, hd, bv + g * hpg * rv * hd, bias ? bias + g * hpg * hd : NULL,
                     (char *)out + (n * out_stride + g * hpg * hd) * esz, out_bits);
        }
        free(p);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------ encoder
 * The rows of a step's new tokens, written at their slots: layout.pack's quantizer (layout.quantize) in C.
 * int8: symmetric absmax, scale = fp16(max(amax / 127, 1e-6)), codes round-half-even(x / scale) in -127..127.
 * 4 / 2 bits: per scale group, both level tables (Gauss: positive scale, uniform: negative) at the scales
 * fp16(amax * f) for the table's factors; codes the nearest level (the number of midpoints below x / s); the
 * candidate of least squared error kept, the first on ties; a last group shorter than its span counts the
 * padding zeros' error as layout.quantize does. The squared errors are summed in another order than torch's,
 * so on a near-tie the other candidate may win: both then have the same error to float32 rounding. */
#ifdef __F16C__
static inline uint16_t f16_bits(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }

static void encode_part(const float *lat, int64_t part_w, uint8_t *row, int64_t scale_off, const int64_t *seg,
                        int nseg, int64_t groups, const float *tabs, const float *facs, const int *nfac,
                        uint8_t *cand, uint8_t *best_u) {
    int64_t start = 0;
    for (int s = 0; s < nseg; s++) {
        const int64_t *d = seg + SEG_FIELDS * s;
        const int64_t off = d[0], w = d[1], bits = d[2], sbase = d[3], sstride = d[4], qg = d[5];
        const int64_t span = qg ? qg : w, nsc = (w + span - 1) / span;
        for (int64_t g = 0; g < groups; g++) {
            const float *x = lat + g * part_w + start;
            for (int64_t c = 0; c < nsc; c++) {
                const int64_t j0 = c * span, n = w - j0 < span ? w - j0 : span;
                float amax = 0.0f;
                for (int64_t j = 0; j < n; j++) amax = fmaxf(amax, fabsf(x[j0 + j]));
                float sc;
                if (bits == 8) {
                    sc = _cvtsh_ss(f16_bits(fmaxf(amax / 127.0f, 1e-6f)));
                    for (int64_t j = 0; j < n; j++) {
                        float q = nearbyintf(x[j0 + j] / sc);
                        q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
                        row[off + g * w + j0 + j] = (uint8_t)(int8_t)q;
                    }
                } else {
                    amax = fmaxf(amax, 1e-6f);
                    const int nl = 1 << bits, b4 = bits == 4;
                    const float *tb = tabs + (b4 ? 0 : 62), *fb = facs + (b4 ? 0 : nfac[0] + nfac[1]);
                    const int *nf = nfac + (b4 ? 0 : 2);
                    float best_err = 0.0f;
                    int first = 1;
                    for (int t = 0; t < 2; t++) {
                        const float *L = tb + t * nl, *M = tb + 2 * nl + t * (nl - 1);
                        const float *F = fb + (t ? nf[0] : 0);
                        for (int k = 0; k < nf[t]; k++) {
                            const float s2 = _cvtsh_ss(f16_bits(amax * F[k]));
                            float err = 0.0f;
#ifdef __AVX512F__
                            { /* 16 values per step: IEEE division, midpoint counts, no FMA */
                                const __m512 sv = _mm512_set1_ps(s2), lt = _mm512_maskz_loadu_ps(tail16(nl), L);
                                const __m512i one = _mm512_set1_epi32(1);
                                __m512 acc = _mm512_setzero_ps();
                                for (int64_t j = 0; j < span; j += 16) {
                                    const __mmask16 m = tail16(n - j > 0 ? n - j : 0);
                                    const __mmask16 live = tail16(span - j);
                                    const __m512 xv = _mm512_maskz_loadu_ps(m, x + j0 + j);
                                    const __m512 y = _mm512_div_ps(xv, sv);
                                    __m512i u = _mm512_setzero_si512();
                                    for (int i = 0; i < nl - 1; i++)
                                        u = _mm512_mask_add_epi32(u, _mm512_cmp_ps_mask(_mm512_set1_ps(M[i]), y,
                                                                                         _CMP_LT_OQ), u, one);
                                    const __m512 dd = _mm512_sub_ps(_mm512_mul_ps(_mm512_permutexvar_ps(u, lt), sv), xv);
                                    acc = _mm512_mask_add_ps(acc, live, acc, _mm512_mul_ps(dd, dd));
                                    _mm_mask_storeu_epi8(cand + j, live, _mm512_cvtepi32_epi8(u));
                                }
                                err = _mm512_reduce_add_ps(acc);
                            }
#else
                            for (int64_t j = 0; j < span; j++) {
                                const float xv = j < n ? x[j0 + j] : 0.0f, y = xv / s2;
                                int u = 0;
                                for (int i = 0; i < nl - 1; i++) u += M[i] < y;
                                const float lv = L[u] * s2, dd = lv - xv;
                                err += dd * dd;
                                cand[j] = (uint8_t)u;
                            }
#endif
                            if (first || err < best_err) {
                                first = 0;
                                best_err = err;
                                sc = t ? -s2 : s2;
                                memcpy(best_u, cand, (size_t)n);
                            }
                        }
                    }
                    for (int64_t j = 0; j < n; j++) {
                        const int64_t i = g * w + j0 + j;
                        if (b4) row[off + (i >> 1)] |= (uint8_t)(best_u[j] << ((i & 1) * 4));
                        else row[off + (i >> 2)] |= (uint8_t)(best_u[j] << ((i & 3) * 2));
                    }
                }
                const uint16_t h = f16_bits(sc);
                memcpy(row + scale_off + 2 * (sbase + g * sstride + c), &h, 2);
            }
        }
        start += w;
    }
}
#endif

/* lat [n, groups * (rk + rv)] float32 (K part then V part of each row); slots [n] int64 (< 0: skipped).
 * tabs: Gauss then uniform 4-bit levels (32), their midpoints (30), then the same for 2 bits (8 + 6);
 * facs: the scale factors of 4-bit Gauss, 4-bit uniform, 2-bit Gauss, 2-bit uniform; nfac their counts.
 * Returns 0; -2 when built without F16C (the caller keeps layout.pack). */
int kvc_encode_rows(const float *lat, int64_t n, int64_t rk, int64_t rv, uint8_t *cache, int64_t block_stride,
                    int64_t token_stride, int64_t block_size, const int64_t *slots, const int64_t *kseg, int nk,
                    const int64_t *vseg, int nv, int64_t scale_off, int64_t row_bytes, int64_t groups,
                    const float *tabs, const float *facs, const int *nfac) {
#ifdef __F16C__
    uint8_t *buf = malloc((size_t)row_bytes + 2 * (size_t)(rk > rv ? rk : rv) + 64);
    if (!buf) return -1;
    uint8_t *cand = buf + row_bytes, *best = cand + (rk > rv ? rk : rv) + 32;
    const int64_t width = groups * (rk + rv);
    for (int64_t i = 0; i < n; i++) {
        const int64_t slot = slots[i];
        if (slot < 0) continue;
        memset(buf, 0, (size_t)row_bytes);
        encode_part(lat + i * width, rk, buf, scale_off, kseg, nk, groups, tabs, facs, nfac, cand, best);
        encode_part(lat + i * width + groups * rk, rv, buf, scale_off, vseg, nv, groups, tabs, facs, nfac, cand, best);
        memcpy(cache + (slot / block_size) * block_stride + (slot % block_size) * token_stride, buf, (size_t)row_bytes);
    }
    free(buf);
    return 0;
#else
    (void)lat; (void)n; (void)rk; (void)rv; (void)cache; (void)block_stride; (void)token_stride; (void)block_size;
    (void)slots; (void)kseg; (void)nk; (void)vseg; (void)nv; (void)scale_off; (void)row_bytes; (void)groups;
    (void)tabs; (void)facs; (void)nfac;
    return -2;
#endif
}
