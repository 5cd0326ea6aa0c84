/* medlite's selective scan for CPUs, forward and backward, compiled on the user's machine at
 * first use (see native.py). Plain C99, no Python or torch headers, so any C compiler builds it
 * in about a second; OpenMP is optional.
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
 *   starts   (n_starts, batch, D, N) the state before steps 0, every, 2 every, ... (written by
 *            the forward pass, read by the backward pass, which recomputes each block's states
 *            from them, as mamba's CUDA kernel does)
 *
 * Vectorised across W neighbouring channels (the SIMD lanes), never across N: each lane's
 * recurrence is independent, so no fast-math is needed. The only sums across lanes are the
 * gradients of B and C in the backward pass (a group's channels share them). exp is our own
 * (range reduction + polynomial) so that it vectorises with any compiler and libm, with a
 * relative error below 3e-7 (torch's: 1e-7).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_N 64
#define MAX_W 16

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

typedef struct {
  const float *dl, *du, *A, *B, *C;
  int64_t L, batch, D, N, G, every;
  int b_mode, c_mode;
} problem;

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

/* One work item: batch element bb, channels d0 .. d0 + W - 1 (all in one group). */
typedef struct {
  int64_t bb, d0, group, slot, per_group;
} lanes_of;

static ALWAYS_INLINE lanes_of item_lanes(const problem *p, int W, int64_t item) {
  const int64_t blocks = p->D / W, heads = p->D / p->G;
  lanes_of o;
  o.bb = item / blocks;
  o.d0 = (item % blocks) * W;
  o.group = o.d0 / heads;
  o.per_group = heads / W;
  o.slot = (item % blocks) % o.per_group;
  return o;
}

/* Per-lane copies of A and of time-invariant B/C (1 where absent). */
static ALWAYS_INLINE void load_fixed(const problem *p, int W, int64_t d0, float a_n[][MAX_W],
                                     float b_fix[][MAX_W], float c_fix[][MAX_W]) {
  for (int64_t n = 0; n < p->N; ++n)
    for (int l = 0; l < W; ++l) {
      const int64_t dn = (d0 + l) * p->N + n;
      a_n[n][l] = p->A[dn];
      b_fix[n][l] = p->b_mode == 1 ? p->B[dn] : 1.0f;
      c_fix[n][l] = p->c_mode == 1 ? p->C[dn] : 1.0f;
    }
}

static ALWAYS_INLINE const float *step_row(const float *m, int mode, const problem *p,
                                           int64_t row, int64_t group) {
  return mode == 0 ? m + (row * p->G + group) * p->N : 0;
}

static ALWAYS_INLINE void forward_lanes(const problem *p, const int W, int64_t item,
                                        const float *h0, float *y, float *starts, float *last) {
  const lanes_of o = item_lanes(p, W, item);
  const int64_t N = p->N, DN = p->D * N, state = p->batch * DN;
  float h[MAX_N][MAX_W], a_n[MAX_N][MAX_W], b_fix[MAX_N][MAX_W], c_fix[MAX_N][MAX_W];
  load_fixed(p, W, o.d0, a_n, b_fix, c_fix);
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) h[n][l] = h0[o.bb * DN + (o.d0 + l) * N + n];
  for (int64_t t = 0; t < p->L; ++t) {
    if (p->every > 0 && t % p->every == 0) {
      float *s = starts + (t / p->every) * state + o.bb * DN;
      for (int64_t n = 0; n < N; ++n)
        for (int l = 0; l < W; ++l) s[(o.d0 + l) * N + n] = h[n][l];
    }
    const int64_t row = t * p->batch + o.bb;
    const float *dlt = p->dl + row * p->D + o.d0, *dut = p->du + row * p->D + o.d0;
    const float *bt = step_row(p->B, p->b_mode, p, row, o.group);
    const float *ct = step_row(p->C, p->c_mode, p, row, o.group);
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
    float *yt = y + row * p->D + o.d0;
    for (int l = 0; l < W; ++l) yt[l] = acc[l];
  }
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) last[o.bb * DN + (o.d0 + l) * N + n] = h[n][l];
}

