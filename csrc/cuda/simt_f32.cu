// float32 on CUDA: a simple, exact-order SIMT path (no tensor cores), one
// thread per output element with plain fp32 loops. Correctness, not speed:
// bf16/fp16 are the fast paths. Deterministic (fixed loop orders, no atomics).
// Workspace: the backward keeps dh [n, 2I] f32 (it fits in the bf16 layout's
// dh + s*a + dx-window buffers in most shapes; the workspace queries also
// cover it otherwise); the forward without h (no-grad) keeps h [n, 2I] f32 there.
#include "cuda/simt_f32.h"

namespace moe {
namespace cuda {
namespace {

__device__ __forceinline__ int64_t clampi(int64_t v, int64_t n) {
  return v < 0 ? 0 : (v >= n ? n - 1 : v);
}
__device__ __forceinline__ float sigm(float g) { return 1.f / (1.f + expf(-g)); }

struct RW {  // routing weights [T,k]
  const void *p;
  int dtype;
  int64_t s0, s1;
  __device__ __forceinline__ float at(int64_t t, int64_t j) const {
    return load_weight(p, dtype, t * s0 + j * s1);
  }
};

// h[r][c] = sum_h x[t_r][h] W1[e_r][c][h]
__global__ void f32_h(const float *x, int64_t ldx, const float *W1, int64_t w1e, int64_t w1r,
                      const int32_t *sorted, const int32_t *expert_of_row, int64_t n, int k,
                      int H, int twoI, float *h, int64_t ldh) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * twoI) return;
  const int64_t r = idx / twoI;
  const int c = int(idx % twoI);
  const int64_t t = clampi(sorted[r], n) / k;
  const float *xr = x + t * ldx;
  const float *wr = W1 + int64_t(expert_of_row[r]) * w1e + int64_t(c) * w1r;
  float acc = 0.f;
  for (int i = 0; i < H; ++i) acc += xr[i] * wr[i];
  h[r * ldh + c] = acc;
}

// expert of each plan row (from the clamped, monotone segments)
__global__ void f32_row_experts(const int32_t *off, int E, int64_t n, int32_t *er) {
  const int e = blockIdx.x;
  int64_t s = off[e], t = off[e + 1];
  s = s < 0 ? 0 : (s > n ? n : s);
  t = t < s ? s : (t > n ? n : t);
  for (int64_t r = s + threadIdx.x; r < t; r += blockDim.x) er[r] = e;
}

// out[t][o] = sum_j s_tj sum_i a_r[i] W2[e_r][o][i], r = rows[t*k+j], a from h
__global__ void f32_out(const float *h, int64_t ldh, const float *W2, int64_t w2e, int64_t w2r,
                        const int32_t *rows, const int32_t *er, RW sw, int64_t T, int k, int H,
                        int I, int64_t n, float *out, int64_t ldo) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * H) return;
  const int64_t t = idx / H;
  const int o = int(idx % H);
  float acc = 0.f;
  for (int j = 0; j < k; ++j) {
    const int64_t r = clampi(rows[t * k + j], n);
    const float *hr = h + r * ldh;
    const float *wr = W2 + int64_t(er[r]) * w2e + int64_t(o) * w2r;
    float y = 0.f;
    for (int i = 0; i < I; ++i) y += hr[i] * sigm(hr[i]) * hr[I + i] * wr[i];
    acc += sw.at(t, j) * y;
  }
  out[t * ldo + o] = acc;
}

// dA'[r][i] = sum_o dout[t_r][o] W2[e_r][o][i] -> stored in dh[r][I+i] (temporarily)
__global__ void f32_dA(const float *dout, int64_t ldd, const float *W2, int64_t w2e, int64_t w2r,
                       const int32_t *sorted, const int32_t *er, int64_t n, int k, int H, int I,
                       float *dh) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * I) return;
  const int64_t r = idx / I;
  const int i = int(idx % I);
  const int64_t t = clampi(sorted[r], n) / k;
  const float *dr = dout + t * ldd;
  const float *w = W2 + int64_t(er[r]) * w2e + i;
  float acc = 0.f;
  for (int o = 0; o < H; ++o) acc += dr[o] * w[int64_t(o) * w2r];
  dh[r * 2 * I + I + i] = acc;
}

// ds_r = <dA'_r, a_r> (one thread per row), written to grad_s[t, j]
__global__ void f32_ds(const float *h, int64_t ldh, const float *dh, const int32_t *sorted,
                       int64_t n, int k, int I, void *gs, int gs_dtype, int64_t g0, int64_t g1) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const float *hr = h + r * ldh;
  const float *d = dh + r * 2 * I + I;
  float acc = 0.f;
  for (int i = 0; i < I; ++i) acc += d[i] * hr[i] * sigm(hr[i]) * hr[I + i];
  const int64_t p = clampi(sorted[r], n);
  const int64_t off = (p / k) * g0 + (p % k) * g1;
  store_weight(gs, gs_dtype, off, acc);
}

