// Hope's stacked chunk step (models/smt_step.py `_FusedStep`) fused per (batch, head) for CPU.
//
// One call runs, for every (b, h) in parallel, the whole chunk step of the five stacked
// memories [k, v, eta, alpha, mem] with all intermediates in cache-sized buffers:
//   P_j = z_j + W1_j silu(W2_j z_j)                 projection memories j < 4 (Eq. 84-85)
//   k = L2norm(P_0), v = L2norm(P_1) (or P_1), eta = sigmoid(mean P_2 + b_eta), alpha = ...
//   eta_m <- min(eta, guard / |W1_m u_m|^2)           the curvature guard (u: already stepped)
//   one DGD chunk per memory in the WY form (kernels/dgd/chunk_grad.py `_forward`), reading M_mem
// The unit-lower system (I + A) D = R is solved by forward substitution (the PyTorch path
// forms (I + A)^-1 in matmuls); the backward pass recomputes the forward for its (b, h) and
// runs chunk_grad `_backward` and `_FusedStep.backward` in the same order, so only the inputs
// are kept between the passes. Scalar type T: float (training) or double (the tests).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {

#define NLB_INLINE inline __attribute__((always_inline))

constexpr int NPROJ = 4, NMEM = 5;
constexpr int MAXDIM = 128;  // largest L, d or hidden width (hope_step_cpu checks)
// rows of C per register block in `mm`: 8 rows of 32 floats are 16 AVX-512 accumulators (4 and 16
// were slower at Hope's sizes: docs/decisions.md)
constexpr int MM_ROWS = 8;
constexpr double NORM_EPS = 1e-12;  // F.normalize's

// R rows of C[m x n] (+)= A B[k x n] in registers, each row of B loaded once for the R; A[r, p] is
// A[r * ar + p * ap]: A [m x k] (ar = k, ap = 1) or A^T of a [k x m] matrix (ar = 1, ap = m)
template <int R, typename T>
inline void mm_rows(T* __restrict C, const T* __restrict A, const T* __restrict B, int k, int n, bool acc, int ar,
                    int ap) {
  T c[R][MAXDIM];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < n; ++j) c[r][j] = acc ? C[r * n + j] : T(0);
  for (int p = 0; p < k; ++p) {
    const T* b = B + p * n;
    T a[R];
    for (int r = 0; r < R; ++r) a[r] = A[r * ar + p * ap];
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int j = 0; j < n; ++j) c[r][j] += a[r] * b[j];
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < n; ++j) C[r * n + j] = c[r][j];
}

// C[m x n] (+)= A[m x k] B[k x n], MM_ROWS rows at a time
template <typename T>
inline void mm(T* __restrict C, const T* __restrict A, const T* __restrict B, int m, int k, int n, bool acc) {
  size_t i = 0;
  for (; i + MM_ROWS <= size_t(m); i += MM_ROWS) mm_rows<MM_ROWS>(C + i * n, A + i * k, B, k, n, acc, k, 1);
  for (; i + 4 <= size_t(m); i += 4) mm_rows<4>(C + i * n, A + i * k, B, k, n, acc, k, 1);
  for (; i < size_t(m); ++i) mm_rows<1>(C + i * n, A + i * k, B, k, n, acc, k, 1);
}

// out[c x r] = in[r x c]^T
template <typename T>
inline void transpose_scalar(T* out, const T* in, int r, int c) {
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < c; ++j) out[j * r + i] = in[i * c + j];
}

template <typename T>
inline void transpose(T* out, const T* in, int r, int c) {
  transpose_scalar(out, in, r, c);
}

