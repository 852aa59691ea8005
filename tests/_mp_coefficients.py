"""An mpmath oracle of the solver coefficient table: LD3.md section 2's formulas, transcribed on their own and
evaluated with 80 significant digits, so the cancellations of phi_1/h + 1, g_k/h - 1/(k+1)! ... that float64 must
avoid cost nothing here (at h = 1e-9 the deepest recursion loses 4 x 9 = 36 digits and keeps 44).

Rows follow ld3_ext.coefficients' layout: row 0 = [a, b_0..b_3] (b_k multiplies the output of grid point i-1-k),
row 1 = UniPC corrector [a, c_0..c_3] (c_0 multiplies the new output D_i, c_k that of grid point i-k)."""
from __future__ import annotations

import mpmath as mp

DPS = 80

#: (log alpha(t), log sigma(t)) in mpmath for the closed-form schedules the tests use
SCHEDULES = {
    "edm": lambda t: (mp.mpf(0), mp.log(t)),
    "flow_matching": lambda t: (mp.log(1 - t), mp.log(t)),
}


def _orders(kind, order, lower_order_final, n):
    out = []
    for i in range(1, n + 1):
        p = min(i, order)
        if lower_order_final and kind != "euler":
            p = min(p, n + 1 - i)
        out.append(p)
    return out


def _step_rows(kind, p, lam, alpha, sigma, i, solver_type="midpoint", variant="bh1", corrector=False):
    zero = mp.mpf(0)
    h = lam[i] - lam[i - 1]
    main, corr = [zero] * 5, [zero] * 5
    if kind in ("dpmpp", "euler"):
        phi1 = mp.expm1(-h)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - mp.mpf(1) / 2
        main[0] = sigma[i] / sigma[i - 1]
        main[1] = -alpha[i] * phi1
        if p == 2:
            r0 = (lam[i - 1] - lam[i - 2]) / h
            if solver_type == "midpoint":  # - 1/2 alpha phi1 (D_{i-1} - D_{i-2}) / r0
                main[1] += -alpha[i] * phi1 / (2 * r0)
                main[2] = alpha[i] * phi1 / (2 * r0)
            else:  # + alpha phi2 (D_{i-1} - D_{i-2}) / r0
                main[1] += alpha[i] * phi2 / r0
                main[2] = -alpha[i] * phi2 / r0
        elif p == 3:
            r0 = (lam[i - 1] - lam[i - 2]) / h
            r1 = (lam[i - 2] - lam[i - 3]) / h
            # D1_0, D1_1 as weights over (D_{i-1}, D_{i-2}, D_{i-3})
            d10 = [1 / r0, -1 / r0, zero]
            d11 = [zero, 1 / r1, -1 / r1]
            d1 = [u + r0 / (r0 + r1) * (u - v) for u, v in zip(d10, d11)]
            d2 = [(u - v) / (r0 + r1) for u, v in zip(d10, d11)]
            for k in range(3):
                main[1 + k] += alpha[i] * phi2 * d1[k] - alpha[i] * phi3 * d2[k]
        return main, corr
    if kind == "ipndm":
        weights = {1: [1], 2: [mp.mpf(3) / 2, -mp.mpf(1) / 2], 3: [mp.mpf(23) / 12, -mp.mpf(16) / 12, mp.mpf(5) / 12],
                   4: [mp.mpf(55) / 24, -mp.mpf(59) / 24, mp.mpf(37) / 24, -mp.mpf(9) / 24]}[p]
        main[0] = alpha[i] / alpha[i - 1]
        scale = -sigma[i] * mp.expm1(h)
        for k, w in enumerate(weights):
            main[1 + k] = scale * w
        return main, corr
    # UniPC, data prediction
    hh = -h
    phibar = mp.expm1(hh)
    B = hh if variant == "bh1" else phibar
    r = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)] + [mp.mpf(1)]
    g = phibar / hh - 1
    b = []
    for k in range(1, p + 1):
        b.append(g * mp.factorial(k) / B)
        g = g / hh - 1 / mp.factorial(k + 1)
    main[0] = sigma[i] / sigma[i - 1]
    main[1] = -alpha[i] * phibar
    if p >= 2:
        rho = [mp.mpf(1) / 2] if p == 2 else list(mp.lu_solve(
            mp.matrix([[r[j] ** row for j in range(p - 1)] for row in range(p - 1)]), mp.matrix(b[: p - 1])))
        for k in range(1, p):  # - alpha B rho_k (m_k - m_0) / r_k
            w = -alpha[i] * B * rho[k - 1] / r[k - 1]
            main[1 + k] += w
            main[1] -= w
    if corrector:
        rho = [mp.mpf(1) / 2] if p == 1 else list(mp.lu_solve(
            mp.matrix([[r[j] ** row for j in range(p)] for row in range(p)]), mp.matrix(b)))
        corr[0] = main[0]
        corr[2] = -alpha[i] * phibar
        for k in range(1, p):
            w = -alpha[i] * B * rho[k - 1] / r[k - 1]
            corr[2 + k] += w
            corr[2] -= w
        w = -alpha[i] * B * rho[p - 1]  # on (D_i - m_0)
        corr[1] += w
        corr[2] -= w
    return main, corr


def table(schedule, t, kind, order, lower_order_final=True, solver_type="midpoint", variant="bh1",
          use_corrector=True):
    """The [N][2][5] table (mpf) on the grid t (a list of numbers, exact as given)."""
    with mp.workdps(DPS):
        t = [mp.mpf(v) for v in t]
        n = len(t) - 1
        la_ls = [SCHEDULES[schedule](v) for v in t]
        lam = [la - ls for la, ls in la_ls]
        alpha = [mp.exp(la) for la, _ in la_ls]
        sigma = [mp.exp(ls) for _, ls in la_ls]
        out = []
        for i, p in enumerate(_orders(kind, order, lower_order_final, n), start=1):
            corrector = kind == "unipc" and use_corrector and i < n
            out.append(_step_rows(kind, p, lam, alpha, sigma, i, solver_type, variant, corrector))
        return [[[+v for v in row] for row in step] for step in out]


def jacobian(schedule, t, j, **spec):
    """d table / d t_j ([N][2][5] mpf): a central difference with step 1e-30 at 80 digits (truncation ~1e-60,
    rounding ~1e-50 relative: exact for any float64 comparison)."""
    with mp.workdps(DPS):
        eps = mp.mpf("1e-30")
        up, down = [mp.mpf(v) for v in t], [mp.mpf(v) for v in t]
        up[j] += eps
        down[j] -= eps
        hi, lo = table(schedule, up, **spec), table(schedule, down, **spec)
        return [[[(a - b) / (2 * eps) for a, b in zip(ra, rb)] for ra, rb in zip(sa, sb)] for sa, sb in zip(hi, lo)]