// dh[r] = [dg ; du] from dA' (in dh[r][I..]) and h
__global__ void f32_dh(const float *h, int64_t ldh, float *dh, const int32_t *sorted, RW sw,
                       int64_t n, int k, int I) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * I) return;
  const int64_t r = idx / I;
  const int i = int(idx % I);
  const int64_t p = clampi(sorted[r], n);
  const float s = sw.at(p / k, p % k);
  const float g = h[r * ldh + i], u = h[r * ldh + I + i];
  const float sg = sigm(g);
  const float da = s * dh[r * 2 * I + I + i];
  dh[r * 2 * I + i] = da * u * (sg * (1.f + g * (1.f - sg)));
  dh[r * 2 * I + I + i] = da * g * sg;
}

// dW2[e][o][i] = sum_{r in e} dout[t_r][o] s_r a_r[i]
__global__ void f32_dW2(const float *dout, int64_t ldd, const float *h, int64_t ldh,
                        const int32_t *off, const int32_t *sorted, RW sw, int64_t n, int k, int E,
                        int H, int I, float *dW2, int64_t ge, int64_t gr) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(E) * H * I) return;
  const int e = int(idx / (int64_t(H) * I));
  const int o = int((idx / I) % H);
  const int i = int(idx % I);
  int64_t s = off[e], t = off[e + 1];
  s = s < 0 ? 0 : (s > n ? n : s);
  t = t < s ? s : (t > n ? n : t);
  float acc = 0.f;
  for (int64_t r = s; r < t; ++r) {
    const int64_t p = clampi(sorted[r], n);
    const float *hr = h + r * ldh;
    const float a = hr[i] * sigm(hr[i]) * hr[I + i];
    acc += dout[(p / k) * ldd + o] * sw.at(p / k, p % k) * a;
  }
  dW2[int64_t(e) * ge + int64_t(o) * gr + i] = acc;
}

// C[e][m][c] = sum_{r in e} A[arow(r)][m] * B[brow(r)][c]  (generic f32 wgrad)
__global__ void f32_wgrad(const float *A, int64_t lda, int a_div, const float *B, int64_t ldb,
                          int b_div, const int32_t *off, const int32_t *sorted, int64_t n, int E,
                          int M, int N, float *C, int64_t ce, int64_t cr) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(E) * M * N) return;
  const int e = int(idx / (int64_t(M) * N));
  const int m = int((idx / N) % M);
  const int c = int(idx % N);
  int64_t s = off[e], t = off[e + 1];
  s = s < 0 ? 0 : (s > n ? n : s);
  t = t < s ? s : (t > n ? n : t);
  float acc = 0.f;
  for (int64_t r = s; r < t; ++r) {
    const int64_t p = clampi(sorted[r], n);
    const int64_t ar = a_div ? p / a_div : r, br = b_div ? p / b_div : r;
    acc += A[ar * lda + m] * B[br * ldb + c];
  }
  C[int64_t(e) * ce + int64_t(m) * cr + c] = acc;
}

// dx[t][c] = sum_j sum_q dh[r_tj][q] W1[e][q][c]   (slot order)
__global__ void f32_dx(const float *dh, const float *W1, int64_t w1e, int64_t w1r,
                       const int32_t *rows, const int32_t *er, int64_t T, int k, int H, int twoI,
                       int64_t n, float *dx, int64_t ldx) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * H) return;
  const int64_t t = idx / H;
  const int c = int(idx % H);
  float acc = 0.f;
  for (int j = 0; j < k; ++j) {
    const int64_t r = clampi(rows[t * k + j], n);
    const float *d = dh + r * twoI;
    const float *w = W1 + int64_t(er[r]) * w1e + c;
    float v = 0.f;
    for (int q = 0; q < twoI; ++q) v += d[q] * w[int64_t(q) * w1r];
    acc += v;
  }
  dx[t * ldx + c] = acc;
}

// linear: out[p][o] = sum_i in[p][i] W[e_p][o][i]; e_p = clamp(sel[p])
template <class Idx>
__global__ void f32_lin_fwd(const float *x, int64_t ldx, const float *W, int64_t we, int64_t wr,
                            const Idx *sel, int64_t ss, int E, int64_t N, int in, int outf,
                            float *y, int64_t ldy) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * outf) return;
  const int64_t p = idx / outf;
  const int o = int(idx % outf);
  const int64_t e = clampi(int64_t(sel[p * ss]), E);
  const float *xr = x + p * ldx;
  const float *w = W + e * we + int64_t(o) * wr;
  float acc = 0.f;
  for (int i = 0; i < in; ++i) acc += xr[i] * w[i];
  y[p * ldy + o] = acc;
}