/* Gradients, backwards in time, block by block: recompute the block's states from its start
 * (into hbuf), then run the adjoint lambda_t = gy_t C_t + a_{t+1} lambda_{t+1}.
 *   g_dl, g_du (L, batch, D); g_A (batch, D, N), to be summed over the batch;
 *   g_B, g_C   mode 0: (L, batch, G, per_group, N), to be summed over per_group (the items
 *              sharing a group); mode 1: (batch, D, N), to be summed over the batch. */
static ALWAYS_INLINE int backward_lanes(const problem *p, const int W, int64_t item,
                                        const float *starts, const float *gy, float *g_dl,
                                        float *g_du, float *g_A, float *g_B, float *g_C) {
  const lanes_of o = item_lanes(p, W, item);
  const int64_t N = p->N, DN = p->D * N, state = p->batch * DN, every = p->every;
  const int64_t span = every < p->L ? every : p->L; /* the longest block */
  float *hbuf = malloc((size_t)(span > 0 ? span : 1) * N * W * sizeof(float));
  if (!hbuf) return -2;
  float a_n[MAX_N][MAX_W], b_fix[MAX_N][MAX_W], c_fix[MAX_N][MAX_W], carry[MAX_N][MAX_W];
  float h[MAX_N][MAX_W], h_start[MAX_N][MAX_W], gA[MAX_N][MAX_W], gB[MAX_N][MAX_W],
      gC[MAX_N][MAX_W];
  load_fixed(p, W, o.d0, a_n, b_fix, c_fix);
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) carry[n][l] = gA[n][l] = gB[n][l] = gC[n][l] = 0.0f;
  for (int64_t k = (p->L + every - 1) / every - 1; k >= 0; --k) {
    const int64_t t0 = k * every, t1 = t0 + every < p->L ? t0 + every : p->L;
    const float *s = starts + k * state + o.bb * DN;
    for (int64_t n = 0; n < N; ++n)
      for (int l = 0; l < W; ++l) h[n][l] = h_start[n][l] = s[(o.d0 + l) * N + n];
    for (int64_t t = t0; t < t1; ++t) { /* the block's states, as in the forward pass */
      const int64_t row = t * p->batch + o.bb;
      const float *dlt = p->dl + row * p->D + o.d0, *dut = p->du + row * p->D + o.d0;
      const float *bt = step_row(p->B, p->b_mode, p, row, o.group);
      float *ht = hbuf + (t - t0) * N * W;
      for (int64_t n = 0; n < N; ++n) {
        const float bn = bt ? bt[n] : 0.0f;
#pragma omp simd
        for (int l = 0; l < W; ++l) {
          const float bv = bt ? bn : b_fix[n][l];
          h[n][l] = exp_lane(dlt[l] * a_n[n][l]) * h[n][l] + dut[l] * bv;
          ht[n * W + l] = h[n][l];
        }
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t row = t * p->batch + o.bb;
      const float *dlt = p->dl + row * p->D + o.d0, *dut = p->du + row * p->D + o.d0;
      const float *gyt = gy + row * p->D + o.d0;
      const float *bt = step_row(p->B, p->b_mode, p, row, o.group);
      const float *ct = step_row(p->C, p->c_mode, p, row, o.group);
      const float *hc = hbuf + (t - t0) * N * W;
      const float *hp = t > t0 ? hbuf + (t - 1 - t0) * N * W : &h_start[0][0];
      const int64_t hp_stride = t > t0 ? W : MAX_W;
      const int64_t bc_row = ((row * p->G + o.group) * o.per_group + o.slot) * N;
      float gdl[MAX_W], gdu[MAX_W];
      for (int l = 0; l < W; ++l) gdl[l] = gdu[l] = 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        const float bn = bt ? bt[n] : 0.0f, cn = ct ? ct[n] : 0.0f;
        const float *hpn = hp + n * hp_stride, *hcn = hc + n * W;
        float sb = 0.0f, sc = 0.0f;
#pragma omp simd reduction(+ : sb, sc)
        for (int l = 0; l < W; ++l) {
          const float bv = bt ? bn : b_fix[n][l], cv = ct ? cn : c_fix[n][l];
          const float lam = gyt[l] * cv + carry[n][l];
          const float a = exp_lane(dlt[l] * a_n[n][l]);
          const float e = lam * a * hpn[l]; /* dL/d(delta_t A) */
          gdu[l] += lam * bv;
          gdl[l] += e * a_n[n][l];
          gA[n][l] += e * dlt[l];
          gB[n][l] += lam * dut[l];
          gC[n][l] += gyt[l] * hcn[l];
          sb += lam * dut[l];
          sc += gyt[l] * hcn[l];
          carry[n][l] = a * lam;
        }
        if (p->b_mode == 0) g_B[bc_row + n] = sb;
        if (p->c_mode == 0) g_C[bc_row + n] = sc;
      }
      for (int l = 0; l < W; ++l) {
        g_dl[row * p->D + o.d0 + l] = gdl[l];
        g_du[row * p->D + o.d0 + l] = gdu[l];
      }
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int l = 0; l < W; ++l) {
      const int64_t at = o.bb * DN + (o.d0 + l) * N + n;
      g_A[at] = gA[n][l];
      if (p->b_mode == 1) g_B[at] = gB[n][l];
      if (p->c_mode == 1) g_C[at] = gC[n][l];
    }
  free(hbuf);
  return 0;
}