#ifdef __AVX__
// float: 8 x 8 tiles in AVX registers (the scalar loop above was ~9% of the forward pass)
NLB_INLINE void transpose8(float* out, const float* in, int r, int c) {
  __m256 x[8], t[8];
  for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(in + i * c);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    x[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    x[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    x[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    x[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * r, _mm256_permute2f128_ps(x[i], x[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * r, _mm256_permute2f128_ps(x[i], x[i + 4], 0x31));
  }
}

template <>
inline void transpose<float>(float* out, const float* in, int r, int c) {
  if (r % 8 || c % 8) return transpose_scalar(out, in, r, c);
  for (int i = 0; i < r; i += 8)
    for (int j = 0; j < c; j += 8) transpose8(out + j * r + i, in + i * c + j, r, c);
}
#endif

// C[m x n] (+)= A[m x k] B[n x k]^T, through B^T so that the inner loop runs along C's rows
template <typename T>
inline void mmt(T* C, const T* A, const T* B, int m, int k, int n, bool acc) {
  T bt[MAXDIM * MAXDIM];
  transpose(bt, B, n, k);
  mm(C, A, bt, m, k, n, acc);
}

// C[m x n] (+)= A[k x m]^T B[k x n]: the same register blocks reading A down its columns (no transpose)
template <typename T>
inline void tmm(T* __restrict C, const T* __restrict A, const T* __restrict B, int k, int m, int n, bool acc) {
  size_t i = 0;
  for (; i + MM_ROWS <= size_t(m); i += MM_ROWS) mm_rows<MM_ROWS>(C + i * n, A + i, B, k, n, acc, 1, m);
  for (; i + 4 <= size_t(m); i += 4) mm_rows<4>(C + i * n, A + i, B, k, n, acc, 1, m);
  for (; i < size_t(m); ++i) mm_rows<1>(C + i * n, A + i, B, k, n, acc, 1, m);
}

// exp for float in branch-free arithmetic that the compiler vectorizes (std::exp stays a scalar
// libm call without -ffast-math): Cody-Waite reduction x = n ln2 + r and a degree-6 polynomial
// for e^r (the Cephes expf coefficients, ~1 ulp), 2^n from the exponent bits. NaN stays NaN.
NLB_INLINE float exp_fast(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (std::floor blocks vectorizing)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

NLB_INLINE float exp_t(float x) { return exp_fast(x); }
NLB_INLINE double exp_t(double x) { return std::exp(x); }  // float64: libm, for the tests' 1e-10

template <typename T> NLB_INLINE T sigmoid(T x) { return T(1) / (T(1) + exp_t(-x)); }

// silu(a) and silu'(a) = s + silu(a)(1 - s)   (kernels/activations.py)
template <typename T>
NLB_INLINE void silu_and_grad(const T* a, T* out, T* d1, int n) {
  for (int i = 0; i < n; ++i) {
    const T s = sigmoid(a[i]), sa = a[i] * s;
    out[i] = sa;
    d1[i] = s + sa * (T(1) - s);
  }
}

// sum_i a[i] b[i] over a long vector in 16 independent partial sums: one running sum would be a
// chain of n dependent adds (without -ffast-math the compiler may not reorder it)
template <typename T>
NLB_INLINE T dot(const T* a, const T* b, int n) {
  constexpr int W = 16;
  T acc[W] = {};
  int i = 0;
  for (; i + W <= n; i += W)
    for (int l = 0; l < W; ++l) acc[l] += a[i + l] * b[i + l];
  for (int w = W / 2; w > 0; w /= 2)  // pairwise: log2(16) vector adds instead of a chain of 16
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  T s = acc[0];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// row-wise F.normalize: out = x / max(|x|, eps), nrm = |x|
template <typename T>
NLB_INLINE void normalize_rows(const T* x, T* out, T* nrm, int L, int d) {
  for (int t = 0; t < L; ++t) {
    const T n = std::sqrt(dot(x + t * d, x + t * d, d)), nc = std::max(n, T(NORM_EPS));
    nrm[t] = n;
    for (int c = 0; c < d; ++c) out[t * d + c] = x[t * d + c] / nc;
  }
}

// gradient of F.normalize: g/nc - x (g.x)/nc^2 * [n >= eps]/max(n, eps)  (smt_step._normalize_grad)
template <typename T>
NLB_INLINE void normalize_grad(const T* g, const T* x, const T* nrm, T* out, int L, int d) {
  for (int t = 0; t < L; ++t) {
    const T n = nrm[t], nc = std::max(n, T(NORM_EPS));
    const T gx = dot(g + t * d, x + t * d, d);
    const T f = (n >= T(NORM_EPS) ? gx / (nc * nc) / std::max(n, T(NORM_EPS)) : T(0));
    for (int c = 0; c < d; ++c) out[t * d + c] = g[t * d + c] / nc - x[t * d + c] * f;
  }
}

struct Dims {
  int B, H, L, d, hid;
  bool normalize_v, normalized, guard_on;
  double guard;
};

// One matrix of a memory's DGD chunk: W [out x in], x [L x in], g [L x out], xw = x W^T [L x out]
template <typename T>
struct Mat {
  std::vector<T> n, es, kx, gk, inner, A, D, dd;
  void resize(int L, int out) {
    n.resize(L); es.resize(L); kx.resize(L * L); gk.resize(L * L);
    inner.resize(L * out); A.resize(L * L); D.resize(L * out); dd.resize(L * out);
  }
};

template <typename T>
struct Memory {  // one memory's chunk (chunk_grad._forward, MLP)
  std::vector<T> av, sv, vh, a, s, d1a, p1, e, h, g2, sa, sav;  // sa, sav: sigmoid(a), sigmoid(av)
  Mat<T> m2, m1;
  void resize(int L, int d, int hid) {
    for (auto* v : {&av, &sv, &a, &s, &d1a, &h, &g2, &sa, &sav}) v->resize(L * hid);
    for (auto* v : {&vh, &p1, &e}) v->resize(L * d);
    m2.resize(L, hid); m1.resize(L, d);
  }
};

template <typename T>
struct Work {  // every intermediate of one (b, h)
  std::vector<T> pa, ps, pd1, P;                  // projections [4][L x hid], [4][L x d]
  std::vector<T> k, v, nk, nv, eta0, alpha;
  std::vector<T> w1u, lam, cap, eta;              // guard [5][d], [5], [5]; eta [5][L]
  std::vector<T> lg, lgp, gam, gp, tail;          // decays
  T gl = 0;
  Memory<T> mem[NMEM];
  std::vector<T> qw, qk_raw, qk, hr, sr, d1hr, sw, ss_raw, ss;  // the read of M_mem
  std::vector<T> w2t, w1t;  // W2^T [5][d x hid], W1^T [5][hid x d]: every x W^T as x (W^T)
  void resize(int L, int d, int hid) {
    w2t.resize(NMEM * d * hid); w1t.resize(NMEM * hid * d);
    pa.resize(NPROJ * L * hid); ps.resize(NPROJ * L * hid); pd1.resize(NPROJ * L * hid); P.resize(NPROJ * L * d);
    k.resize(L * d); v.resize(L * d); nk.resize(L); nv.resize(L); eta0.resize(L); alpha.resize(L);
    w1u.resize(NMEM * d); lam.resize(NMEM); cap.resize(NMEM); eta.resize(NMEM * L);
    lg.resize(L); lgp.resize(L); gam.resize(L * L); gp.resize(L); tail.resize(L);
    for (auto& m : mem) m.resize(L, d, hid);
    for (auto* x : {&qw, &hr, &sr, &d1hr}) x->resize(L * hid);
    for (auto* x : {&qk_raw, &qk, &ss_raw, &ss}) x->resize(L * L);
    sw.resize(L * d);
  }
};

template <typename T>
struct Inputs {  // pointers of one (b, h)
  const T *z[NPROJ], *q, *w2[NMEM], *w1[NMEM], *u[NMEM];
  T b_eta, b_alpha;
};

template <typename T>
Inputs<T> inputs_at(const Dims& D, int p, const T* z, const T* q, const T* beta, const T* balpha, const T* w2,
                    const T* w1, const T* u) {
  const int BH = D.B * D.H, L = D.L, d = D.d, hid = D.hid;
  Inputs<T> in;
  for (int j = 0; j < NPROJ; ++j) in.z[j] = z + (size_t(j) * BH + p) * L * d;
  in.q = q + size_t(p) * L * d;
  for (int m = 0; m < NMEM; ++m) {
    in.w2[m] = w2 + (size_t(m) * BH + p) * hid * d;
    in.w1[m] = w1 + (size_t(m) * BH + p) * d * hid;
    in.u[m] = D.guard_on ? u + (size_t(m) * BH + p) * hid : nullptr;
  }
  in.b_eta = beta[p % D.H];
  in.b_alpha = balpha[p % D.H];
  return in;
}

// per matrix of a memory: A = es Gamma.(x x^T), R = -es (g + gp xw), D = (I + A)^-1 R, dd = tail D
template <typename T>
inline void solve_matrix(Mat<T>& M, const Work<T>& W, const T* x, const T* g, const T* xw, const T* eta, int L, int in,
                  int out, bool normalized) {
  for (int t = 0; t < L; ++t) {
    const T s = dot(x + t * in, x + t * in, in);
    M.n[t] = s;
    M.es[t] = normalized ? eta[t] / std::max(s, T(1)) : eta[t];
  }
  mmt(M.kx.data(), x, x, L, in, L, false);
  for (int i = 0; i < L * L; ++i) M.gk[i] = W.gam[i] * M.kx[i];
  for (int t = 0; t < L; ++t) {
    for (int j = 0; j < L; ++j) M.A[t * L + j] = M.es[t] * M.gk[t * L + j];
    for (int o = 0; o < out; ++o) {
      M.inner[t * out + o] = g[t * out + o] + W.gp[t] * xw[t * out + o];
      M.D[t * out + o] = -M.es[t] * M.inner[t * out + o];
    }
  }
  // forward substitution: D_t = R_t - sum_{j<t} A_tj D_j  (A is zero on and above the diagonal)
  for (int t = 1; t < L; ++t) {
    T* dt = &M.D[t * out];
    for (int j = 0; j < t; ++j) {
      const T a = M.A[t * L + j];
      const T* dj = &M.D[j * out];
#pragma omp simd
      for (int o = 0; o < out; ++o) dt[o] -= a * dj[o];
    }
  }
  for (int t = 0; t < L; ++t)
    for (int o = 0; o < out; ++o) M.dd[t * out + o] = M.D[t * out + o] * W.tail[t];
}

// the whole forward pass of one (b, h) into W; writes y and the chunk-end weights when given
template <typename T, int LL, int DD, int HH>  // nonzero: L, d, hidden known at compile time
void forward_one(const Dims& D, const Inputs<T>& in, Work<T>& W, T* y, T* w2n[NMEM], T* w1n[NMEM]) {
  const int L = LL ? LL : D.L, d = DD ? DD : D.d, hid = HH ? HH : D.hid;
  for (int m = 0; m < NMEM; ++m) {
    transpose(&W.w2t[m * d * hid], in.w2[m], hid, d);
    transpose(&W.w1t[m * hid * d], in.w1[m], d, hid);
  }
  // projection memories at the chunk start (Eq. 84-85)
  for (int j = 0; j < NPROJ; ++j) {
    T* a = &W.pa[j * L * hid];
    T* s = &W.ps[j * L * hid];
    T* P = &W.P[j * L * d];
    mm(a, in.z[j], &W.w2t[j * d * hid], L, d, hid, false);
    silu_and_grad(a, s, &W.pd1[j * L * hid], L * hid);
    std::copy(in.z[j], in.z[j] + L * d, P);
    mm(P, s, &W.w1t[j * hid * d], L, hid, d, true);
  }
  normalize_rows(&W.P[0], W.k.data(), W.nk.data(), L, d);
  if (D.normalize_v) normalize_rows(&W.P[L * d], W.v.data(), W.nv.data(), L, d);
  else std::copy(&W.P[L * d], &W.P[2 * L * d], W.v.begin());
  for (int t = 0; t < L; ++t) {
    T se = 0, sa = 0;
    for (int c = 0; c < d; ++c) { se += W.P[2 * L * d + t * d + c]; sa += W.P[3 * L * d + t * d + c]; }
    W.eta0[t] = sigmoid(se / T(d) + in.b_eta);
    W.alpha[t] = sigmoid(sa / T(d) + in.b_alpha);
  }
  // curvature guard: eta_m = min(eta0, guard / lam_m), lam_m = |W1_m u_m|^2
  for (int m = 0; m < NMEM; ++m) {
    T lam = 0;
    if (D.guard_on) {
      for (int o = 0; o < d; ++o) {
        const T s = dot(in.w1[m] + o * hid, in.u[m], hid);
        W.w1u[m * d + o] = s;
        lam += s * s;
      }
      W.lam[m] = lam;
      W.cap[m] = T(D.guard) / lam;
    }
    for (int t = 0; t < L; ++t) W.eta[m * L + t] = D.guard_on ? std::min(W.eta0[t], W.cap[m]) : W.eta0[t];
  }
  // decays from cumulative log alpha
  T run = 0;
  for (int t = 0; t < L; ++t) {
    const T la = std::log(W.alpha[t]);
    run += la;
    W.lg[t] = run;
    W.lgp[t] = run - la;
  }
  const T last = W.lg[L - 1];
  for (int i = 0; i < L; ++i) {
    W.gp[i] = std::exp(W.lgp[i]);
    W.tail[i] = std::exp(last - W.lg[i]);
    for (int j = 0; j < L; ++j) W.gam[i * L + j] = j < i ? std::exp(W.lgp[i] - W.lg[j]) : T(0);
  }
  W.gl = std::exp(last);
  // one DGD chunk per memory
  for (int m = 0; m < NMEM; ++m) {
    Memory<T>& M = W.mem[m];
    const T *w2 = in.w2[m], *w1 = in.w1[m], *w2t = &W.w2t[m * d * hid], *w1t = &W.w1t[m * hid * d];
    mm(M.av.data(), W.v.data(), w2t, L, d, hid, false);
    for (int i = 0; i < L * hid; ++i) {
      M.sav[i] = sigmoid(M.av[i]);
      M.sv[i] = M.av[i] * M.sav[i];
    }
    std::copy(W.v.begin(), W.v.end(), M.vh.begin());
    mm(M.vh.data(), M.sv.data(), w1t, L, hid, d, true);
    mm(M.a.data(), W.k.data(), w2t, L, d, hid, false);
    for (int i = 0; i < L * hid; ++i) {  // silu_and_grad, keeping sigmoid(a) for silu'' in the backward pass
      const T sg = sigmoid(M.a[i]), sa = M.a[i] * sg;
      M.sa[i] = sg;
      M.s[i] = sa;
      M.d1a[i] = sg + sa * (T(1) - sg);
    }
    mm(M.p1.data(), M.s.data(), w1t, L, hid, d, false);
    for (int i = 0; i < L * d; ++i) M.e[i] = W.k[i] + M.p1[i] - M.vh[i];
    mm(M.h.data(), M.e.data(), w1, L, d, hid, false);
    for (int i = 0; i < L * hid; ++i) M.g2[i] = M.h[i] * M.d1a[i];
    const T* eta = &W.eta[m * L];
    solve_matrix(M.m2, W, W.k.data(), M.g2.data(), M.a.data(), eta, L, d, hid, D.normalized);
    solve_matrix(M.m1, W, M.s.data(), M.e.data(), M.p1.data(), eta, L, hid, d, D.normalized);
    if (w2n) {  // W_end = gl W + dd^T x
      for (int i = 0; i < hid * d; ++i) w2n[m][i] = W.gl * w2[i];
      tmm(w2n[m], M.m2.dd.data(), W.k.data(), L, hid, d, true);
      for (int i = 0; i < d * hid; ++i) w1n[m][i] = W.gl * w1[i];
      tmm(w1n[m], M.m1.dd.data(), M.s.data(), L, d, hid, true);
    }
  }
  // the read of M_mem at q: y = q + gp (sr W1^T) + (Gamma.(sr s^T)) D1, sr = silu(gp (q W2^T) + (Gamma.(q k^T)) D2)
  Memory<T>& R = W.mem[NMEM - 1];
  const T *w2t = &W.w2t[(NMEM - 1) * d * hid], *w1t = &W.w1t[(NMEM - 1) * hid * d];
  mm(W.qw.data(), in.q, w2t, L, d, hid, false);
  mmt(W.qk_raw.data(), in.q, W.k.data(), L, d, L, false);
  for (int i = 0; i < L * L; ++i) W.qk[i] = W.gam[i] * W.qk_raw[i];
  for (int t = 0; t < L; ++t)
    for (int c = 0; c < hid; ++c) W.hr[t * hid + c] = W.gp[t] * W.qw[t * hid + c];
  mm(W.hr.data(), W.qk.data(), R.m2.D.data(), L, L, hid, true);
  silu_and_grad(W.hr.data(), W.sr.data(), W.d1hr.data(), L * hid);
  mm(W.sw.data(), W.sr.data(), w1t, L, hid, d, false);
  mmt(W.ss_raw.data(), W.sr.data(), R.s.data(), L, hid, L, false);
  for (int i = 0; i < L * L; ++i) W.ss[i] = W.gam[i] * W.ss_raw[i];
  if (y) {
    for (int t = 0; t < L; ++t)
      for (int c = 0; c < d; ++c) y[t * d + c] = in.q[t * d + c] + W.gp[t] * W.sw[t * d + c];
    mm(y, W.ss.data(), R.m1.D.data(), L, L, d, true);
  }
}

template <typename T>
struct Grads {  // backward scratch of one (b, h)
  std::vector<T> gk, gv, gq, galpha, geta0, ggam, ggp, gtail;
  std::vector<T> gx0, gx1, gdd, gd0, gd1, gr, gA, gg0, gg1, gxw0, gxw1, t1, t2, t3, gkx;
  std::vector<T> gP, ga, geta;
  void resize(int L, int d, int hid) {
    for (auto* x : {&gk, &gv, &gq}) x->resize(L * d);
    for (auto* x : {&galpha, &geta0, &ggp, &gtail}) x->resize(L);
    ggam.resize(L * L);
    const int w = std::max(d, hid);
    for (auto* x : {&gx0, &gx1, &gdd, &gd0, &gd1, &gr, &gg0, &gg1, &gxw0, &gxw1, &t1, &t2, &t3}) x->resize(L * w);
    gA.resize(L * L); gkx.resize(L * L);
    gP.resize(NPROJ * L * d); ga.resize(L * hid); geta.resize(NMEM * L);
  }
};

// backward of one matrix's solve (chunk_grad._backward, "per matrix"); gd [L x out] holds dL/dD;
// adds into gx [L x in], ggp, ggam; writes dL/dg into gg and dL/dxw into gxw; returns nothing,
// accumulates dL/deta_m into geta
template <typename T>
inline void solve_matrix_grad(const Mat<T>& M, const Work<T>& W, Grads<T>& G, const T* x, const T* xw, const T* eta,
                       const T* gd, T* gx, T* gg, T* gxw, T* geta, int L, int in, int out, bool normalized) {
  T* gr = G.gr.data();
  // g_r = (I + A)^-T g_d by back substitution
  std::copy(gd, gd + L * out, gr);
  for (int t = L - 2; t >= 0; --t) {
    T* r = gr + t * out;
    for (int j = t + 1; j < L; ++j) {
      const T a = M.A[j * L + t];
      const T* rj = gr + j * out;
#pragma omp simd
      for (int o = 0; o < out; ++o) r[o] -= a * rj[o];
    }
  }
  // g_A = -tril(g_r D^T, -1)
  mmt(G.gA.data(), gr, M.D.data(), L, out, L, false);
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < L; ++j) G.gA[i * L + j] = j < i ? -G.gA[i * L + j] : T(0);
  for (int t = 0; t < L; ++t) {
    const T ges = dot(&G.gA[t * L], &M.gk[t * L], L) - dot(gr + t * out, &M.inner[t * out], out);
    for (int o = 0; o < out; ++o) {
      const T v = -M.es[t] * gr[t * out + o];
      gg[t * out + o] = v;
      gxw[t * out + o] = v * W.gp[t];
    }
    G.ggp[t] += dot(gg + t * out, xw + t * out, out);
    for (int j = 0; j < L; ++j) {
      const T gae = G.gA[t * L + j] * M.es[t];
      G.ggam[t * L + j] += gae * M.kx[t * L + j];
      G.gkx[t * L + j] = gae * W.gam[t * L + j];
    }
    if (normalized) {
      const T clamp = std::max(M.n[t], T(1));
      geta[t] += ges / clamp;
      const T gn = M.n[t] >= T(1) ? -(ges * eta[t] / (clamp * clamp)) : T(0);
      for (int c = 0; c < in; ++c) gx[t * in + c] += T(2) * gn * x[t * in + c];
    } else {
      geta[t] += ges;
    }
  }
  // g_x += (g_kx + g_kx^T) x
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < L; ++j) G.gA[i * L + j] = G.gkx[i * L + j] + G.gkx[j * L + i];
  mm(gx, G.gA.data(), x, L, L, in, true);
}

// Hope's sizes: everything inlined into one function, so every loop bound is a constant
template <typename T, int LL, int DD, int HH>
__attribute__((flatten)) void forward_flat(const Dims& D, const Inputs<T>& in, Work<T>& W, T* y, T* w2n[NMEM],
                                           T* w1n[NMEM]) {
  forward_one<T, LL, DD, HH>(D, in, W, y, w2n, w1n);
}

template <typename T, int LL, int DD, int HH>
void backward_one(const Dims& D, const Inputs<T>& in, Work<T>& W, Grads<T>& G, const T* gy, const T* gw2n[NMEM],
                  const T* gw1n[NMEM], T* gz[NPROJ], T* gq, T* gbeta, T* gbalpha, T* gw2[NMEM], T* gw1[NMEM]) {
  const int L = LL ? LL : D.L, d = DD ? DD : D.d, hid = HH ? HH : D.hid;
  forward_one<T, LL, DD, HH>(D, in, W, nullptr, nullptr, nullptr);
  std::fill(G.gk.begin(), G.gk.end(), T(0));
  std::fill(G.gv.begin(), G.gv.end(), T(0));
  std::fill(G.ggam.begin(), G.ggam.end(), T(0));
  std::fill(G.ggp.begin(), G.ggp.end(), T(0));
  std::fill(G.gtail.begin(), G.gtail.end(), T(0));
  std::fill(G.geta.begin(), G.geta.end(), T(0));
  T ggl = 0;
  for (int m = NMEM - 1; m >= 0; --m) {
    Memory<T>& M = W.mem[m];
    const T *w2 = in.w2[m], *w1 = in.w1[m];
    T *g2w = gw2[m], *g1w = gw1[m];
    // chunk-end state: W_end = gl W + dd^T x
    for (int i = 0; i < hid * d; ++i) g2w[i] = W.gl * gw2n[m][i];
    for (int i = 0; i < d * hid; ++i) g1w[i] = W.gl * gw1n[m][i];
    ggl += dot(gw2n[m], w2, hid * d) + dot(gw1n[m], w1, d * hid);
    T *gx0 = G.gx0.data(), *gx1 = G.gx1.data(), *gd0 = G.gd0.data(), *gd1 = G.gd1.data();
    mm(gx0, M.m2.dd.data(), gw2n[m], L, hid, d, false);      // [L x d]
    mm(gx1, M.m1.dd.data(), gw1n[m], L, d, hid, false);      // [L x hid]
    mmt(G.gdd.data(), W.k.data(), gw2n[m], L, d, hid, false);  // [L x hid]
    for (int t = 0; t < L; ++t) {
      for (int o = 0; o < hid; ++o) gd0[t * hid + o] = G.gdd[t * hid + o] * W.tail[t];
      G.gtail[t] += dot(&G.gdd[t * hid], &M.m2.D[t * hid], hid);
    }
    mmt(G.gdd.data(), M.s.data(), gw1n[m], L, hid, d, false);  // [L x d]
    for (int t = 0; t < L; ++t) {
      for (int o = 0; o < d; ++o) gd1[t * d + o] = G.gdd[t * d + o] * W.tail[t];
      G.gtail[t] += dot(&G.gdd[t * d], &M.m1.D[t * d], d);
    }
    if (m == NMEM - 1) {  // the read
      T *gsr = G.t1.data(), *gss = G.t2.data(), *ghr = G.t3.data();
      std::copy(gy, gy + L * d, G.gq.begin());
      for (int t = 0; t < L; ++t) {
        T s = 0;
        for (int c = 0; c < d; ++c) s += gy[t * d + c] * W.sw[t * d + c];
        G.ggp[t] += s;
      }
      // gsw = gp gy (into gss as scratch [L x d])
      for (int t = 0; t < L; ++t)
        for (int c = 0; c < d; ++c) gss[t * d + c] = W.gp[t] * gy[t * d + c];
      tmm(g1w, gss, W.sr.data(), L, d, hid, true);
      mm(gsr, gss, w1, L, d, hid, false);
      tmm(gd1, W.ss.data(), gy, L, L, d, true);
      mmt(G.gA.data(), gy, M.m1.D.data(), L, d, L, false);  // g_ss [L x L]
      for (int i = 0; i < L * L; ++i) {
        G.ggam[i] += G.gA[i] * W.ss_raw[i];
        G.gA[i] *= W.gam[i];  // g_m
      }
      mm(gsr, G.gA.data(), M.s.data(), L, L, hid, true);
      tmm(gx1, G.gA.data(), W.sr.data(), L, L, hid, true);
      for (int i = 0; i < L * hid; ++i) ghr[i] = gsr[i] * W.d1hr[i];
      for (int t = 0; t < L; ++t) {
        T s = 0;
        for (int c = 0; c < hid; ++c) s += ghr[t * hid + c] * W.qw[t * hid + c];
        G.ggp[t] += s;
        for (int c = 0; c < hid; ++c) gsr[t * hid + c] = W.gp[t] * ghr[t * hid + c];  // t = gp g_hr
      }
      tmm(g2w, gsr, in.q, L, hid, d, true);
      mm(G.gq.data(), gsr, w2, L, hid, d, true);
      tmm(gd0, W.qk.data(), ghr, L, L, hid, true);
      mmt(G.gA.data(), ghr, M.m2.D.data(), L, hid, L, false);  // g_qk
      for (int i = 0; i < L * L; ++i) {
        G.ggam[i] += G.gA[i] * W.qk_raw[i];
        G.gA[i] *= W.gam[i];  // g_m2
      }
      mm(G.gq.data(), G.gA.data(), W.k.data(), L, L, d, true);
      tmm(G.gk.data(), G.gA.data(), in.q, L, L, d, true);
    }
    // per matrix
    T* geta = &G.geta[m * L];
    const T* eta = &W.eta[m * L];
    solve_matrix_grad(M.m2, W, G, W.k.data(), M.a.data(), eta, gd0, gx0, G.gg0.data(), G.gxw0.data(), geta, L, d,
                      hid, D.normalized);
    solve_matrix_grad(M.m1, W, G, M.s.data(), M.p1.data(), eta, gd1, gx1, G.gg1.data(), G.gxw1.data(), geta, L,
                      hid, d, D.normalized);
    // the gradients at M_b and the target vh
    T *__restrict gh = G.t1.data(), *__restrict ga = G.t2.data(), *ge = G.t3.data(), *gp1 = G.gdd.data();
    const T *__restrict gg0 = G.gg0.data(), *__restrict gxw0 = G.gxw0.data(), *__restrict d1a = M.d1a.data();
    const T *__restrict hh = M.h.data(), *__restrict aa = M.a.data(), *__restrict sga = M.sa.data();
#pragma omp simd  // eight pointers: more alias checks than the vectorizer tries on its own
    for (int i = 0; i < L * hid; ++i) {
      gh[i] = gg0[i] * d1a[i];
      const T sg = sga[i];  // silu''(a) = s(1 - s)(2 + a(1 - 2s))
      ga[i] = gxw0[i] + gg0[i] * hh[i] * (sg * (T(1) - sg) * (T(2) + aa[i] * (T(1) - T(2) * sg)));
    }
    std::copy(G.gg1.begin(), G.gg1.begin() + L * d, ge);
    mm(ge, gh, &W.w1t[m * hid * d], L, hid, d, true);
    tmm(g1w, M.e.data(), gh, L, d, hid, true);
    for (int i = 0; i < L * d; ++i) gp1[i] = G.gxw1[i] + ge[i];
    tmm(g1w, gp1, M.s.data(), L, d, hid, true);
    mm(gx1, gp1, w1, L, d, hid, true);  // g_s
    for (int i = 0; i < L * hid; ++i) ga[i] += gx1[i] * M.d1a[i];
    tmm(g2w, ga, W.k.data(), L, hid, d, true);
    for (int i = 0; i < L * d; ++i) G.gk[i] += ge[i] + gx0[i];
    mm(G.gk.data(), ga, w2, L, hid, d, true);
    // g_vh = -g_e; v enters directly and through the target M_b(v)
    for (int i = 0; i < L * d; ++i) G.gv[i] -= ge[i];
    for (int i = 0; i < L * d; ++i) ge[i] = -ge[i];  // g_vh
    tmm(g1w, ge, M.sv.data(), L, d, hid, true);
    mm(gh, ge, w1, L, d, hid, false);  // g_vh W1 [L x hid]
    for (int i = 0; i < L * hid; ++i) {
      const T s = M.sav[i];
      gh[i] *= s * (T(1) + M.av[i] * (T(1) - s));
    }
    tmm(g2w, gh, W.v.data(), L, hid, d, true);
    mm(G.gv.data(), gh, w2, L, hid, d, true);
  }
  // decays: gp = exp(lgp), Gamma = exp(lgp_i - lg_j), tail = exp(lg_L - lg_i), gl = exp(lg_L)
  {
    T *glgp = G.t1.data(), *glg = G.t2.data();
    T glast = ggl * W.gl;
    for (int i = 0; i < L; ++i) {
      T row = 0;
      for (int j = 0; j < L; ++j) row += G.ggam[i * L + j] * W.gam[i * L + j];
      glgp[i] = G.ggp[i] * W.gp[i] + row;
    }
    for (int j = 0; j < L; ++j) {
      T col = 0;
      for (int i = 0; i < L; ++i) col += G.ggam[i * L + j] * W.gam[i * L + j];
      const T gt = G.gtail[j] * W.tail[j];
      glg[j] = glgp[j] - col - gt;
      glast += gt;
    }
    glg[L - 1] += glast;
    T run = 0;
    for (int t = L - 1; t >= 0; --t) {
      run += glg[t];
      G.galpha[t] = (run - glgp[t]) / W.alpha[t];
    }
  }
  // curvature guard: eta_m = min(eta0, cap_m), ties split as torch.minimum's gradient
  std::fill(G.geta0.begin(), G.geta0.end(), T(0));
  for (int m = 0; m < NMEM; ++m) {
    T gcap = 0;
    for (int t = 0; t < L; ++t) {
      const T g = G.geta[m * L + t];
      if (!D.guard_on) { G.geta0[t] += g; continue; }
      const T e0 = W.eta0[t], c = W.cap[m];
      const T gv = e0 == c ? g / T(2) : g;
      if (!(e0 > c)) G.geta0[t] += gv;
      if (!(e0 < c)) gcap += gv;
    }
    if (D.guard_on) {
      const T glam = -gcap * T(D.guard) / (W.lam[m] * W.lam[m]);
      for (int o = 0; o < d; ++o)
        for (int c = 0; c < hid; ++c) gw1[m][o * hid + c] += T(2) * glam * W.w1u[m * d + o] * in.u[m][c];
    }
  }
  // gates: eta0 = sigmoid(mean P_2 + b_eta), alpha = sigmoid(mean P_3 + b_alpha); k, v normalized
  T *gP = G.gP.data(), sbe = 0, sba = 0;
  normalize_grad(G.gk.data(), &W.P[0], W.nk.data(), gP, L, d);
  if (D.normalize_v) normalize_grad(G.gv.data(), &W.P[L * d], W.nv.data(), gP + L * d, L, d);
  else std::copy(G.gv.begin(), G.gv.end(), gP + L * d);
  for (int t = 0; t < L; ++t) {
    const T gpe = G.geta0[t] * W.eta0[t] * (T(1) - W.eta0[t]);
    const T gpa = G.galpha[t] * W.alpha[t] * (T(1) - W.alpha[t]);
    sbe += gpe;
    sba += gpa;
    for (int c = 0; c < d; ++c) {
      gP[2 * L * d + t * d + c] = gpe / T(d);
      gP[3 * L * d + t * d + c] = gpa / T(d);
    }
  }
  *gbeta = sbe;
  *gbalpha = sba;
  // projections P_j = z_j + silu(z_j W2_j^T) W1_j^T
  for (int j = 0; j < NPROJ; ++j) {
    const T* gPj = gP + j * L * d;
    T* ga = G.ga.data();
    tmm(gw1[j], gPj, &W.ps[j * L * hid], L, d, hid, true);
    mm(ga, gPj, in.w1[j], L, d, hid, false);
    for (int i = 0; i < L * hid; ++i) ga[i] *= W.pd1[j * L * hid + i];
    tmm(gw2[j], ga, in.z[j], L, hid, d, true);
    std::copy(gPj, gPj + L * d, gz[j]);
    mm(gz[j], ga, in.w2[j], L, hid, d, true);
  }
  std::copy(G.gq.begin(), G.gq.end(), gq);
}

template <typename T, int LL, int DD, int HH>
__attribute__((flatten)) void backward_flat(const Dims& D, const Inputs<T>& in, Work<T>& W, Grads<T>& G, const T* gy,
                                            const T* gw2n[NMEM], const T* gw1n[NMEM], T* gz[NPROJ], T* gq, T* gbeta,
                                            T* gbalpha, T* gw2[NMEM], T* gw1[NMEM]) {
  backward_one<T, LL, DD, HH>(D, in, W, G, gy, gw2n, gw1n, gz, gq, gbeta, gbalpha, gw2, gw1);
}

// one chunk of one (b, h): Hope's head sizes in float take the flattened functions (compiled for
// float only: build time), everything else the generic ones
template <typename T>
void forward_chunk(const Dims& D, const Inputs<T>& in, Work<T>& W, T* y, T* o2[NMEM], T* o1[NMEM]) {
  if constexpr (std::is_same_v<T, float>) {
    if (D.L == 16 && D.d == 32 && D.hid == 32) return forward_flat<T, 16, 32, 32>(D, in, W, y, o2, o1);
    if (D.L == 16 && D.d == 64 && D.hid == 64) return forward_flat<T, 16, 64, 64>(D, in, W, y, o2, o1);
  }
  forward_one<T, 0, 0, 0>(D, in, W, y, o2, o1);
}

template <typename T>
void backward_chunk(const Dims& D, const Inputs<T>& in, Work<T>& W, Grads<T>& G, const T* gy, const T* gw2n[NMEM],
                    const T* gw1n[NMEM], T* gz[NPROJ], T* gq, T* gbeta, T* gbalpha, T* gw2[NMEM], T* gw1[NMEM]) {
  if constexpr (std::is_same_v<T, float>) {
    if (D.L == 16 && D.d == 32 && D.hid == 32)
      return backward_flat<T, 16, 32, 32>(D, in, W, G, gy, gw2n, gw1n, gz, gq, gbeta, gbalpha, gw2, gw1);
    if (D.L == 16 && D.d == 64 && D.hid == 64)
      return backward_flat<T, 16, 64, 64>(D, in, W, G, gy, gw2n, gw1n, gz, gq, gbeta, gbalpha, gw2, gw1);
  }
  backward_one<T, 0, 0, 0>(D, in, W, G, gy, gw2n, gw1n, gz, gq, gbeta, gbalpha, gw2, gw1);
}

template <typename T>
void run_forward(const Dims& D, const T* z, const T* q, const T* beta, const T* balpha, const T* w2, const T* w1,
                 const T* u, T* y, T* w2n, T* w1n, int nthreads) {
  const int BH = D.B * D.H, L = D.L, d = D.d, hid = D.hid;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int p = 0; p < BH; ++p) {
    static thread_local Work<T> W;
    W.resize(L, d, hid);
    const Inputs<T> in = inputs_at(D, p, z, q, beta, balpha, w2, w1, u);
    T *o2[NMEM], *o1[NMEM];
    for (int m = 0; m < NMEM; ++m) {
      o2[m] = w2n + (size_t(m) * BH + p) * hid * d;
      o1[m] = w1n + (size_t(m) * BH + p) * d * hid;
    }
    forward_chunk(D, in, W, y + size_t(p) * L * d, o2, o1);
  }
}

template <typename T>
void run_backward(const Dims& D, const T* z, const T* q, const T* beta, const T* balpha, const T* w2, const T* w1,
                  const T* u, const T* gy, const T* gw2n, const T* gw1n, T* gz, T* gq, T* gbeta, T* gbalpha, T* gw2,
                  T* gw1, int nthreads) {
  const int BH = D.B * D.H, L = D.L, d = D.d, hid = D.hid;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int p = 0; p < BH; ++p) {
    static thread_local Work<T> W;
    static thread_local Grads<T> G;
    W.resize(L, d, hid);
    G.resize(L, d, hid);
    const Inputs<T> in = inputs_at(D, p, z, q, beta, balpha, w2, w1, u);
    const T *i2[NMEM], *i1[NMEM];
    T *o2[NMEM], *o1[NMEM], *oz[NPROJ];
    for (int m = 0; m < NMEM; ++m) {
      i2[m] = gw2n + (size_t(m) * BH + p) * hid * d;
      i1[m] = gw1n + (size_t(m) * BH + p) * d * hid;
      o2[m] = gw2 + (size_t(m) * BH + p) * hid * d;
      o1[m] = gw1 + (size_t(m) * BH + p) * d * hid;
    }
    for (int j = 0; j < NPROJ; ++j) oz[j] = gz + (size_t(j) * BH + p) * L * d;
    T *gyp = const_cast<T*>(gy) + size_t(p) * L * d, *gqp = gq + size_t(p) * L * d;
    backward_chunk(D, in, W, G, gyp, i2, i1, oz, gqp, gbeta + p, gbalpha + p, o2, o1);
  }
}

// ---------------------------------------------------------------------------------------------
// A whole layer: every chunk of one (b, h) in turn, its weights in cache from chunk to chunk.
// Same arithmetic as one call per chunk; the chunk loop, the guard's power step and the copies
// around each call leave Python. z [4][BH][T][d], q and y [BH][T][d] (chunk c: rows cL .. cL + L);
// chunk c > 0 starts from w2s/w1s[c - 1] [NC - 1][5][BH][..] (kept for the backward pass), the
// guard vector it uses (already stepped) is us[c] [NC][5][BH][hid]; without a backward pass
// (flags & 8 clear) both are two slots used in turn.

// smt_step.power_step for one memory: u <- normalize((u + 1e-4 normalize(1)) W1^T W1), W1 [d x hid]
template <typename T>
void power_step(T* u, const T* w1, int d, int hid) {
  T start[MAXDIM], w1u[MAXDIM], v[MAXDIM];
  const T shift = T(1e-4) * (T(1) / std::max(std::sqrt(T(hid)), T(NORM_EPS)));
  for (int c = 0; c < hid; ++c) start[c] = u[c] + shift;
  for (int o = 0; o < d; ++o) w1u[o] = dot(w1 + o * hid, start, hid);
  for (int c = 0; c < hid; ++c) v[c] = 0;
  for (int o = 0; o < d; ++o)
    for (int c = 0; c < hid; ++c) v[c] += w1u[o] * w1[o * hid + c];
  T n = 0;
  for (int c = 0; c < hid; ++c) n += v[c] * v[c];
  const T nc = std::max(std::sqrt(n), T(NORM_EPS));
  for (int c = 0; c < hid; ++c) u[c] = v[c] / nc;
}

struct LayerPtrs {  // offsets of one (b, h)'s chunk c in the layer's tensors
  int BH, T, NC;
  int WS, US;  // slots of w2s / w1s and of us: every chunk's (for the backward pass), or two in turn
  size_t zrow(int j, int p, int c, int L, int d) const { return ((size_t(j) * BH + p) * T + size_t(c) * L) * d; }
  size_t row(int p, int c, int L, int d) const { return (size_t(p) * T + size_t(c) * L) * d; }
  size_t w(int c, int m, int p, int n) const { return ((size_t(c % WS) * NMEM + m) * BH + p) * n; }
  size_t u(int c, int m, int p, int n) const { return ((size_t(c % US) * NMEM + m) * BH + p) * n; }
};

template <typename T>
Inputs<T> layer_inputs_at(const Dims& D, const LayerPtrs& lp, int p, int c, const T* z, const T* q, const T* beta,
                          const T* balpha, const T* w2_0, const T* w1_0, const T* w2s, const T* w1s, const T* us) {
  const int L = D.L, d = D.d, hid = D.hid, BH = lp.BH;
  Inputs<T> in;
  for (int j = 0; j < NPROJ; ++j) in.z[j] = z + lp.zrow(j, p, c, L, d);
  in.q = q + lp.row(p, c, L, d);
  for (int m = 0; m < NMEM; ++m) {
    in.w2[m] = c == 0 ? w2_0 + (size_t(m) * BH + p) * hid * d : w2s + lp.w(c - 1, m, p, hid * d);
    in.w1[m] = c == 0 ? w1_0 + (size_t(m) * BH + p) * d * hid : w1s + lp.w(c - 1, m, p, d * hid);
    in.u[m] = D.guard_on ? us + lp.u(c, m, p, hid) : nullptr;
  }
  in.b_eta = beta[p % D.H];
  in.b_alpha = balpha[p % D.H];
  return in;
}

template <typename T>
void run_layer_forward(const Dims& D, int T_, const T* z, const T* q, const T* beta, const T* balpha, const T* w2_0,
                       const T* w1_0, const T* u0, T* y, T* w2s, T* w1s, T* us, T* w2_end, T* w1_end, T* u_end,
                       bool keep, int nthreads) {
  const int BH = D.B * D.H, L = D.L, d = D.d, hid = D.hid, NC = T_ / L;
  const LayerPtrs lp{BH, T_, NC, keep ? std::max(NC - 1, 1) : 2, keep ? NC : 2};
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int p = 0; p < BH; ++p) {
    static thread_local Work<T> W;
    W.resize(L, d, hid);
    for (int c = 0; c < lp.NC; ++c) {
      const bool last = c == lp.NC - 1;
      if (D.guard_on)
        for (int m = 0; m < NMEM; ++m) {
          T* u = us + lp.u(c, m, p, hid);
          const T* prev = c == 0 ? u0 + (size_t(m) * BH + p) * hid : us + lp.u(c - 1, m, p, hid);
          std::copy(prev, prev + hid, u);
          power_step(u, c == 0 ? w1_0 + (size_t(m) * BH + p) * d * hid : w1s + lp.w(c - 1, m, p, d * hid), d, hid);
        }
      const Inputs<T> in = layer_inputs_at(D, lp, p, c, z, q, beta, balpha, w2_0, w1_0, w2s, w1s, us);
      T *o2[NMEM], *o1[NMEM];
      for (int m = 0; m < NMEM; ++m) {
        o2[m] = last ? w2_end + (size_t(m) * BH + p) * hid * d : w2s + lp.w(c, m, p, hid * d);
        o1[m] = last ? w1_end + (size_t(m) * BH + p) * d * hid : w1s + lp.w(c, m, p, d * hid);
      }
      forward_chunk(D, in, W, y + lp.row(p, c, L, d), o2, o1);
    }
    if (D.guard_on)
      for (int m = 0; m < NMEM; ++m) {
        const T* u = us + lp.u(lp.NC - 1, m, p, hid);
        std::copy(u, u + hid, u_end + (size_t(m) * BH + p) * hid);
      }
  }
}

// the chunks in reverse; each chunk's weight gradient is the previous chunk's chunk-end one
template <typename T>
void run_layer_backward(const Dims& D, int T_, const T* z, const T* q, const T* beta, const T* balpha,
                        const T* w2_0, const T* w1_0, const T* w2s, const T* w1s, const T* us, const T* gy,
                        const T* gw2_end, const T* gw1_end, T* gz, T* gq, T* gbeta, T* gbalpha, T* gw2_0, T* gw1_0,
                        int nthreads) {
  const int BH = D.B * D.H, L = D.L, d = D.d, hid = D.hid, nw = hid * d, NC = T_ / L;
  const LayerPtrs lp{BH, T_, NC, std::max(NC - 1, 1), NC};
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int p = 0; p < BH; ++p) {
    static thread_local Work<T> W;
    static thread_local Grads<T> G;
    static thread_local std::vector<T> gnext, gcur;  // [2][5][hid x d]: W2's then W1's
    W.resize(L, d, hid);
    G.resize(L, d, hid);
    gnext.resize(2 * NMEM * nw);
    gcur.resize(2 * NMEM * nw);
    for (int m = 0; m < NMEM; ++m) {
      std::copy_n(gw2_end + (size_t(m) * BH + p) * nw, nw, &gnext[m * nw]);
      std::copy_n(gw1_end + (size_t(m) * BH + p) * nw, nw, &gnext[(NMEM + m) * nw]);
    }
    T sbe = 0, sba = 0;
    for (int c = lp.NC - 1; c >= 0; --c) {
      const Inputs<T> in = layer_inputs_at(D, lp, p, c, z, q, beta, balpha, w2_0, w1_0, w2s, w1s, us);
      const T *i2[NMEM], *i1[NMEM];
      T *o2[NMEM], *o1[NMEM], *oz[NPROJ];
      for (int m = 0; m < NMEM; ++m) {
        i2[m] = &gnext[m * nw];
        i1[m] = &gnext[(NMEM + m) * nw];
        o2[m] = &gcur[m * nw];
        o1[m] = &gcur[(NMEM + m) * nw];
      }
      for (int j = 0; j < NPROJ; ++j) oz[j] = gz + lp.zrow(j, p, c, L, d);
      const T* gyp = gy + lp.row(p, c, L, d);
      T* gqp = gq + lp.row(p, c, L, d);
      T be = 0, ba = 0;
      backward_chunk(D, in, W, G, gyp, i2, i1, oz, gqp, &be, &ba, o2, o1);
      sbe += be;
      sba += ba;
      gnext.swap(gcur);
    }
    for (int m = 0; m < NMEM; ++m) {
      std::copy_n(&gnext[m * nw], nw, gw2_0 + (size_t(m) * BH + p) * nw);
      std::copy_n(&gnext[(NMEM + m) * nw], nw, gw1_0 + (size_t(m) * BH + p) * nw);
    }
    gbeta[p] = sbe;
    gbalpha[p] = sba;
  }
}

}  // namespace

