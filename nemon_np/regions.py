"""cvxpy formulations of the well-posedness regions (oracles for the closed forms).

The NEMON polytope P(gamma) = {A : a_ii + sum_{j!=i} w_ij |a_ij| <= gamma} (w_ij =
eta_j / eta_i, DESIGN.md) and its Frobenius projection as a quadratic program:

    minimize 1/2 ||X||_F^2 - <A, X>   subject to   X in P(gamma),

which has the projection of A as its solution. At cvxpy's default tolerances a solver
is about 1e-4 off; interior-point Clarabel at 1e-12 and tighter is within 1e-6 only
sometimes and fails on others. OSQP with solution polishing (an active-set refinement
of the ADMM solution) is exact to rounding, and the oracle insists that polishing succeeded.
"""
import cvxpy as cp
import numpy as np

from ._validation import as_square_matrix, as_weights

__all__ = ["project_mu_inf_cvxpy", "SolverFailure"]

POLISHED_OSQP = dict(eps_abs=1e-12, eps_rel=1e-12, polishing=True, max_iter=200_000)


class SolverFailure(RuntimeError):
    """cvxpy's solver did not return an optimal solution."""


def _solve(problem, variable, solver, options):
    try:
        problem.solve(solver=solver, verbose=False, **options)
    except cp.error.SolverError as e:
        raise SolverFailure(f"{solver} failed: {e}") from None
    if problem.status != cp.OPTIMAL:
        raise SolverFailure(f"{solver} ended with status {problem.status!r}, not optimal")
    if options.get("polishing"):
        extra = problem.solver_stats.extra_stats
        # OSQP's polish status: 1 polished, 2 not needed (no constraint active), else failed.
        if getattr(getattr(extra, "info", None), "status_polish", 1) not in (1, 2):
            raise SolverFailure(f"{solver} solution polishing failed: the result is only accurate "
                                f"to its tolerance eps_abs={options.get('eps_abs')}")
    return variable.value


def project_mu_inf_cvxpy(A, gamma, weights=None, solver=cp.OSQP, solver_options=None):
    """Frobenius projection onto {mu_inf,eta(A) <= gamma} by cvxpy (QP); float64 result.

    ``solver_options`` default to polished OSQP at 1e-12 (``POLISHED_OSQP``) for OSQP.
    Raises :class:`SolverFailure` when the solver does not report an optimal solution.
    """
    A = as_square_matrix(A).astype(np.float64)
    n = A.shape[0]
    eta = as_weights(weights, n)
    W = np.ones((n, n)) if eta is None else eta[None, :] / eta[:, None]
    np.fill_diagonal(W, 0.0)
    X = cp.Variable((n, n))
    rows = cp.diag(X) + cp.sum(cp.abs(cp.multiply(W, X)), axis=1)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(X) - cp.sum(cp.multiply(A, X))),
                         [rows <= gamma])
    options = POLISHED_OSQP if (solver_options is None and solver == cp.OSQP) else (solver_options or {})
    return _solve(problem, X, solver, options)