static int check(const problem *p, int lanes) {
  if (p->N < 1 || p->N > MAX_N || p->G < 1 || p->D % p->G || (p->D / p->G) % lanes)
    return -1;
  if (p->batch < 1 || p->L < 0 || p->every < 0) return -1;
  return lanes == 1 || lanes == 4 || lanes == 8 || lanes == 16 ? 0 : -1;
}

/* A constant W per call lets the compiler unroll and vectorise each lane loop. */
#define BY_LANES(lanes, call)                                                                 \
  switch (lanes) {                                                                            \
  case 16: { const int W = 16; call; } break;                                                 \
  case 8: { const int W = 8; call; } break;                                                   \
  case 4: { const int W = 4; call; } break;                                                   \
  default: { const int W = 1; call; } break;                                                  \
  }

/* The entry points return 0, -1 when the shapes are outside what this kernel handles (the
 * caller checks first; this is a last guard against writing out of bounds), or -2 when memory
 * ran out. */
int medlite_scan_forward(const float *dl, const float *du, const float *A, const float *B,
                         const float *C, const float *h0, float *y, float *starts, float *last,
                         int64_t L, int64_t batch, int64_t D, int64_t N, int64_t G, int b_mode,
                         int c_mode, int64_t every, int lanes, int threads) {
  const problem p = {dl, du, A, B, C, L, batch, D, N, G, every, b_mode, c_mode};
  if (check(&p, lanes)) return -1;
  const int64_t items = batch * (D / lanes);
  (void)threads; /* unused without OpenMP */
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    BY_LANES(lanes, forward_lanes(&p, W, i, h0, y, starts, last))
  }
  return 0;
}

int medlite_scan_backward(const float *dl, const float *du, const float *A, const float *B,
                          const float *C, const float *starts, const float *gy, float *g_dl,
                          float *g_du, float *g_A, float *g_B, float *g_C, int64_t L,
                          int64_t batch, int64_t D, int64_t N, int64_t G, int b_mode,
                          int c_mode, int64_t every, int lanes, int threads) {
  const problem p = {dl, du, A, B, C, L, batch, D, N, G, every, b_mode, c_mode};
  if (check(&p, lanes) || every < 1) return -1;
  const int64_t items = batch * (D / lanes);
  int failed = 0;
  (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
  for (int64_t i = 0; i < items; ++i) {
    int rc = 0;
    BY_LANES(lanes, rc = backward_lanes(&p, W, i, starts, gy, g_dl, g_du, g_A, g_B, g_C))
    failed |= rc != 0;
  }
  return failed ? -2 : 0;
}

/* Our exp on n floats, for the tests of its accuracy. */
void medlite_exp(const float *x, float *out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = exp_lane(x[i]);
}