#define NLB_ENTRY(T, SUFFIX)                                                                                     \
  extern "C" void hope_step_forward_##SUFFIX(const T* z, const T* q, const T* beta, const T* balpha, const T* w2,   \
                                             const T* w1, const T* u, T* y, T* w2n, T* w1n, int B, int H, int L,   \
                                             int d, int hid, int flags, double guard, int nthreads) {              \
    const Dims D{B, H, L, d, hid, bool(flags & 1), bool(flags & 2), bool(flags & 4), guard};                      \
    run_forward<T>(D, z, q, beta, balpha, w2, w1, u, y, w2n, w1n, nthreads);                                      \
  }                                                                                                              \
  extern "C" void hope_step_backward_##SUFFIX(const T* z, const T* q, const T* beta, const T* balpha, const T* w2,  \
                                              const T* w1, const T* u, const T* gy, const T* gw2n, const T* gw1n,   \
                                              T* gz, T* gq, T* gbeta, T* gbalpha, T* gw2, T* gw1, int B, int H,     \
                                              int L, int d, int hid, int flags, double guard, int nthreads) {       \
    const Dims D{B, H, L, d, hid, bool(flags & 1), bool(flags & 2), bool(flags & 4), guard};                      \
    run_backward<T>(D, z, q, beta, balpha, w2, w1, u, gy, gw2n, gw1n, gz, gq, gbeta, gbalpha, gw2, gw1, nthreads); \
  }

