"""The well-posedness regions compared in the paper, and cvxpy formulations of their projections.

| region | set | shape | from |
| NEMON | mu_inf(A) <= gamma < 1 | polytope | Jafarpour et al. 2021 |
| norm | ||A||_inf <= gamma < 1 | polytope inside NEMON's | El Ghaoui et al. (implicit deep learning) |
| Perron-Frobenius | rho(|A|) < 1 | non-convex | El Ghaoui et al. |
| monDEQ | mu_2(A) <= 1 - m | spectrahedron | Winston & Kolter 2020 |
| weighted NEMON | min_eta mu_inf,eta(A) = alpha(Metzler majorant) <= gamma | non-convex | DESIGN.md |

Exact well-posedness of x = relu(Ax + q) for every q is the uniqueness of the solution of the
linear complementarity problem LCP(-q, I - A), i.e. I - A is a P-matrix (every principal
minor positive; Cottle, Pang & Stone, Thm. 3.3.7): :func:`is_well_posed_exact` checks it by
enumeration for small n. Every certificate above is sufficient, none necessary.

Frobenius projections as convex programs (oracles for the closed forms of
:mod:`nemon_np.projection`):

    minimize 1/2 ||X||_F^2 - <A, X>   subject to   X in the set,

whose solution is the projection of A. At cvxpy's default tolerances a solver
is about 1e-4 off; interior-point Clarabel at 1e-12 and tighter is within 1e-6 only
sometimes and fails on others. OSQP with solution polishing (an active-set refinement
of the ADMM solution) is exact to rounding when polishing succeeds; on degenerate active sets
(entries soft-thresholded to exactly zero) polishing can fail, and the oracle then solves again
with Clarabel and returns only if the two independent solvers agree to 1e-7.
"""
import cvxpy as cp
import numpy as np

from ._validation import as_square_matrix, as_weights

__all__ = ["project_mu_inf_cvxpy", "project_norm_inf_cvxpy", "project_mondeq_cvxpy", "SolverFailure",
           "REGIONS", "region_measures", "is_well_posed_exact", "spectral_radius_abs"]

REGIONS = ("nemon", "weighted", "norm", "perron-frobenius", "mondeq")

POLISHED_OSQP = dict(eps_abs=1e-12, eps_rel=1e-12, polishing=True, max_iter=200_000)


class SolverFailure(RuntimeError):
    """cvxpy's solver did not return an optimal solution."""


def _solve_once(problem, variable, solver, options):
    try:
        problem.solve(solver=solver, verbose=False, **options)
    except cp.error.SolverError as e:
        raise SolverFailure(f"{solver} failed: {e}") from None
    if problem.status != cp.OPTIMAL:
        raise SolverFailure(f"{solver} ended with status {problem.status!r}, not optimal")
    return variable.value


def _solve(problem, variable, solver, options):
    value = _solve_once(problem, variable, solver, options)
    if not options.get("polishing"):
        return value
    extra = problem.solver_stats.extra_stats
    # OSQP's polish status: 1 polished, 2 not needed (no constraint active), else failed.
    if getattr(getattr(extra, "info", None), "status_polish", 1) in (1, 2):
        return value
    second = _solve_once(problem, variable, cp.CLARABEL, dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12))
    gap = float(np.abs(value - second).max())
    if gap > 1e-7:
        raise SolverFailure(f"{solver} polishing failed and Clarabel disagrees with it by {gap:.2e}")
    return value


def _project(A, constraint, solver, solver_options):
    A = as_square_matrix(A).astype(np.float64)
    X = cp.Variable(A.shape)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(X) - cp.sum(cp.multiply(A, X))), constraint(X))
    options = POLISHED_OSQP if (solver_options is None and solver == cp.OSQP) else (solver_options or {})
    return _solve(problem, X, solver, options)


def project_norm_inf_cvxpy(A, gamma, solver=cp.OSQP, solver_options=None):
    """Frobenius projection onto {||A||_inf <= gamma} by cvxpy (QP, polished OSQP by default)."""
    return _project(A, lambda X: [cp.sum(cp.abs(X), axis=1) <= gamma], solver, solver_options)


TIGHT_CLARABEL = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)


def project_mondeq_cvxpy(A, m, solver=cp.CLARABEL, solver_options=None):
    """Frobenius projection onto {(A + A^T)/2 <= (1 - m) I} by cvxpy (SDP, Clarabel at 1e-10)."""
    n = np.shape(A)[0]
    options = TIGHT_CLARABEL if (solver_options is None and solver == cp.CLARABEL) else solver_options
    return _project(A, lambda X: [0.5 * (X + X.T) << (1 - m) * np.eye(n)], solver, options)


def spectral_radius_abs(A):
    """rho(|A|), the Perron-Frobenius certificate's quantity."""
    return float(np.abs(np.linalg.eigvals(np.abs(np.asarray(A, np.float64)))).max())


def region_measures(A):
    """The quantity each region bounds, for one matrix: dict region -> value.

    nemon: mu_inf(A); weighted: min over weights of mu_inf,eta(A); norm: ||A||_inf;
    perron-frobenius: rho(|A|); mondeq: mu_2(A). A matrix is certified well-posed by a
    region's condition when its value is < 1 (for monDEQ: 1 - m with margin m > 0).
    """
    from .measures import best_weights, mu_2, mu_inf, norm_inf
    return {"nemon": mu_inf(A), "weighted": best_weights(A)[1], "norm": norm_inf(A),
            "perron-frobenius": spectral_radius_abs(A), "mondeq": mu_2(A)}


def is_well_posed_exact(A, max_n=14):
    """True iff I - A is a P-matrix (all 2^n - 1 principal minors > 0): x = relu(Ax + q)
    then has exactly one solution for every q. Exponential: refused above ``max_n``."""
    A = as_square_matrix(A).astype(np.float64)
    n = A.shape[0]
    if n > max_n:
        raise ValueError(f"exact well-posedness enumerates 2^n principal minors; n = {n} > max_n = {max_n}")
    M = np.eye(n) - A
    for mask in range(1, 2 ** n):
        idx = [i for i in range(n) if mask >> i & 1]
        if np.linalg.det(M[np.ix_(idx, idx)]) <= 0:
            return False
    return True


def project_mu_inf_cvxpy(A, gamma, weights=None, solver=cp.OSQP, solver_options=None, min_diagonal=None):
    """Frobenius projection onto {mu_inf,eta(A) <= gamma} (and diag(A) >= min_diagonal when given)
    by cvxpy (QP); float64 result.

    ``solver_options`` default to polished OSQP at 1e-12 (``POLISHED_OSQP``) for OSQP.
    Raises :class:`SolverFailure` when the solver does not report an optimal solution.
    """
    n = np.shape(A)[0]
    eta = as_weights(weights, n)
    W = np.ones((n, n)) if eta is None else eta[None, :] / eta[:, None]
    np.fill_diagonal(W, 0.0)

    def constraints(X):
        rows = [cp.diag(X) + cp.sum(cp.abs(cp.multiply(W, X)), axis=1) <= gamma]
        return rows if min_diagonal is None else rows + [cp.diag(X) >= min_diagonal]
    return _project(A, constraints, solver, solver_options)
