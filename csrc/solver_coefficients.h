// Multistep solver coefficients (a, b_k) of one step, with derivatives w.r.t. t_{i-3..i}.
//
// Shared by the CPU loop and the CUDA kernel so the two cannot disagree.  Mirrors
// ld3_ext/coefficients.py exactly in layout: row 0 = main / UniPC predictor [a, b0..b3],
// row 1 = UniPC corrector [a, c0..c3] (c0 multiplies the new output D_i), zeros otherwise.
#pragma once

#include "noise_schedule_math.h"

namespace ld3 {

constexpr int kMaxHistory = 4;
constexpr int kTableWidth = 1 + kMaxHistory;
constexpr int kWindow = 4;  // step i reads t_{i-3} .. t_i

enum SolverKind : int { kEuler = 0, kDPMpp = 1, kUniPC = 2, kIPNDM = 3 };

struct SolverParams {
  int solver;
  int order;
  bool lower_order_final;
  bool heun;           // DPM-Solver++ second order: heun instead of midpoint
  bool bh2;            // UniPC B(h) = expm1(-h) instead of -h
  bool use_corrector;  // UniPC corrector after every step but the last
};

using D4 = Dual<double, kWindow>;

// Order of step i (1-based) of an n-step solve; coefficients.step_orders.
LD3_HD int step_order(const SolverParams& sp, int i, int n) {
  int p = i < sp.order ? i : sp.order;
  if (sp.lower_order_final && sp.solver != kEuler) {
    const int rest = n + 1 - i;
    p = p < rest ? p : rest;
  }
  return p;
}

// Window arrays hold grid points t_{i-3+j} at index j (j = 3 is t_i).
struct Window {
  D4 lam[kWindow], alpha[kWindow], sigma[kWindow], log_alpha[kWindow], log_sigma[kWindow];
};

// Below this |x| the phi functions come from their Taylor series; above it from the recursion
// phi_{k+1} = (phi_k - 1/k!)/x, whose cancellation then costs at most a few ulps (ld3_ext/coefficients.py
// uses the same split).
constexpr double kPhiSeriesBelow = 2.0;
constexpr int kPhiSeriesTerms = 22;  // |x|^22/26! < 4e-19 of phi_4 for |x| < 2

// phi[k-1] = phi_k(x) = sum_{j>=0} x^j/(j+k)!  (phi_1 = expm1(x)/x), k = 1..4, accurate to a few ulps for
// every x != 0 -- the exponential-integrator functions every multistep row is made of.  The recursion
// alone loses all digits as x -> 0 (steps of a fine grid), and the Jacobian even earlier.
LD3_HD void phi_functions(const D4& x, D4 phi[4]) {
  if (::fabs(x.v) < kPhiSeriesBelow) {
    // phi_4 by Horner, then phi_k = 1/k! + x phi_{k+1} downwards (no cancellation for |x| < 2)
    double inv_fact[kPhiSeriesTerms + 4];  // inv_fact[m] = 1/m!
    inv_fact[0] = 1.0;
    for (int m = 1; m < kPhiSeriesTerms + 4; ++m) inv_fact[m] = inv_fact[m - 1] / double(m);
    D4 acc(inv_fact[kPhiSeriesTerms + 3]);
    for (int j = kPhiSeriesTerms - 2; j >= 0; --j) acc = acc * x + D4(inv_fact[j + 4]);
    phi[3] = acc;
    for (int k = 3; k >= 1; --k) phi[k - 1] = D4(inv_fact[k]) + x * phi[k];
    return;
  }
  phi[0] = expm1(x) / x;
  double inv_fact = 1.0;
  for (int k = 1; k < 4; ++k) {
    phi[k] = (phi[k - 1] - D4(inv_fact)) / x;
    inv_fact /= double(k + 1);
  }
}

LD3_HD void dpmpp_row(const Window& w, int p, bool heun, D4 row[kTableWidth]) {
  const D4 h = w.lam[3] - w.lam[2];
  const D4 a = exp(w.log_sigma[3] - w.log_sigma[2]);
  D4 phis[4];
  phi_functions(-h, phis);
  // LD3.md's phi_1 = e^-h - 1, phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2, without their cancellations
  const D4 phi1 = expm1(-h);
  const D4 phi2 = h * phis[1];
  const D4 phi3 = -h * phis[2];
  const D4& al = w.alpha[3];
  for (int c = 0; c < kTableWidth; ++c) row[c] = D4(0.0);
  row[0] = a;
  if (p == 1) {
    row[1] = -al * phi1;
    return;
  }
  const D4 r0 = (w.lam[2] - w.lam[1]) / h;
  if (p == 2) {
    if (!heun) {
      row[1] = -al * phi1 * (D4(1.0) + D4(0.5) / r0);
      row[2] = al * phi1 * D4(0.5) / r0;
    } else {
      row[1] = -al * phi1 + al * phi2 / r0;
      row[2] = -al * phi2 / r0;
    }
    return;
  }
  const D4 r1 = (w.lam[1] - w.lam[0]) / h;
  // first differences as coefficient vectors over (D_{i-1}, D_{i-2}, D_{i-3})
  const D4 d10[3] = {D4(1.0) / r0, -(D4(1.0) / r0), D4(0.0)};
  const D4 d11[3] = {D4(0.0), D4(1.0) / r1, -(D4(1.0) / r1)};
  for (int k = 0; k < 3; ++k) {
    const D4 diff = d10[k] - d11[k];
    const D4 dd1 = d10[k] + r0 / (r0 + r1) * diff;
    const D4 dd2 = diff / (r0 + r1);
    row[1 + k] = al * phi2 * dd1 - al * phi3 * dd2;
  }
  row[1] = row[1] - al * phi1;
}

// Solve the p x p system sum_c r_c^j x_c = rhs_j (j = 0..p-1), p <= 3, by Cramer's rule; the
// systems are tiny and well conditioned for decreasing grids, and no pivoting keeps it branch-free.
LD3_HD void solve_power_system(int p, const D4* r, const D4* rhs, D4* x) {
  if (p == 1) {
    x[0] = rhs[0];
    return;
  }
  if (p == 2) {
    // [1 1; r0 r1]
    const D4 det = r[1] - r[0];
    x[0] = (rhs[0] * r[1] - rhs[1]) / det;
    x[1] = (rhs[1] - r[0] * rhs[0]) / det;
    return;
  }
  // rows: [1 1 1], [r0 r1 r2], [r0^2 r1^2 r2^2]
  D4 m[3][3];
  for (int c = 0; c < 3; ++c) {
    m[0][c] = D4(1.0);
    m[1][c] = r[c];
    m[2][c] = r[c] * r[c];
  }
  auto det3 = [](const D4 (&q)[3][3]) {
    return q[0][0] * (q[1][1] * q[2][2] - q[1][2] * q[2][1]) -
           q[0][1] * (q[1][0] * q[2][2] - q[1][2] * q[2][0]) +
           q[0][2] * (q[1][0] * q[2][1] - q[1][1] * q[2][0]);
  };
  const D4 det = det3(m);
  for (int c = 0; c < 3; ++c) {
    D4 mc[3][3];
    for (int j = 0; j < 3; ++j)
      for (int l = 0; l < 3; ++l) mc[j][l] = (l == c) ? rhs[j] : m[j][l];
    x[c] = det3(mc) / det;
  }
}

LD3_HD void unipc_rows(const Window& w, int p, bool bh2, bool corrector, D4 pred[kTableWidth],
                       D4 corr[kTableWidth]) {
  const D4 h = w.lam[3] - w.lam[2];
  const D4 hh = -h;
  const D4 a = exp(w.log_sigma[3] - w.log_sigma[2]);
  const D4& al = w.alpha[3];
  const D4 h_phi_1 = expm1(hh);
  const D4 B = bh2 ? h_phi_1 : hh;
  D4 rks[3];  // r_k for history m_k, k = 1..p-1 (index k-1); rks[p-1] = 1 for the corrector
  for (int k = 1; k < p; ++k) rks[k - 1] = (w.lam[2 - k] - w.lam[2]) / h;
  // b_k = g_k k!/B(h) with g_1 = phi/hh - 1, g_{k+1} = g_k/hh - 1/(k+1)! (LD3.md), i.e. g_k = hh phi_{k+1}(hh):
  // b_k = phi_{k+1}(hh) k! hh/B, and hh/B = 1 (bh1) or 1/phi_1(hh) (bh2)
  D4 phis[4];
  phi_functions(hh, phis);
  D4 bvec[3];
  double fact = 1.0;
  for (int k = 1; k <= p; ++k) {
    fact *= double(k);
    bvec[k - 1] = bh2 ? phis[k] * D4(fact) / phis[0] : phis[k] * D4(fact);
  }
  for (int c = 0; c < kTableWidth; ++c) {
    pred[c] = D4(0.0);
    corr[c] = D4(0.0);
  }
  pred[0] = a;
  pred[1] = -al * h_phi_1;
  if (p >= 2) {
    D4 rho[3];
    if (p == 2) {
      rho[0] = D4(0.5);
    } else {
      solve_power_system(p - 1, rks, bvec, rho);
    }
    for (int k = 1; k < p; ++k) {
      const D4 wk = -al * B * rho[k - 1] / rks[k - 1];  // coefficient of (m_k - m_0)/r_k
      pred[1 + k] = pred[1 + k] + wk;
      pred[1] = pred[1] - wk;
    }
  }
  if (!corrector) return;
  D4 rho_c[3];
  if (p == 1) {
    rho_c[0] = D4(0.5);
  } else {
    D4 rall[3];
    for (int k = 0; k < p - 1; ++k) rall[k] = rks[k];
    rall[p - 1] = D4(1.0);
    solve_power_system(p, rall, bvec, rho_c);
  }
  corr[0] = a;
  corr[2] = -al * h_phi_1;
  for (int k = 1; k < p; ++k) {
    const D4 wk = -al * B * rho_c[k - 1] / rks[k - 1];
    corr[2 + k] = corr[2 + k] + wk;
    corr[2] = corr[2] - wk;
  }
  const D4 wn = -al * B * rho_c[p - 1];  // coefficient of (D_i - m_0)
  corr[1] = corr[1] + wn;
  corr[2] = corr[2] - wn;
}

LD3_HD void ipndm_row(const Window& w, int p, D4 row[kTableWidth]) {
  // Adams-Bashforth weights, newest first
  const double W[4][4] = {{1.0, 0.0, 0.0, 0.0},
                          {3.0 / 2.0, -1.0 / 2.0, 0.0, 0.0},
                          {23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0, 0.0},
                          {55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0}};
  const D4 h = w.lam[3] - w.lam[2];
  row[0] = exp(w.log_alpha[3] - w.log_alpha[2]);
  // -sigma_i (e^h - 1) = sigma_i - a sigma_{i-1}: above h = ln 2 the difference (whose derivatives do not cancel
  // two e^h terms), below it expm1 (whose value does not cancel); as ld3_ext/coefficients.py
  const D4 scale = h.v > 0.6931471805599453 ? w.sigma[3] - row[0] * w.sigma[2] : -w.sigma[3] * expm1(h);
  for (int k = 0; k < kMaxHistory; ++k) row[1 + k] = k < p ? scale * D4(W[p - 1][k]) : D4(0.0);
}

// Rows of step i (1-based) of an n-step solve on t[0..n].  Writes table[2][5] and
// jac[2][5][4] = d table / d t_{i-3+j} (zero where i-3+j < 0).
LD3_HD void step_coefficients(const ScheduleParams& sched, const SolverParams& sp, const double* t, int i, int n,
                              double* table, double* jac) {
  Window w;
  for (int j = 0; j < kWindow; ++j) {
    const int idx = i - 3 + j;
    // points before t_0 are never read by a step of order <= i; t_0 keeps them finite
    const D4 tj = idx >= 0 ? D4::seeded(t[idx], j) : D4(t[0]);
    schedule_log_alpha_sigma(sched, tj, w.log_alpha[j], w.log_sigma[j]);
    w.lam[j] = w.log_alpha[j] - w.log_sigma[j];
    w.alpha[j] = exp(w.log_alpha[j]);
    w.sigma[j] = exp(w.log_sigma[j]);
  }
  const int p = step_order(sp, i, n);
  D4 rows[2][kTableWidth];
  for (int c = 0; c < kTableWidth; ++c) rows[1][c] = D4(0.0);
  if (sp.solver == kDPMpp || sp.solver == kEuler) {
    dpmpp_row(w, p, sp.heun, rows[0]);
  } else if (sp.solver == kUniPC) {
    unipc_rows(w, p, sp.bh2, sp.use_corrector && i < n, rows[0], rows[1]);
  } else {
    ipndm_row(w, p, rows[0]);
  }
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < kTableWidth; ++c) {
      const D4& v = rows[r][c];
      table[r * kTableWidth + c] = v.v;
      for (int j = 0; j < kWindow; ++j) jac[(r * kTableWidth + c) * kWindow + j] = v.d[j];
    }
}

// d L / d t_k = sum over the rows that read t_k (steps i = k..k+3, window slot j = k+2-(i-1)) of
// J[i-1, :, :, j] . g[i-1, :, :].  A gather, so every t_k is summed in a fixed order on any device.
LD3_HD double timestep_grad(const double* jac, const double* grad_table, int k, int n) {
  constexpr int kRow = 2 * kTableWidth;
  double acc = 0.0;
  const int r_lo = k - 1 > 0 ? k - 1 : 0;
  const int r_hi = k + 2 < n - 1 ? k + 2 : n - 1;
  for (int r = r_lo; r <= r_hi; ++r) {
    const int j = k + 2 - r;
    for (int e = 0; e < kRow; ++e) acc += jac[(r * kRow + e) * kWindow + j] * grad_table[r * kRow + e];
  }
  return acc;
}

}  // namespace ld3