NLB_ENTRY(float, f32)
NLB_ENTRY(double, f64)

#define NLB_LAYER_ENTRY(T, SUFFIX)                                                                                \
  extern "C" void hope_layer_forward_##SUFFIX(const T* z, const T* q, const T* beta, const T* balpha,             \
                                              const T* w2_0, const T* w1_0, const T* u0, T* y, T* w2s, T* w1s,      \
                                              T* us, T* w2_end, T* w1_end, T* u_end, int B, int H, int T_, int L,   \
                                              int d, int hid, int flags, double guard, int nthreads) {              \
    const Dims D{B, H, L, d, hid, bool(flags & 1), bool(flags & 2), bool(flags & 4), guard};                      \
    run_layer_forward<T>(D, T_, z, q, beta, balpha, w2_0, w1_0, u0, y, w2s, w1s, us, w2_end, w1_end, u_end,       \
                         bool(flags & 8), nthreads);                                                             \
  }                                                                                                              \
  extern "C" void hope_layer_backward_##SUFFIX(const T* z, const T* q, const T* beta, const T* balpha,            \
                                               const T* w2_0, const T* w1_0, const T* w2s, const T* w1s,           \
                                               const T* us, const T* gy, const T* gw2_end, const T* gw1_end,       \
                                               T* gz, T* gq, T* gbeta, T* gbalpha, T* gw2_0, T* gw1_0, int B,      \
                                               int H, int T_, int L, int d, int hid, int flags, double guard,      \
                                               int nthreads) {                                                     \
    const Dims D{B, H, L, d, hid, bool(flags & 1), bool(flags & 2), bool(flags & 4), guard};                      \
    run_layer_backward<T>(D, T_, z, q, beta, balpha, w2_0, w1_0, w2s, w1s, us, gy, gw2_end, gw1_end, gz, gq,      \
                          gbeta, gbalpha, gw2_0, gw1_0, nthreads);                                               \
  }

