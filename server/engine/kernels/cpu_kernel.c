/* The Aligner term on CPU, fused: one pass per token, adding into the attention output in place.

   For every token t with slot s = tok_slot[t] != 0, kv head h, and query head g of its group:
       p   = softmax_j( q[t,h,g,:] . k[s,h,j,:] * scale ),  j < ntok[s]
       out[t,h,g,:] += gate[s,h,g] * sum_j p[j] * v[s,h,j,:]

   Shapes (one layer of the table, C-contiguous):
       out, q  [T, KVH*G*D]     float32 or bfloat16 (the model's dtype; q is only read); rows may be
                                strided (vLLM's q is a view into the fused qkv output), each row dense
       k, v    [L, S, KVH, Nm, D]  float32, or bfloat16 for a bfloat16 model (whose K_p/V_p are bfloat16
                                values, so the narrower table is exact and halves what each token reads)
       gate    [L, S, KVH, G]   float32, after activation
       ntok    [S]              int64, the adapter's N (0 = empty slot)
   The calls: the caller fills an `aligner_table` once per table and an `aligner_step` once per forward;
   `aligner_begin` checks the step (every slot inside the table) once, then `aligner_layer` runs each
   layer with four arguments. The fixed cost per call is what matters at small T: 30 layers x every
   forward, each after the layer's weights have streamed through the caches.
   The loop runs over each adapter's own N, so no mask and no infinities reach the arithmetic. It is
   single-threaded: the engine's own threads are busy elsewhere, and a second OpenMP runtime would fight
   torch's. Compiled at first use with -O3 -march=native (server/engine/cpu_kernel.py). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_D 256
#define MAX_N 64

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The term for one query row: acc[D] = gate * sum_j softmax_j(qf . k_j * scale) v_j, over key rows of
   element type KTYPE read with KLOAD. */
#define DEFINE_HEAD_TERM(NAME, KTYPE, KLOAD)                                                             \
    static inline __attribute__((always_inline)) void NAME(                                              \
        float *restrict acc, const float *restrict qf, const KTYPE *restrict k, const KTYPE *restrict v, \
        int64_t n, int64_t D, float scale, float gate) {                                                 \
        float p[MAX_N];                                                                                  \
        if (n == 1) {                                                                                    \
            p[0] = 1.0f; /* the softmax over one key is 1 */                                             \
        } else {                                                                                         \
            float m = -3.0e38f;                                                                          \
            for (int64_t j = 0; j < n; j++) {                                                            \
                const KTYPE *kj = k + j * D;                                                             \
                float s = 0.0f;                                                                          \
                for (int64_t d = 0; d < D; d++) s += qf[d] * KLOAD(kj[d]);                               \
                p[j] = s * scale;                                                                        \
                m = p[j] > m ? p[j] : m;                                                                 \
            }                                                                                            \
            /* exp over whole vectors of 8, so no key falls to a scalar expf tail (n = 4 would be all    \
               tail). Padding lanes hold m - 80: exp gives ~1e-35, inside float range, so the vector exp \
               never takes its slow special-case path (as -inf or -1e30 would) and the sum is unchanged */ \
            const int64_t n8 = (n + 7) & ~(int64_t)7;                                                    \
            for (int64_t j = n; j < n8; j++) p[j] = m - 80.0f;                                           \
            float tot = 0.0f;                                                                            \
            for (int64_t j = 0; j < n8; j++) {                                                           \
                p[j] = expf(p[j] - m);                                                                   \
                tot += p[j];                                                                             \
            }                                                                                            \
            const float inv = 1.0f / tot;                                                                \
            for (int64_t j = 0; j < n; j++) p[j] *= inv;                                                 \
        }                                                                                                \
        for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;                                                   \
        for (int64_t j = 0; j < n; j++) {                                                                \
            const KTYPE *vj = v + j * D;                                                                 \
            const float w = p[j];                                                                        \
            for (int64_t d = 0; d < D; d++) acc[d] += w * KLOAD(vj[d]);                                  \
        }                                                                                                \
        for (int64_t d = 0; d < D; d++) acc[d] *= gate;                                                  \
    }

#define LOAD_F32(x) (x)
DEFINE_HEAD_TERM(head_term_f32, float, LOAD_F32)
DEFINE_HEAD_TERM(head_term_bf16, uint16_t, bf16_to_f32)

