/* The Aligner term on CPU, fused: one pass per token, adding into the attention output in place.

   For every token t with slot s = tok_slot[t] != 0, kv head h, and query head g of its group:
       p   = softmax_j( q[t,h,g,:] . k[s,h,j,:] * scale ),  j < ntok[s]
       out[t,h,g,:] += gate[s,h,g] * sum_j p[j] * v[s,h,j,:]

   Shapes (one layer of the table, C-contiguous):
       out, q  [T, KVH*G*D]     float32 or bfloat16 (the model's dtype; q is only read); rows may be
                                strided (vLLM's q is a view into the fused qkv output), each row dense
       k, v    [S, KVH, Nm, D]  float32
       gate    [S, KVH, G]      float32, after activation
       ntok    [S]              int64, the adapter's N (0 = empty slot)
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

/* The term for one query row: acc[D] = gate * sum_j softmax_j(qf . k_j * scale) v_j. */
static inline __attribute__((always_inline)) void head_term(
    float *restrict acc, const float *restrict qf, const float *restrict k, const float *restrict v,
    int64_t n, int64_t D, float scale, float gate) {
    float p[MAX_N];
    if (n == 1) {
        p[0] = 1.0f; /* the softmax over one key is 1 */
    } else {
        float m = -3.0e38f;
        for (int64_t j = 0; j < n; j++) {
            const float *kj = k + j * D;
            float s = 0.0f;
            for (int64_t d = 0; d < D; d++) s += qf[d] * kj[d];
            p[j] = s * scale;
            m = p[j] > m ? p[j] : m;
        }
        /* exp over whole vectors of 8, so no key falls to a scalar expf tail (n = 4 would be all tail).
           Padding lanes hold m - 80: exp gives ~1e-35, inside float range, so the vector exp never takes
           its slow special-case path (as -inf or -1e30 would) and the sum is unchanged in float32 */
        const int64_t n8 = (n + 7) & ~(int64_t)7;
        for (int64_t j = n; j < n8; j++) p[j] = m - 80.0f;
        float tot = 0.0f;
        for (int64_t j = 0; j < n8; j++) {
            p[j] = expf(p[j] - m);
            tot += p[j];
        }
        const float inv = 1.0f / tot;
        for (int64_t j = 0; j < n; j++) p[j] *= inv;
    }
    for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float *vj = v + j * D;
        const float w = p[j];
        for (int64_t d = 0; d < D; d++) acc[d] += w * vj[d];
    }
    for (int64_t d = 0; d < D; d++) acc[d] *= gate;
}

/* One body per (dtype, D): a compile-time D lets the compiler unroll and vectorise the rows. */
#define DEFINE_KERNEL(NAME, TYPE, LOAD, STORE_ADD, DIM)                                                  \
    static void NAME(TYPE *restrict out, const TYPE *restrict q, const int64_t *restrict tok_slot,       \
                     const float *restrict k, const float *restrict v, const float *restrict gate,       \
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
                const float *kb = k + ((s * KVH + h) * Nm) * D;                                          \
                const float *vb = v + ((s * KVH + h) * Nm) * D;                                          \
                for (int64_t g = 0; g < G; g++) {                                                        \
                    const int64_t col = (h * G + g) * D;                                                 \
                    const TYPE *qr = q + t * q_row + col;                                                \
                    TYPE *outr = out + t * out_row + col;                                                \
                    for (int64_t d = 0; d < D; d++) qf[d] = LOAD(qr[d]);                                 \
                    head_term(acc, qf, kb, vb, n, D, scale, gate[(s * KVH + h) * G + g]);                \
                    for (int64_t d = 0; d < D; d++) STORE_ADD(outr[d], acc[d]);                          \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }

#define LOAD_F32(x) (x)
#define ADD_F32(o, a) ((o) += (a))
#define ADD_BF16(o, a) ((o) = f32_to_bf16(bf16_to_f32(o) + bf16_to_f32(f32_to_bf16(a))))

DEFINE_KERNEL(f32_d64, float, LOAD_F32, ADD_F32, 64)
DEFINE_KERNEL(f32_d128, float, LOAD_F32, ADD_F32, 128)
DEFINE_KERNEL(f32_any, float, LOAD_F32, ADD_F32, 0)
DEFINE_KERNEL(bf16_d64, uint16_t, bf16_to_f32, ADD_BF16, 64)
DEFINE_KERNEL(bf16_d128, uint16_t, bf16_to_f32, ADD_BF16, 128)
DEFINE_KERNEL(bf16_any, uint16_t, bf16_to_f32, ADD_BF16, 0)

/* dtype: 0 float32, 1 bfloat16. Returns 0; -1 for shapes this kernel does not take; -2 when a token's
   slot is outside the table's S slots (nothing is written then). */
int aligner_apply(void *out, const void *q, const int64_t *tok_slot, const float *k, const float *v,
                  const float *gate, const int64_t *ntok, float scale, int64_t T, int64_t S, int64_t KVH,
                  int64_t G, int64_t Nm, int64_t n_cap, int64_t D, int64_t q_row, int64_t out_row, int64_t dtype) {
    if (D > MAX_D || Nm > MAX_N || D <= 0) return -1;
    for (int64_t t = 0; t < T; t++)
        if (tok_slot[t] < 0 || tok_slot[t] >= S) return -2;
    if (dtype == 0) {
        if (D == 64) f32_d64(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row);
        else if (D == 128) f32_d128(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row);
        else f32_any(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row);
        return 0;
    }
    if (dtype == 1) {
        if (D == 64) bf16_d64(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row);
        else if (D == 128) bf16_d128(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row);
        else bf16_any(out, q, tok_slot, k, v, gate, ntok, scale, T, KVH, G, Nm, n_cap, D, q_row, out_row);
        return 0;
    }
    return -1;
}