NLB_LAYER_ENTRY(float, f32)
NLB_LAYER_ENTRY(double, f64)

// ---------------------------------------------------------------------------------------------
// The projection memories' inputs (models/self_modifying_titans.projection_inputs, separate convs,
// normalized): z[j, b, h, t, :] = L2norm_c( sum_k xx[b, t + k, h dh + c] w[h dh + c, j, k] ),
// xx = [tail; x] [B, T + K - 1, D], w [D, 4, K] (input channel c feeds conv outputs 4c .. 4c + 3).
// Parallel over heads (each owns its channels' weight gradient); the backward recomputes y.
namespace {

// head h's conv weights as wt[(j K + k) dh + c], contiguous along the channel c
template <typename T>
void conv_weights(std::vector<T>& wt, const T* w, int h, int dh, int K) {
  for (int c = 0; c < dh; ++c)
    for (int j = 0; j < NPROJ; ++j)
      for (int k = 0; k < K; ++k) wt[(j * K + k) * dh + c] = w[((h * dh + c) * NPROJ + j) * K + k];
}

// conv j of head h at (b, t) before the norm: y[c] = sum_k xx[b, t + k, h dh + c] wt[j, k, c]
template <typename T>
NLB_INLINE void conv_row(T* y, const T* xx, const T* wt, int b, int t, int j, int TK, int D, int h, int dh, int K) {
  for (int c = 0; c < dh; ++c) y[c] = 0;
  for (int k = 0; k < K; ++k) {
    const T* xr = xx + (size_t(b) * TK + t + k) * D + h * dh;
    const T* wr = wt + (j * K + k) * dh;
#pragma omp simd
    for (int c = 0; c < dh; ++c) y[c] += xr[c] * wr[c];
  }
}

template <typename T>
void inputs_forward(const T* xx, const T* w, T* z, int B, int T_, int K, int D, int H, int nthreads) {
  const int dh = D / H, TK = T_ + K - 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int h = 0; h < H; ++h) {
    std::vector<T> wt(NPROJ * K * dh), y(NPROJ * dh);
    conv_weights(wt, w, h, dh, K);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < T_; ++t) {
        for (int j = 0; j < NPROJ; ++j) {
          T* yj = &y[j * dh];
          conv_row(yj, xx, wt.data(), b, t, j, TK, D, h, dh, K);
          const T nc = std::max(std::sqrt(dot(yj, yj, dh)), T(NORM_EPS));
          T* out = z + ((size_t(j) * B + b) * H + h) * size_t(T_) * dh + size_t(t) * dh;
          for (int c = 0; c < dh; ++c) out[c] = yj[c] / nc;
        }
      }
  }
}

