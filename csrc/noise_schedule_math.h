// Closed-form noise schedules on forward-mode dual numbers, for host and device.
//
// One formula gives both the value and its exact derivatives: the coefficient code seeds one
// derivative slot per timestep it reads, so the Jacobian needs no hand-derived expressions that
// could drift from the values.  Mirrors ld3_ext/schedules.py (kind ids KIND_*).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LD3_HD __host__ __device__ inline
#else
#define LD3_HD inline
#endif

namespace ld3 {

// Value plus N partial derivatives.  Operators are hidden friends so that a plain double
// converts implicitly on either side.
template <typename T, int N>
struct Dual {
  T v;
  T d[N];

  LD3_HD Dual() : v(T(0)) {
    for (int k = 0; k < N; ++k) d[k] = T(0);
  }
  LD3_HD Dual(T x) : v(x) {  // NOLINT: implicit on purpose (constants)
    for (int k = 0; k < N; ++k) d[k] = T(0);
  }
  LD3_HD static Dual seeded(T x, int slot) {
    Dual r(x);
    if (slot >= 0 && slot < N) r.d[slot] = T(1);
    return r;
  }
  // chain rule helper: f(this) with f'(this) = df
  LD3_HD Dual chain(T fv, T df) const {
    Dual r(fv);
    for (int k = 0; k < N; ++k) r.d[k] = df * d[k];
    return r;
  }

  friend LD3_HD Dual operator+(const Dual& a, const Dual& b) {
    Dual r(a.v + b.v);
    for (int k = 0; k < N; ++k) r.d[k] = a.d[k] + b.d[k];
    return r;
  }
  friend LD3_HD Dual operator-(const Dual& a, const Dual& b) {
    Dual r(a.v - b.v);
    for (int k = 0; k < N; ++k) r.d[k] = a.d[k] - b.d[k];
    return r;
  }
  friend LD3_HD Dual operator-(const Dual& a) {
    Dual r(-a.v);
    for (int k = 0; k < N; ++k) r.d[k] = -a.d[k];
    return r;
  }
  friend LD3_HD Dual operator*(const Dual& a, const Dual& b) {
    Dual r(a.v * b.v);
    for (int k = 0; k < N; ++k) r.d[k] = a.d[k] * b.v + a.v * b.d[k];
    return r;
  }
  friend LD3_HD Dual operator/(const Dual& a, const Dual& b) {
    const T q = a.v / b.v;
    Dual r(q);
    for (int k = 0; k < N; ++k) r.d[k] = (a.d[k] - q * b.d[k]) / b.v;
    return r;
  }
  LD3_HD Dual& operator+=(const Dual& b) { return *this = *this + b; }
  LD3_HD Dual& operator-=(const Dual& b) { return *this = *this - b; }
};

template <typename T, int N>
LD3_HD Dual<T, N> exp(const Dual<T, N>& a) {
  const T e = ::exp(a.v);
  return a.chain(e, e);
}
template <typename T, int N>
LD3_HD Dual<T, N> expm1(const Dual<T, N>& a) {
  return a.chain(::expm1(a.v), ::exp(a.v));
}
template <typename T, int N>
LD3_HD Dual<T, N> log(const Dual<T, N>& a) {
  return a.chain(::log(a.v), T(1) / a.v);
}
template <typename T, int N>
LD3_HD Dual<T, N> log1p(const Dual<T, N>& a) {
  return a.chain(::log1p(a.v), T(1) / (T(1) + a.v));
}
template <typename T, int N>
LD3_HD Dual<T, N> cos(const Dual<T, N>& a) {
  return a.chain(::cos(a.v), -::sin(a.v));
}
template <typename T, int N>
LD3_HD Dual<T, N> sin(const Dual<T, N>& a) {
  return a.chain(::sin(a.v), ::cos(a.v));
}
// log(1 - exp(x)) for x <= 0 without cancellation (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x))
// below -ln 2, where 1 - exp(x) rounds towards 1 and log of it loses its relative precision.
// Same switch as schedules._log1mexp.
template <typename T, int N>
LD3_HD Dual<T, N> log1mexp(const Dual<T, N>& a) {
  const T kLn2 = T(0.6931471805599453);  // math.log(2.0)
  return a.v > -kLn2 ? log(-expm1(a)) : log1p(-exp(a));
}

enum ScheduleKind : int { kEDM = 0, kVPLinear = 1, kVPCosine = 2, kFlow = 3 };

struct ScheduleParams {
  int kind;
  double p0;  // VPLinear: beta_min; VPCosine: s
  double p1;  // VPLinear: beta_max
};

// log alpha(t) and log sigma(t); same operation order as schedules.py.
template <typename S>
LD3_HD void schedule_log_alpha_sigma(const ScheduleParams& sp, const S& t, S& log_alpha, S& log_sigma) {
  const double kHalfPi = 1.5707963267948966;  // math.pi / 2.0
  switch (sp.kind) {
    case kEDM:
      log_alpha = S(0.0);
      log_sigma = log(t);
      break;
    case kVPLinear: {
      const double b0 = sp.p0, b1 = sp.p1;
      log_alpha = S(-0.25) * t * t * S(b1 - b0) - S(0.5) * t * S(b0);
      // sigma^2 = 1 - alpha^2: precise at both ends
      log_sigma = S(0.5) * log1mexp(S(2.0) * log_alpha);
      break;
    }
    case kVPCosine: {
      // alpha = cos(theta0 + t c) / cos(theta0), c = (pi/2)/(1 + s), theta0 = s c; a branch without
      // cancellation at each end (see VPCosine.log_alpha): 1 - 2 sin^2(d/2) - tan(theta0) sin(d) with
      // d = t c through log1p for t < 1/2, cos(theta) = sin((1 - t) c) above.
      const double s = sp.p0;
      const double c = kHalfPi / (1.0 + s);
      const double theta0 = s * c;
      if (t.v < 0.5) {
        const S d = t * S(c);
        const S h = sin(S(0.5) * d);
        log_alpha = log1p(S(-2.0) * (h * h) - S(::tan(theta0)) * sin(d));
      } else {
        log_alpha = log(sin((S(1.0) - t) * S(c))) - S(::log(::cos(theta0)));
      }
      log_sigma = S(0.5) * log1mexp(S(2.0) * log_alpha);
      break;
    }
    default:  // kFlow
      log_alpha = log1p(-t);
      log_sigma = log(t);
      break;
  }
}

// lambda(t) = log alpha(t) - log sigma(t) as every table step computes it (the grid check reads these values).
LD3_HD double schedule_lambda(const ScheduleParams& sp, double t) {
  Dual<double, 1> log_alpha, log_sigma;
  schedule_log_alpha_sigma(sp, Dual<double, 1>(t), log_alpha, log_sigma);
  return (log_alpha - log_sigma).v;
}

}  // namespace ld3