/* One body per (dtype, table dtype, D): a compile-time D lets the compiler unroll and vectorise the rows. */
#define DEFINE_KERNEL(NAME, TYPE, LOAD, STORE_ADD, KTYPE, HEAD, DIM)                                     \
    static void NAME(TYPE *restrict out, const TYPE *restrict q, const int64_t *restrict tok_slot,       \
                     const KTYPE *restrict k, const KTYPE *restrict v, const float *restrict gate,       \
                     const int64_t *restrict ntok, float scale, int64_t T, int64_t KVH, int64_t G,       \
                     int64_t Nm, int64_t n_cap, int64_t D_rt, int64_t q_row, int64_t out_row) {           \
        const int64_t D = DIM ? DIM : D_rt;                                                              \
        float qf[MAX_D], acc[MAX_D];                                                                     \
        for (int64_t t = 0; t < T; t++) {                                                                \
            const int64_t s = tok_slot[t];                                                               \
            if (s == 0) continue;                                                                        \
            int64_t n = ntok[s] < n_cap ? ntok[s] : n_cap;                                               \
            if (n <= 0) continue;                                                                        \
            for (int64_t h = 0; h < KVH; h++) {                                                          \
                const KTYPE *kb = k + ((s * KVH + h) * Nm) * D;                                          \
                const KTYPE *vb = v + ((s * KVH + h) * Nm) * D;                                          \
                for (int64_t g = 0; g < G; g++) {                                                        \
                    const int64_t col = (h * G + g) * D;                                                 \
                    const TYPE *qr = q + t * q_row + col;                                                \
                    TYPE *outr = out + t * out_row + col;                                                \
                    for (int64_t d = 0; d < D; d++) qf[d] = LOAD(qr[d]);                                 \
                    HEAD(acc, qf, kb, vb, n, D, scale, gate[(s * KVH + h) * G + g]);                     \
                    for (int64_t d = 0; d < D; d++) STORE_ADD(outr[d], acc[d]);                          \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }

#define ADD_F32(o, a) ((o) += (a))
#define ADD_BF16(o, a) ((o) = f32_to_bf16(bf16_to_f32(o) + bf16_to_f32(f32_to_bf16(a))))

/* The portable loops for one (dtype, table dtype): D = 64 and 128 unrolled, any other D at run time. */
#define DEFINE_PORTABLE(NAME, TYPE, LOAD, STORE_ADD, KTYPE, HEAD)                                        \
    DEFINE_KERNEL(NAME##_d64, TYPE, LOAD, STORE_ADD, KTYPE, HEAD, 64)                                    \
    DEFINE_KERNEL(NAME##_d128, TYPE, LOAD, STORE_ADD, KTYPE, HEAD, 128)                                  \
    DEFINE_KERNEL(NAME##_any, TYPE, LOAD, STORE_ADD, KTYPE, HEAD, 0)                                     \
    static void NAME(TYPE *out, const TYPE *q, const int64_t *tok_slot, const KTYPE *k, const KTYPE *v,  \
                     const float *gate, const int64_t *ntok, float scale, int64_t T, int64_t KVH,        \
                     int64_t G, int64_t Nm, int64_t n_cap, int64_t D, int64_t q_row, int64_t out_row) {  \
        if (D == 64) NAME##_d64(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row); \
        else if (D == 128) NAME##_d128(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row); \
        else NAME##_any(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row); \
    }

DEFINE_PORTABLE(p_f32_f32, float, LOAD_F32, ADD_F32, float, head_term_f32)
DEFINE_PORTABLE(p_f32_bf16, float, LOAD_F32, ADD_F32, uint16_t, head_term_bf16)
DEFINE_PORTABLE(p_bf16_f32, uint16_t, bf16_to_f32, ADD_BF16, float, head_term_f32)
DEFINE_PORTABLE(p_bf16_bf16, uint16_t, bf16_to_f32, ADD_BF16, uint16_t, head_term_bf16)

#if defined(__AVX512F__) && !defined(ALIGNER_PORTABLE)
/* The same computation with AVX-512 intrinsics, 16 floats per register, for head_dim a multiple of 16
   (64 and 128) and G <= VMAX_G: the kv head's G query rows share each key and value load,
   the scores of all keys sit in one register for the softmax, and bf16 rows convert 16 at a time. The
   portable loops above are its twin (tests build both and compare them with the torch reference). */
#include <immintrin.h>

/* The first token at or after t that has an adapter (T if none). */
static inline int64_t next_adapted(const int64_t *tok_slot, int64_t t, int64_t T) {
    while (t < T && tok_slot[t] == 0) t++;
    return t;
}

/* Prefetch the rows a token will read: its n keys and values of every kv head (`es` bytes an element),
   and its gates. */
static inline __attribute__((always_inline)) void prefetch_token(
    const void *k, const void *v, const float *gate, int64_t s, int64_t n, int64_t KVH, int64_t G,
    int64_t Nm, int64_t D, int64_t es) {
    for (int64_t h = 0; h < KVH; h++) {
        const char *kb = (const char *)k + ((s * KVH + h) * Nm) * D * es;
        const char *vb = (const char *)v + ((s * KVH + h) * Nm) * D * es;
        for (int64_t b = 0; b < n * D * es; b += 64) {
            if (n > 1) __builtin_prefetch(kb + b, 0, 3); /* one key: its softmax is 1, the key is not read */
            __builtin_prefetch(vb + b, 0, 3);
        }
    }
    __builtin_prefetch(gate + s * KVH * G, 0, 3);
}


#define VMAX_G 4 /* query heads per kv head */
#define VMAX_C 8 /* head_dim / 16: 64 or 128 */

static inline __m512 v_load_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline __m512i v_round_bits(__m512 x) { /* float32 -> bfloat16 bits (in the high half), nearest even */
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    return _mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u));
}

static inline void v_add_bf16(uint16_t *o, __m512 a) { /* o = bf16(o + bf16(a)), as out.add_(a.to(bf16)) */
    __m512 sum = _mm512_add_ps(v_load_bf16(o), _mm512_castsi512_ps(v_round_bits(a)));
    __m512i bits = _mm512_srli_epi32(v_round_bits(sum), 16);
    _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(bits));
}

static inline __m512 v_load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_add_f32(float *o, __m512 a) { _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a)); }

/* w[g][0..n) <- gate[g] * softmax(scores[g][0..n)) for the G rows; n <= MAX_N, lanes past n ignored. */
static inline void v_softmax_gated(float (*w)[MAX_N], int64_t G, int64_t n, const float *gate) {
    for (int64_t g = 0; g < G; g++) {
        float *p = w[g];
        float m = -3.0e38f;
        for (int64_t j = 0; j < n; j++) m = p[j] > m ? p[j] : m;
        __m512 tot = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            __mmask16 live = (__mmask16)(n - j0 >= 16 ? 0xFFFF : (1u << (n - j0)) - 1);
            /* dead lanes hold m - 80: exp stays in range (~1e-35) and is masked out of the sum */
            __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(m - 80.0f), live, p + j0);
            float e[16];
            _mm512_storeu_ps(e, _mm512_sub_ps(x, _mm512_set1_ps(m)));
            for (int i = 0; i < 16; i++) e[i] = expf(e[i]); /* one vector expf call (-ffast-math) */
            __m512 ev = _mm512_maskz_loadu_ps(live, e);
            tot = _mm512_add_ps(tot, ev);
            _mm512_mask_storeu_ps(p + j0, live, ev);
        }
        const __m512 scale = _mm512_set1_ps(gate[g] / _mm512_reduce_add_ps(tot));
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            __mmask16 live = (__mmask16)(n - j0 >= 16 ? 0xFFFF : (1u << (n - j0)) - 1);
            _mm512_mask_storeu_ps(p + j0, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, p + j0), scale));
        }
    }
}