template <typename T>
void inputs_backward(const T* xx, const T* w, const T* gz, T* gxx, T* gw, int B, int T_, int K, int D, int H,
                     int nthreads) {
  const int dh = D / H, TK = T_ + K - 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int h = 0; h < H; ++h) {
    std::vector<T> wt(NPROJ * K * dh), gwt(NPROJ * K * dh, T(0)), y(dh), gy(dh), nrm(1);
    conv_weights(wt, w, h, dh, K);
    for (int b = 0; b < B; ++b) {
      for (int t = 0; t < TK; ++t)
        std::fill(gxx + (size_t(b) * TK + t) * D + h * dh, gxx + (size_t(b) * TK + t) * D + (h + 1) * dh, T(0));
      for (int t = 0; t < T_; ++t)
        for (int j = 0; j < NPROJ; ++j) {
          conv_row(y.data(), xx, wt.data(), b, t, j, TK, D, h, dh, K);
          nrm[0] = std::sqrt(dot(y.data(), y.data(), dh));
          const T* g = gz + ((size_t(j) * B + b) * H + h) * size_t(T_) * dh + size_t(t) * dh;
          normalize_grad(g, y.data(), nrm.data(), gy.data(), 1, dh);
          for (int k = 0; k < K; ++k) {
            const T* xr = xx + (size_t(b) * TK + t + k) * D + h * dh;
            T* gxr = gxx + (size_t(b) * TK + t + k) * D + h * dh;
            const T* wr = &wt[(j * K + k) * dh];
            T* gwr = &gwt[(j * K + k) * dh];
#pragma omp simd
            for (int c = 0; c < dh; ++c) {
              gxr[c] += gy[c] * wr[c];
              gwr[c] += gy[c] * xr[c];
            }
          }
        }
    }
    for (int c = 0; c < dh; ++c)
      for (int j = 0; j < NPROJ; ++j)
        for (int k = 0; k < K; ++k) gw[((h * dh + c) * NPROJ + j) * K + k] = gwt[(j * K + k) * dh + c];
  }
}

}  // namespace

#define NLB_INPUTS_ENTRY(T, SUFFIX)                                                                               \
  extern "C" void hope_inputs_forward_##SUFFIX(const T* xx, const T* w, T* z, int B, int T_, int K, int D, int H,  \
                                               int nthreads) {                                                    \
    inputs_forward<T>(xx, w, z, B, T_, K, D, H, nthreads);                                                      \
  }                                                                                                              \
  extern "C" void hope_inputs_backward_##SUFFIX(const T* xx, const T* w, const T* gz, T* gxx, T* gw, int B, int T_, \
                                                int K, int D, int H, int nthreads) {                              \
    inputs_backward<T>(xx, w, gz, gxx, gw, B, T_, K, D, H, nthreads);                                           \
  }

NLB_INPUTS_ENTRY(float, f32)
NLB_INPUTS_ENTRY(double, f64)