template <class Idx>
__global__ void f32_lin_dx(const float *g, int64_t ldg, const float *W, int64_t we, int64_t wr,
                           const Idx *sel, int64_t ss, int E, int64_t N, int in, int outf,
                           float *dx, int64_t ldx) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * in) return;
  const int64_t p = idx / in;
  const int i = int(idx % in);
  const int64_t e = clampi(int64_t(sel[p * ss]), E);
  const float *gr = g + p * ldg;
  const float *w = W + e * we + i;
  float acc = 0.f;
  for (int o = 0; o < outf; ++o) acc += gr[o] * w[int64_t(o) * wr];
  dx[p * ldx + i] = acc;
}

inline unsigned blocks(int64_t n) { return unsigned((n + 255) / 256); }

}  // namespace

size_t f32_experts_bwd_bytes(const ExpertsProblem &p) {
  return ws_align(size_t(p.tokens * p.top_k) * size_t(2 * p.intermediate) * 4) +
         ws_align(size_t(p.tokens * p.top_k) * 4);
}
// Row experts [n] int32, then (no_h: a forward called without h) h [n, 2I] f32.
size_t f32_experts_fwd_bytes(const ExpertsProblem &p, bool no_h) {
  const size_t er = ws_align(size_t(p.tokens * p.top_k) * 4);
  return no_h ? er + ws_align(size_t(p.tokens * p.top_k) * size_t(2 * p.intermediate) * 4) : er;
}

moe_status_t f32_experts_forward(cudaStream_t st, const ExpertsProblem &p, const moe_tensor_t &x,
                                 const moe_tensor_t &s, const moe_tensor_t &W1,
                                 const moe_tensor_t &W2, const int32_t *off, const int32_t *sorted,
                                 const int32_t *rows, const moe_tensor_t *h,
                                 const moe_tensor_t &out, void *scratch) {
  const int64_t T = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate, E = p.num_experts,
                n = T * k;
  if (n <= 0) return MOE_OK;
  int32_t *er = static_cast<int32_t *>(scratch);
  // h, or (no h given) the scratch after er: the same kernels and values either way.
  float *hp = h ? static_cast<float *>(h->data)
                : reinterpret_cast<float *>(static_cast<char *>(scratch) + ws_align(size_t(n) * 4));
  const int64_t ldh = h ? h->strides[0] : 2 * I;
  f32_row_experts<<<unsigned(E), 256, 0, st>>>(off, int(E), n, er);
  f32_h<<<blocks(n * 2 * I), 256, 0, st>>>(
      static_cast<const float *>(x.data), x.strides[0], static_cast<const float *>(W1.data),
      W1.strides[0], W1.strides[1], sorted, er, n, int(k), int(H), int(2 * I), hp, ldh);
  RW sw{s.data, s.dtype, s.strides[0], s.strides[1]};
  f32_out<<<blocks(T * H), 256, 0, st>>>(hp, ldh,
                                         static_cast<const float *>(W2.data), W2.strides[0],
                                         W2.strides[1], rows, er, sw, T, int(k), int(H), int(I), n,
                                         static_cast<float *>(out.data), out.strides[0]);
  return launch_status("moe_experts_forward (float32)");
}

moe_status_t f32_experts_backward(cudaStream_t st, const ExpertsProblem &p,
                                  const moe_tensor_t &dout, const moe_tensor_t &x,
                                  const moe_tensor_t &s, const moe_tensor_t &W1,
                                  const moe_tensor_t &W2, const int32_t *off,
                                  const int32_t *sorted, const int32_t *rows,
                                  const moe_tensor_t &h, const moe_tensor_t *dx,
                                  const moe_tensor_t *ds, const moe_tensor_t *dW1,
                                  const moe_tensor_t *dW2, void *scratch) {
  const int64_t T = p.tokens, k = p.top_k, H = p.hidden, I = p.intermediate, E = p.num_experts,
                n = T * k;
  float *dh = static_cast<float *>(scratch);
  int32_t *er = reinterpret_cast<int32_t *>(static_cast<char *>(scratch) +
                                            ws_align(size_t(n) * size_t(2 * I) * 4));
  const float *hp = static_cast<const float *>(h.data);
  const int64_t ldh = h.strides[0];
  RW sw{s.data, s.dtype, s.strides[0], s.strides[1]};
  if (n > 0) {
    f32_row_experts<<<unsigned(E), 256, 0, st>>>(off, int(E), n, er);
    f32_dA<<<blocks(n * I), 256, 0, st>>>(static_cast<const float *>(dout.data), dout.strides[0],
                                          static_cast<const float *>(W2.data), W2.strides[0],
                                          W2.strides[1], sorted, er, n, int(k), int(H), int(I), dh);
    if (ds)
      f32_ds<<<blocks(n), 256, 0, st>>>(hp, ldh, dh, sorted, n, int(k), int(I), ds->data,
                                        ds->dtype, ds->strides[0], ds->strides[1]);
    f32_dh<<<blocks(n * I), 256, 0, st>>>(hp, ldh, dh, sorted, sw, n, int(k), int(I));
  }
  if (dW2)
    f32_dW2<<<blocks(E * H * I), 256, 0, st>>>(
        static_cast<const float *>(dout.data), dout.strides[0], hp, ldh, off, sorted, sw, n,
        int(k), int(E), int(H), int(I), static_cast<float *>(dW2->data), dW2->strides[0],
        dW2->strides[1]);
  if (dW1)
    f32_wgrad<<<blocks(E * 2 * I * H), 256, 0, st>>>(
        dh, 2 * I, 0, static_cast<const float *>(x.data), x.strides[0], int(k), off, sorted, n,
        int(E), int(2 * I), int(H), static_cast<float *>(dW1->data), dW1->strides[0],
        dW1->strides[1]);
  if (dx && T > 0)
    f32_dx<<<blocks(T * H), 256, 0, st>>>(dh, static_cast<const float *>(W1.data), W1.strides[0],
                                          W1.strides[1], rows, er, T, int(k), int(H), int(2 * I),
                                          n, static_cast<float *>(dx->data), dx->strides[0]);
  return launch_status("moe_experts_backward (float32)");
}