#define DEFINE_VKERNEL(NAME, TYPE, VLOAD, VADD, KTYPE, KLOAD)                                           \
    static inline __attribute__((always_inline)) void NAME##_body(TYPE *restrict out, const TYPE *restrict q, const int64_t *restrict tok_slot,       \
                     const KTYPE *restrict k, const KTYPE *restrict v, const float *restrict gate,       \
                     const int64_t *restrict ntok, float scale, int64_t T, int64_t KVH, int64_t G,       \
                     int64_t Nm, int64_t n_cap, int64_t D, int64_t q_row, int64_t out_row) {             \
        const int64_t C = D / 16;                                                                        \
        __m512 qv[VMAX_G][VMAX_C];                                                                        \
        float w[VMAX_G][MAX_N];                                                                           \
        for (int64_t t = next_adapted(tok_slot, 0, T), next; t < T; t = next) {                          \
            const int64_t s = tok_slot[t];                                                               \
            const int64_t n = ntok[s] < n_cap ? ntok[s] : n_cap;                                         \
            next = next_adapted(tok_slot, t + 1, T);                                                     \
            if (next < T && tok_slot[next] != s) {                                                       \
                const int64_t s2 = tok_slot[next];                                                       \
                prefetch_token(k, v, gate, s2, ntok[s2] < n_cap ? ntok[s2] : n_cap, KVH, G, Nm, D, sizeof(KTYPE)); \
            }                                                                                            \
            if (n <= 0) continue;                                                                        \
            for (int64_t h = 0; h < KVH; h++) {                                                          \
                const KTYPE *kb = k + ((s * KVH + h) * Nm) * D;                                          \
                const KTYPE *vb = v + ((s * KVH + h) * Nm) * D;                                          \
                const float *gh = gate + (s * KVH + h) * G;                                              \
                const TYPE *qh = q + t * q_row + h * G * D;                                              \
                TYPE *oh = out + t * out_row + h * G * D;                                                \
                if (n == 1) { /* the softmax over one key is 1: out += gate * v_0 */                     \
                    for (int64_t g = 0; g < G; g++) {                                                    \
                        const __m512 gg = _mm512_set1_ps(gh[g]);                                         \
                        for (int64_t c = 0; c < C; c++)                                                  \
                            VADD(oh + g * D + 16 * c, _mm512_mul_ps(gg, KLOAD(vb + 16 * c)));           \
                    }                                                                                    \
                    continue;                                                                            \
                }                                                                                        \
                for (int64_t g = 0; g < G; g++)                                                          \
                    for (int64_t c = 0; c < C; c++) qv[g][c] = VLOAD(qh + g * D + 16 * c);               \
                for (int64_t j = 0; j < n; j++) {                                                        \
                    const KTYPE *kj = kb + j * D;                                                        \
                    __m512 acc[VMAX_G];                                                                   \
                    for (int64_t g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();                        \
                    for (int64_t c = 0; c < C; c++) {                                                    \
                        const __m512 kc = KLOAD(kj + 16 * c);                                            \
                        for (int64_t g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(qv[g][c], kc, acc[g]);  \
                    }                                                                                    \
                    for (int64_t g = 0; g < G; g++) w[g][j] = _mm512_reduce_add_ps(acc[g]) * scale;      \
                }                                                                                        \
                v_softmax_gated(w, G, n, gh);                                                            \
                for (int64_t c0 = 0; c0 < C; c0 += 4) { /* 64 columns at a time: G x 4 accumulators */   \
                    const int64_t cn = C - c0 < 4 ? C - c0 : 4;                                          \
                    __m512 acc[VMAX_G][4];                                                                \
                    for (int64_t g = 0; g < G; g++)                                                      \
                        for (int64_t c = 0; c < cn; c++) acc[g][c] = _mm512_setzero_ps();                \
                    for (int64_t j = 0; j < n; j++) {                                                    \
                        const KTYPE *vj = vb + j * D + 16 * c0;                                          \
                        __m512 vc[4];                                                                    \
                        for (int64_t c = 0; c < cn; c++) vc[c] = KLOAD(vj + 16 * c);                     \
                        for (int64_t g = 0; g < G; g++) {                                                \
                            const __m512 wg = _mm512_set1_ps(w[g][j]);                                   \
                            for (int64_t c = 0; c < cn; c++) acc[g][c] = _mm512_fmadd_ps(wg, vc[c], acc[g][c]); \
                        }                                                                                \
                    }                                                                                    \
                    for (int64_t g = 0; g < G; g++)                                                      \
                        for (int64_t c = 0; c < cn; c++) VADD(oh + g * D + 16 * (c0 + c), acc[g][c]);    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }

DEFINE_VKERNEL(v_f32_f32, float, v_load_f32, v_add_f32, float, v_load_f32)
DEFINE_VKERNEL(v_f32_bf16, float, v_load_f32, v_add_f32, uint16_t, v_load_bf16)
DEFINE_VKERNEL(v_bf16_f32, uint16_t, v_load_bf16, v_add_bf16, float, v_load_f32)
DEFINE_VKERNEL(v_bf16_bf16, uint16_t, v_load_bf16, v_add_bf16, uint16_t, v_load_bf16)

/* G and head_dim as compile-time constants, so the accumulators live in registers. Returns 0 when it ran,
   -1 for a layout it does not take (the portable loops run then). */
#define VCASE(BODY, GG, DD)                                                                              \
    if (G == GG && D == DD) {                                                                            \
        BODY(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, GG, Nm, n_cap, DD, q_row, out_row);      \
        return 0;                                                                                        \
    }
#define DEFINE_VDISPATCH(NAME, TYPE, KTYPE)                                                              \
    static int NAME(TYPE *out, const TYPE *q, const int64_t *tok_slot, const KTYPE *k, const KTYPE *v,   \
                    const float *gate, const int64_t *ntok, float scale, int64_t T, int64_t KVH,         \
                    int64_t G, int64_t Nm, int64_t n_cap, int64_t D, int64_t q_row, int64_t out_row) {   \
        VCASE(NAME##_body, 1, 64) VCASE(NAME##_body, 2, 64) VCASE(NAME##_body, 3, 64)                    \
        VCASE(NAME##_body, 4, 64) VCASE(NAME##_body, 1, 128) VCASE(NAME##_body, 2, 128)                  \
        VCASE(NAME##_body, 3, 128) VCASE(NAME##_body, 4, 128)                                            \
        return -1;                                                                                       \
    }
DEFINE_VDISPATCH(v_f32_f32, float, float)
DEFINE_VDISPATCH(v_f32_bf16, float, uint16_t)
DEFINE_VDISPATCH(v_bf16_f32, uint16_t, float)
DEFINE_VDISPATCH(v_bf16_bf16, uint16_t, uint16_t)
#define HAVE_VKERNEL 1
#endif

/* What the kernel knows of the adapter table: filled once per table (cpu_kernel.py: BoundKernel). */
typedef struct {
    const void *k, *v;     /* [L, S, KVH, Nm, D], kv_dtype */
    const float *gate;     /* [L, S, KVH, G] */
    const int64_t *ntok;   /* [S] */
    int64_t L, S, KVH, G, Nm, D;
    int64_t kv_dtype;      /* 0 float32, 1 bfloat16 */
    float scale;
} aligner_table;

/* One forward, the same for all its layers: filled by the caller, checked by aligner_begin. */
typedef struct {
    const aligner_table *table;
    const int64_t *tok_slot; /* [T] */
    int64_t T, n_cap;        /* tokens; the forward's largest N */
    int64_t q_row, out_row;  /* row strides of q and out, in elements */
    int64_t dtype;           /* of q and out: 0 float32, 1 bfloat16 */
    int64_t checked;         /* set by aligner_begin */
} aligner_step;

/* Check a step once for all its layers. Returns 0; -1 for shapes or dtypes this kernel does not take;
   -2 when a token's slot is outside the table's S slots. */
int aligner_begin(aligner_step *st) {
    const aligner_table *tb = st->table;
    st->checked = 0;
    if (tb->D > MAX_D || tb->Nm > MAX_N || tb->D <= 0 || tb->Nm <= 0 || st->n_cap > tb->Nm || st->T < 0) return -1;
    if ((st->dtype != 0 && st->dtype != 1) || (tb->kv_dtype != 0 && tb->kv_dtype != 1)) return -1;
    for (int64_t t = 0; t < st->T; t++)
        if (st->tok_slot[t] < 0 || st->tok_slot[t] >= tb->S) return -2;
    st->checked = 1;
    return 0;
}

#define CALL(FN, TYPE, KTYPE)                                                                            \
    FN((TYPE *)out, (const TYPE *)q, st->tok_slot, (const KTYPE *)k, (const KTYPE *)v, gate, tb->ntok,   \
       tb->scale, st->T, tb->KVH, tb->G, tb->Nm, st->n_cap, tb->D, st->q_row, st->out_row)

/* The AVX-512 body where it takes the layout, else the portable loops. */
#ifdef HAVE_VKERNEL
#define RUN(VEC, PORTABLE, TYPE, KTYPE) \
    if (CALL(VEC, TYPE, KTYPE) != 0) CALL(PORTABLE, TYPE, KTYPE)
#else
#define RUN(VEC, PORTABLE, TYPE, KTYPE) CALL(PORTABLE, TYPE, KTYPE)
#endif

/* out += the Aligner term of `layer`, for a step aligner_begin accepted. Returns 0; -3 when the step was
   not checked or the layer is outside the table (nothing is written then). */
int aligner_layer(const aligner_step *st, void *out, const void *q, int64_t layer) {
    const aligner_table *tb = st->table;
    if (!st->checked || layer < 0 || layer >= tb->L) return -3;
    const int64_t es = tb->kv_dtype ? 2 : 4, per_layer = tb->S * tb->KVH * tb->Nm * tb->D * es;
    const void *k = (const char *)tb->k + layer * per_layer, *v = (const char *)tb->v + layer * per_layer;
    const float *gate = tb->gate + layer * tb->S * tb->KVH * tb->G;
    switch (st->dtype * 2 + tb->kv_dtype) { /* activations, table */
    case 0: RUN(v_f32_f32, p_f32_f32, float, float); break;
    case 1: RUN(v_f32_bf16, p_f32_bf16, float, uint16_t); break;
    case 2: RUN(v_bf16_f32, p_bf16_f32, uint16_t, float); break;
    default: RUN(v_bf16_bf16, p_bf16_bf16, uint16_t, uint16_t); break;
    }
    return 0;
}

/* Which body runs where it can: 512 for the AVX-512 one, 0 for the portable loops only. */
int aligner_simd_width(void) {
#ifdef HAVE_VKERNEL
    return 512;
#else
    return 0;
#endif
}
