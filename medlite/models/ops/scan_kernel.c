/* medlite's selective-scan forward pass for CPUs, compiled on the user's machine at first use
 * (see native.py). Plain C99, no Python or torch headers, so any C compiler builds it in well
 * under a second; OpenMP is optional.
 *
 * Why by hand: in PyTorch every step of the recurrence is a handful of memory passes over a
 * (batch, D, N) state, and the blocked scan of selective_scan.py still makes ~7 passes over a
 * (batch, D, N, L) tensor plus an exp of each element. Here the state of a group of W channels
 * lives in registers/L1 for the whole sequence: one pass over the inputs, one write of y.
 *
 * Layout is time-major, as selective_scan.py's _ScanFn has it:
 *   dl, du   (L, batch, D)       step sizes delta and delta * u
 *   A        (D, N)
 *   B, C     mode 0: (L, batch, G, N), channel d in group d / (D / G)
 *            mode 1: (D, N), time-invariant
 *            mode 2: absent, a constant 1 (N == 1)
 *   h0       (batch, D, N)       state before step 0
 *   y        (L, batch, D)       out: sum_n C_t[n] h_t[n]
 *   starts   (n_starts, batch, D, N) out: state before steps 0, every, 2 every, ...
 *   last     (batch, D, N)       out: state after the last step
 *
 * Vectorised across W neighbouring channels (the SIMD lanes), never across N: each lane's
 * recurrence is independent, so nothing is reduced across lanes and no fast-math is needed.
 * exp is our own (range reduction + polynomial) so that it vectorises with any compiler and
 * libm, with a relative error below 3e-7 (torch's: 1e-7).
 */
#include <stdint.h>
#include <string.h>

#define MAX_N 64
#define MAX_W 16

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

static ALWAYS_INLINE float exp_lane(float x) {
  /* exp(x) = 2^k exp(r), k = round(x / ln 2), |r| <= ln(2) / 2; Taylor to r^6. */
  const float lo = -87.0f, hi = 88.0f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  float kf = (xc * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest */
  float r = (xc - kf * 0.693145752f) - kf * 1.42860677e-06f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f +
            r * (0.00833333377f + r * 0.00138888892f)))));
  int32_t bits = ((int32_t)kf + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  float e = p * scale;
  return x < lo ? 0.0f : e; /* exp(-87) ~ 1.6e-38: below it, 0 (as in the PyTorch path) */
}

static ALWAYS_INLINE void scan_lanes(const int W, int64_t item, const float *dl, const float *du,
                              const float *A, const float *B, const float *C, const float *h0,
                              float *y, float *starts, float *last, int64_t L, int64_t batch,
                              int64_t D, int64_t N, int64_t G, int b_mode, int c_mode,
                              int64_t every) {
  const int64_t blocks = D / W, bb = item / blocks, d0 = (item % blocks) * W;
  const int64_t group = d0 / (D / G), state = batch * D * N;
  float h[MAX_N][MAX_W], a_n[MAX_N][MAX_W], b_fix[MAX_N][MAX_W], c_fix[MAX_N][MAX_W];
  for (int64_t n = 0; n < N; ++n) {
    for (int l = 0; l < W; ++l) {
      const int64_t dn = (d0 + l) * N + n;
      h[n][l] = h0[bb * D * N + dn];
      a_n[n][l] = A[dn];
      b_fix[n][l] = b_mode == 1 ? B[dn] : 1.0f;
      c_fix[n][l] = c_mode == 1 ? C[dn] : 1.0f;
    }
  }
  for (int64_t t = 0; t < L; ++t) {
    if (every > 0 && t % every == 0) {
      float *s = starts + (t / every) * state + bb * D * N;
      for (int64_t n = 0; n < N; ++n)
        for (int l = 0; l < W; ++l) s[(d0 + l) * N + n] = h[n][l];
    }
    const int64_t row = t * batch + bb;
    const float *dlt = dl + row * D + d0, *dut = du + row * D + d0;
    const float *bt = b_mode == 0 ? B + (row * G + group) * N : 0;
    const float *ct = c_mode == 0 ? C + (row * G + group) * N : 0;
    float acc[MAX_W];
    for (int l = 0; l < W; ++l) acc[l] = 0.0f;
    for (int64_t n = 0; n < N; ++n) {
      const float bn = bt ? bt[n] : 0.0f, cn = ct ? ct[n] : 0.0f;
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        const float bv = bt ? bn : b_fix[n][l], cv = ct ? cn : c_fix[n][l];
        const float hv = exp_lane(dlt[l] * a_n[n][l]) * h[n][l] + dut[l] * bv;
        h[n][l] = hv;
        acc[l] += cv * hv;
      }
    }
    float *yt = y + row * D + d0;
    for (int l = 0; l < W; ++l) yt[l] = acc[l];
  }
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) last[bb * D * N + (d0 + l) * N + n] = h[n][l];
}

/* Returns 0, or -1 when the shapes are outside what this kernel handles (the caller checks
 * first; this is a last guard against writing out of bounds). */
int medlite_scan_forward(const float *dl, const float *du, const float *A, const float *B,
                         const float *C, const float *h0, float *y, float *starts, float *last,
                         int64_t L, int64_t batch, int64_t D, int64_t N, int64_t G, int b_mode,
                         int c_mode, int64_t every, int lanes, int threads) {
  if (N < 1 || N > MAX_N || G < 1 || D % G || (D / G) % lanes || batch < 1 || L < 0)
    return -1;
  if (lanes != 1 && lanes != 4 && lanes != 8 && lanes != 16) return -1;
  const int64_t items = batch * (D / lanes);
  (void)threads; /* unused without OpenMP */
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    /* A constant W per call lets the compiler unroll and vectorise each lane loop. */
    switch (lanes) {
    case 16: scan_lanes(16, i, dl, du, A, B, C, h0, y, starts, last, L, batch, D, N, G, b_mode, c_mode, every); break;
    case 8: scan_lanes(8, i, dl, du, A, B, C, h0, y, starts, last, L, batch, D, N, G, b_mode, c_mode, every); break;
    case 4: scan_lanes(4, i, dl, du, A, B, C, h0, y, starts, last, L, batch, D, N, G, b_mode, c_mode, every); break;
    default: scan_lanes(1, i, dl, du, A, B, C, h0, y, starts, last, L, batch, D, N, G, b_mode, c_mode, every); break;
    }
  }
  return 0;
}

/* Our exp on n floats, for the tests of its accuracy. */
void medlite_exp(const float *x, float *out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = exp_lane(x[i]);
}