moe_status_t f32_linear_forward(cudaStream_t st, const LinearProblem &p, const moe_tensor_t &x,
                                const moe_tensor_t &W, const moe_tensor_t &sel,
                                const moe_tensor_t &y) {
  const int64_t N = p.n;
  if (N <= 0 || p.out_features <= 0) return MOE_OK;
  const int64_t ss = sel.ndim >= 1 ? sel.strides[0] : 1;
  const unsigned nb = blocks(N * p.out_features);
  if (sel.dtype == MOE_DTYPE_I64)
    f32_lin_fwd<int64_t><<<nb, 256, 0, st>>>(
        static_cast<const float *>(x.data), x.strides[0], static_cast<const float *>(W.data),
        W.strides[0], W.strides[1], static_cast<const int64_t *>(sel.data), ss,
        int(p.num_experts), N, int(p.in_features), int(p.out_features),
        static_cast<float *>(y.data), y.strides[0]);
  else
    f32_lin_fwd<int32_t><<<nb, 256, 0, st>>>(
        static_cast<const float *>(x.data), x.strides[0], static_cast<const float *>(W.data),
        W.strides[0], W.strides[1], static_cast<const int32_t *>(sel.data), ss,
        int(p.num_experts), N, int(p.in_features), int(p.out_features),
        static_cast<float *>(y.data), y.strides[0]);
  return launch_status("moe_linear_forward (float32)");
}

moe_status_t f32_linear_backward(cudaStream_t st, const LinearProblem &p,
                                 const moe_tensor_t &g, const moe_tensor_t &x,
                                 const moe_tensor_t &W, const moe_tensor_t &sel,
                                 const moe_tensor_t *dx, const moe_tensor_t *dW,
                                 const int32_t *off, const int32_t *sorted) {
  const int64_t N = p.n;
  const int64_t ss = sel.ndim >= 1 ? sel.strides[0] : 1;
  if (dx && N > 0 && p.in_features > 0) {
    const unsigned nb = blocks(N * p.in_features);
    if (sel.dtype == MOE_DTYPE_I64)
      f32_lin_dx<int64_t><<<nb, 256, 0, st>>>(
          static_cast<const float *>(g.data), g.strides[0], static_cast<const float *>(W.data),
          W.strides[0], W.strides[1], static_cast<const int64_t *>(sel.data), ss,
          int(p.num_experts), N, int(p.in_features), int(p.out_features),
          static_cast<float *>(dx->data), dx->strides[0]);
    else
      f32_lin_dx<int32_t><<<nb, 256, 0, st>>>(
          static_cast<const float *>(g.data), g.strides[0], static_cast<const float *>(W.data),
          W.strides[0], W.strides[1], static_cast<const int32_t *>(sel.data), ss,
          int(p.num_experts), N, int(p.in_features), int(p.out_features),
          static_cast<float *>(dx->data), dx->strides[0]);
  }
  const int64_t tot = p.num_experts * p.out_features * p.in_features;
  if (dW && tot > 0)
    f32_wgrad<<<blocks(tot), 256, 0, st>>>(
        static_cast<const float *>(g.data), g.strides[0], 1, static_cast<const float *>(x.data),
        x.strides[0], 1, off, sorted, N, int(p.num_experts), int(p.out_features),
        int(p.in_features), static_cast<float *>(dW->data), dW->strides[0], dW->strides[1]);
  return launch_status("moe_linear_backward (float32)");
}

}  // namespace cuda
}  // namespace moe
