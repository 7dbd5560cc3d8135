"""Training NEMON classifiers: constraint modes, the minibatch loop, evaluation, run outputs.

Three ways to keep the model well-posed (DESIGN.md, "Keeping mu_inf(A) <= gamma"):

* ``projection``: Adam on A, then the exact projection onto mu_inf(A) <= gamma;
* ``parametrization``: Adam on T with A = gamma I + T - diag(|T| 1) (the paper's code);
* ``weighted``: Adam on T and log-scales s with A = gamma I + D^-1 T D - diag(|T| 1),
  D = diag(exp(s)): mu_inf(A) <= gamma in the weighted norm with learned weights
  eta = exp(-s), the search space of the paper's own trained models.

For comparisons (``analysis/compare_regions.py``): ``norm`` projects onto ||A||_inf <= gamma,
``mondeq`` onto mu_2(A) <= gamma (monDEQ's condition with margin m = 1 - gamma; it needs a
monDEQ splitting and the direct adjoint) and ``none`` trains A freely (the solver then only
warns when no certificate holds, and the fraction of converged solves is recorded).

The loss is the mean softmax cross-entropy, plus ``lipschitz_reg`` times the
l_inf Lipschitz bound ||C|| ||B|| / (1 - max(mu_inf(A), 0)) when asked.
"""
import csv
import io
import json
import math
import os
import pathlib
import threading
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ._threads import check_n_jobs
from ._validation import as_float_dtype, check_gamma, check_readout_hidden
from .constraints import constraint_names, get_constraint
from .conv import PADDINGS
from .conv_model import ConvNEMON, check_conv_solver
from .data import AUGMENT_PAD, AUGMENTATIONS
from .decided import STOP_RULES, decided_labels
from .measures import mu_inf
from .losses import softmax_cross_entropy
from .loading import load_model
from .models import NEMON
from .stack import WEIGHT_INITS, StackedClassifier, parse_architecture
from .optim import SCHEDULES, Adam, learning_rate
from .pixels import channel_stats, input_ball
from .certificates import certified_rows
from .lipschitz import lipschitz_bound, lipschitz_bound_and_grad, smooth_lipschitz_bound_and_grad
from .solvers import ADJOINT_METHODS, FORWARD_METHODS, MONDEQ_METHODS, TOL_MODES
from .warm_starts import WarmStarts

__all__ = ["TrainConfig", "CONSTRAINTS", "Trainer", "build_model", "evaluate", "write_metrics", "plot_history",
           "save_training_state", "restore_training_state", "training_state", "resume_point", "copied_into",
           "BackgroundCheckpoints"]

MODELS = ("nemon", "mondeq", "conv", "stack")

# Measured on nemon-medium with --weight-init ibp and no batch normalization: the four convolutions
# shrink the injection to 7e-5, under the absolute tolerance, and the run stayed at chance.
DEAD_IMPLICIT_LAYER = ("every forward solve of the implicit layer stopped at its zero start this epoch: its input is "
                       "below the tolerance ({tol:g}) for every sample, so it outputs zeros and passes no gradient to "
                       "the layers before it (deep stacks with --weight-init ibp and no batch normalization do this; "
                       "try --weight-init default, bn layers, or a smaller --tol)")

# The --constraint choices: the modes of the dense model (the conv model's are among them).
CONSTRAINTS = constraint_names("nemon")
# Model kinds whose constraint is fixed by the model itself (``constraint`` does not apply).
MODEL_CONSTRAINT = {"mondeq": "mondeq-parametrization"}
# The constraint modes of a stack are those of its implicit layer's kind (a dense NEMON layer).
CONSTRAINT_KIND = {"stack": "nemon"}
# Settings left None take the model's defaults. Conv models: an iteration costs C^2 k^2 flops a
# pixel, so a looser tolerance and a smaller gamma (faster contraction) keep an epoch to minutes. Their
# tolerance is the paper's (1e-2 relative, per sample here): against 1e-3 absolute it halved the forward
# iterations (6 against 12 a sample) at the same test accuracy over 10 epochs, 2 seeds, and changed 3
# of 10,000 test predictions of a fixed point solved to 1e-6 (docs/benchmarks.md, "The conv tolerance").
# Certified (IBP-style) training, eps_warmup and eps_ramp: epochs of clean training, then epochs over
# which eps rises linearly to its training value while kappa falls (Gowal et al. 2018).
_COMMON = dict(tol_mode="absolute", warm_start=False)
MODEL_DEFAULTS = {"nemon": dict(_COMMON, hidden=100, epochs=40, lr=1e-3, gamma=0.95, tol=1e-4, eps_warmup=1,
                                eps_ramp=10),
                  "mondeq": dict(_COMMON, hidden=100, epochs=40, lr=1e-3, gamma=0.95, tol=1e-4, eps_warmup=1,
                                 eps_ramp=10),
                  "conv": dict(_COMMON, epochs=10, lr=5e-3, gamma=0.9, tol=1e-2, tol_mode="relative", eps_warmup=1,
                               eps_ramp=4),
                  "stack": dict(_COMMON, epochs=20, lr=1e-3, gamma=0.5, tol=1e-4, eps_warmup=1, eps_ramp=10)}
# With certified training these come first. gamma 0.5: dense MNIST models certified as many points as
# at 0.95 (82.0% at eps 0.1 both) with 30% fewer iterations; training at 1.2 eps certified 85.8% at
# eps, against 84.2% at eps itself (docs/benchmarks.md, "Interval certificates"). Dense: n = 200 certifies
# about 1.5 points more than 100 (85.0 against 83.5% by intervals), the diagonal floor 0 keeps alpha* = 1,
# so that the forward iterations stay near 12-14 a sample where they grew to 40 without it, and the
# relative tolerance cut them to 9 at the same certified accuracy (docs/benchmarks.md, "Training at the
# speed limit"); warm starts cut its forward and embedded iterations from 9.5 and 10 to 1.3 a sample by the
# last epoch and its CPU seconds by 10%, at the same certified accuracy (docs/benchmarks.md, "Warm starts").
CERTIFIED_DEFAULTS = {"nemon": dict(gamma=0.5, train_eps_factor=1.2, hidden=200, min_diagonal=0.0,
                                    tol_mode="relative", warm_start=True),
                      "conv": dict(gamma=0.5, train_eps_factor=1.2, tol=1e-3, tol_mode="absolute"),
                      # Shi et al.'s warm-up regularizers won where measured (docs/benchmarks.md: +4.6 points of
                      # crown on the small stack and +1.25 on the medium one at MNIST 0.3, +0.3 at 0.1, 2 seeds).
                      "stack": dict(train_eps_factor=1.2, warmup_reg=0.5)}
LIPSCHITZ_FORMS = ("exact", "smooth")
# Settings that shape the architecture of these model kinds alone: another kind would ignore them (a stack's
# layers come from arch), so a value other than the default given with it is an error, not a silent no-op.
ARCHITECTURE_SETTINGS = {"hidden": ("nemon", "mondeq"), "channels": ("conv",), "kernel": ("conv",), "pool": ("conv",),
                         "padding": ("conv",), "readout_hidden": ("nemon", "mondeq", "conv")}


@dataclass
class TrainConfig:
    """Every setting of a training run (the CLI flags, the estimator's parameters).

    ``model="mondeq"`` is the monDEQ baseline: A = (1 - m) I - W^T W + S - S^T with m = 1 - gamma,
    solved by Peaceman-Rachford with the direct adjoint (``solver``/``adjoint`` None pick the
    model's defaults); ``constraint`` then does not apply.
    ``model="conv"`` is :class:`nemon_np.ConvNEMON` (``channels``, ``kernel``, ``pool``, ``padding``),
    with the projection or parametrization constraint on its kernel.
    ``model="stack"`` is :class:`nemon_np.stack.StackedClassifier` with the layers of ``arch`` (a
    preset of :data:`nemon_np.stack.PRESETS` or comma-separated layers; giving ``arch`` selects the
    stack); ``constraint`` acts on its implicit layer (none for an explicit stack).
    A setting of :data:`ARCHITECTURE_SETTINGS` given to a model it does not shape (``hidden`` to a conv
    model or a stack, say) is an error: the model would ignore it.
    ``readout_hidden`` > 0 puts an explicit hidden ReLU layer of that width into either model's
    read-out, ``y = C relu(H f + h) + c`` (:mod:`nemon_np.readout`); 0 is the paper's linear read-out.
    ``augment`` transforms each training batch (:data:`nemon_np.data.AUGMENTATIONS`): "crop-flip"
    (random crops, padding 4, and horizontal flips: CIFAR-10's standard) or "shift" (translations
    by up to 2 pixels, no flips: for digits); True and False are read as "crop-flip" and "none".
    ``augment_pad`` is that padding or largest shift in pixels; None takes :data:`nemon_np.data.AUGMENT_PAD`.
    ``init`` names a saved model (``model.npz`` or its run folder) to start from instead of a
    random initialization; its architecture, gamma and dtype must match the config's.
    ``hidden``, ``epochs``, ``lr``, ``gamma`` and ``tol`` left None take the model's :data:`MODEL_DEFAULTS`.
    ``blas_threads`` caps the BLAS threads while training (threadpoolctl; None leaves them alone): the
    products here are small, and on 2-core machines OpenBLAS's threads made a dense training step
    14x and a conv step 1.3x slower than one thread (docs/benchmarks.md). ``threads`` is a conv
    model's or a stack's own threads instead (:attr:`nemon_np.ConvNEMON.n_jobs`,
    :attr:`nemon_np.stack.StackedClassifier.n_jobs`): each takes a share of a batch's rows (a stack's:
    of its convolutions' image blocks) with one-thread BLAS; the model trained is the same up to float
    rounding.
    ``certified_eps`` > 0 (pixel units) trains on ``kappa CE(y) + (1 - kappa) CE(-m_lo)``, m_lo the
    interval lower bounds of the margins over the eps-ball of each training image
    (:meth:`nemon_np.base.ImplicitClassifier.certified_loss_and_grad`): ``eps_warmup`` epochs clean,
    then eps rises linearly to ``train_eps_factor`` x certified_eps and kappa falls linearly from 1 to
    ``kappa`` over ``eps_ramp`` epochs (:meth:`certified_schedule`); each epoch's metrics then hold
    the certified accuracy at certified_eps of the first ``certify_samples`` test images. Settings
    left None take :data:`CERTIFIED_DEFAULTS` first when certified_eps > 0. ``warmup_reg`` > 0 (stacked
    models) adds Shi et al. 2021's warm-up regularizers with weight warmup_reg (1 - eps / eps_max) while
    eps ramps up (:mod:`nemon_np.warmup`; their value 0.5, the default of a stack's certified training,
    else 0); ``grad_clip`` > 0 scales each step's
    gradient down to that Euclidean norm when it is larger (their value 10); 0 turns either off.
    ``crown_ibp`` = beta_0 > 0 (stacked models) trains on CROWN-IBP's margins (Zhang et al. 2020)
    (1 - beta) m_IBP + beta m_CROWN, beta falling linearly from beta_0 to 0 over the eps ramp (their
    "1 -> 0" schedule at beta_0 = 1; :meth:`crown_ibp_weight`), after which the loss is IBP's.
    ``warm_start`` (dense nemon models; on by default with certified training) starts each sample's forward
    and embedded solves where its solves of the previous epoch ended (:class:`nemon_np.warm_starts.WarmStarts`,
    kept in the training state so that a resumed run matches one that went through).
    """
    model: str = "nemon"
    arch: str = None
    weight_init: str = "default"
    hidden: int = None
    channels: int = 32
    kernel: int = 3
    pool: int = 4
    padding: str = "circular"
    readout_hidden: int = 0
    augment: str = "none"
    augment_pad: int = None
    epochs: int = None
    batch_size: int = 100
    lr: float = None
    schedule: str = "cosine"
    gamma: float = None
    constraint: str = "projection"
    min_diagonal: float = None
    lipschitz_reg: float = 0.0
    lipschitz_form: str = "exact"
    solver: str = None
    alpha: float = None
    tol: float = None
    tol_mode: str = None
    adjoint_tol: float = None
    max_iter: int = 300
    adjoint: str = None
    dtype: str = "float32"
    seed: int = 0
    init: str = None
    certified_eps: float = 0.0
    eps_warmup: float = None
    eps_ramp: float = None
    kappa: float = 0.5
    train_eps_factor: float = None
    certify_samples: int = 1000
    warmup_reg: float = None
    grad_clip: float = 0.0
    crown_ibp: float = 0.0
    warm_start: bool = None
    blas_threads: int = 1
    threads: int = 1

    def validate(self):
        """Resolve the model's default solvers; raise ``ValueError`` with a one-line message
        for the first bad setting."""
        if self.arch is not None and self.model == "nemon":
            self.model = "stack"
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if (self.model == "stack") != (self.arch is not None):
            raise ValueError(f"arch goes with model stack (and selects it), got model {self.model} and arch "
                             f"{self.arch!r}")
        if self.arch is not None:
            parse_architecture(self.arch)
        unset = _field_defaults()
        for name, kinds in ARCHITECTURE_SETTINGS.items():
            if self.model not in kinds and getattr(self, name) != unset[name]:
                raise ValueError(f"{name} shapes {', '.join(kinds)} models only, not model {self.model}"
                                 f"{' (its layers come from arch)' if self.model == 'stack' else ''}: drop "
                                 f"{name} = {getattr(self, name)!r}")
        if self.weight_init not in WEIGHT_INITS or (self.weight_init != "default" and self.model != "stack"):
            raise ValueError(f"weight_init must be one of {', '.join(WEIGHT_INITS)} (ibp with stacked models), got "
                             f"{self.weight_init!r} with model {self.model}")
        if not (self.certified_eps >= 0 and math.isfinite(self.certified_eps)):
            raise ValueError(f"certified_eps must be a finite number >= 0, got {self.certified_eps!r}")
        defaults = {**MODEL_DEFAULTS[self.model], "train_eps_factor": 1.0, "warmup_reg": 0.0}
        if self.certified_eps > 0:
            defaults.update(CERTIFIED_DEFAULTS.get(self.model, {}))
        for name, value in defaults.items():
            if name == "min_diagonal" and not self.constraint_class().takes_min_diagonal:
                continue   # the floor is the projection's: other modes keep none
            if getattr(self, name) is None:
                setattr(self, name, value)
        if isinstance(self.augment, (bool, np.bool_)):
            self.augment = "crop-flip" if self.augment else "none"
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.augment_pad is None:
            self.augment_pad = AUGMENT_PAD.get(self.augment)
        elif (self.augment not in AUGMENT_PAD or int(self.augment_pad) != self.augment_pad
              or self.augment_pad < 1):
            raise ValueError(f"augment_pad must be a positive whole number with augment "
                             f"{' or '.join(AUGMENT_PAD)}, got {self.augment_pad!r} with augment {self.augment}")
        mode = self.constraint_class()
        mondeq_like = mode.certificate == "mu_2"
        if self.solver is None:
            self.solver = "peaceman-rachford" if mondeq_like else "average"
        if self.adjoint is None:
            self.adjoint = "direct" if (mondeq_like or self.solver in MONDEQ_METHODS) else "iterative"
        if self.warm_start and (self.model != "nemon" or self.solver == "peaceman-rachford"):
            raise ValueError("warm_start keeps every training sample's fixed point between epochs: it is for dense "
                             f"nemon models with an averaged solver, got model {self.model} with solver {self.solver}")
        for name in ("hidden", "epochs", "batch_size", "max_iter", "channels", "kernel", "pool"):
            v = getattr(self, name)
            if v is None and name == "hidden":
                continue   # not a dense model's: nothing to check
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive whole number, got {v!r}")
        check_gamma(self.gamma)
        check_readout_hidden(self.readout_hidden)
        as_float_dtype(self.dtype)
        for name, allowed in (("schedule", SCHEDULES), ("lipschitz_form", LIPSCHITZ_FORMS),
                              ("solver", FORWARD_METHODS), ("adjoint", ADJOINT_METHODS), ("tol_mode", TOL_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("tol", "adjoint_tol"):
            v = getattr(self, name)
            if not (v is None and name == "adjoint_tol") and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not (self.lipschitz_reg >= 0 and math.isfinite(self.lipschitz_reg)):
            raise ValueError(f"lipschitz_reg must be >= 0, got {self.lipschitz_reg!r}")
        if self.alpha is not None and not 0 < self.alpha <= (1 if self.solver not in MONDEQ_METHODS else np.inf):
            raise ValueError(f"alpha must lie in (0, 1], got {self.alpha!r}")
        if mondeq_like != (self.solver in MONDEQ_METHODS) and mode.certificate is not None:
            raise ValueError("constraint mondeq (mu_2(A) <= gamma) goes with a monDEQ solver "
                             f"({', '.join(MONDEQ_METHODS)}) and the others with average or picard; "
                             f"got constraint {self.constraint} with solver {self.solver}")
        if self.lipschitz_reg > 0 and mode.certificate != "mu_inf":
            raise ValueError("lipschitz_reg needs an l_inf certificate, which "
                             f"{'the monDEQ model' if self.model == 'mondeq' else 'constraint ' + self.constraint} "
                             "does not give")
        if self.model == "conv":
            check_conv_solver(self.solver, self.adjoint)
            if self.kernel % 2 == 0:
                raise ValueError(f"kernel must be odd, got {self.kernel}")
            if self.padding not in PADDINGS:
                raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        for name in ("eps_warmup", "eps_ramp"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (self.train_eps_factor > 0 and math.isfinite(self.train_eps_factor)):
            raise ValueError(f"train_eps_factor must be a positive number, got {self.train_eps_factor!r}")
        if self.certified_eps > 0 and self.eps_warmup + self.eps_ramp > self.epochs:
            raise ValueError(f"eps_warmup + eps_ramp = {self.eps_warmup + self.eps_ramp:g} epochs exceeds epochs = "
                             f"{self.epochs}: training would end before eps reaches its value")
        for name in ("warmup_reg", "grad_clip"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.warmup_reg > 0 and (self.model != "stack" or self.certified_eps == 0):
            raise ValueError("warmup_reg regularizes the interval boxes of a stack's relu layers: it needs "
                             f"model stack and certified_eps > 0, got model {self.model} and certified_eps "
                             f"{self.certified_eps:g}")
        if not 0 <= self.kappa <= 1:
            raise ValueError(f"kappa must lie in [0, 1], got {self.kappa!r}")
        if not 0 <= self.crown_ibp <= 1:
            raise ValueError(f"crown_ibp must lie in [0, 1], got {self.crown_ibp!r}")
        if self.crown_ibp > 0 and (self.model != "stack" or self.certified_eps == 0):
            raise ValueError("crown_ibp mixes crown margins into a stack's certified loss: it needs model stack and "
                             f"certified_eps > 0, got model {self.model} and certified_eps {self.certified_eps:g}")
        if self.blas_threads is not None and (int(self.blas_threads) != self.blas_threads or self.blas_threads < 1):
            raise ValueError(f"blas_threads must be a positive whole number or None, got {self.blas_threads!r}")
        if check_n_jobs(self.threads, "threads") > 1 and self.model not in ("conv", "stack"):
            raise ValueError(f"threads = {self.threads} applies to conv models and stacks only (a dense model's "
                             f"products are too small to share), got model {self.model!r}")
        if int(self.certify_samples) != self.certify_samples or self.certify_samples < 0:
            raise ValueError(f"certify_samples must be a whole number >= 0, got {self.certify_samples!r}")
        if self.certified_eps > 0 and mode.certificate != "mu_inf":
            raise ValueError("certified_eps needs interval bounds, which need mu_inf < 1: "
                             f"{'the monDEQ model' if self.model == 'mondeq' else 'constraint ' + self.constraint} "
                             "does not give it")
        mode.check_min_diagonal(self.min_diagonal, self.gamma)
        if self.model == "stack" and (self.lipschitz_reg > 0 or self.init is not None):
            raise ValueError("lipschitz_reg and init are not written for stacked models yet")
        if self.init is not None and not mode.warm_start:
            raise ValueError(f"init cannot warm-start constraint {mode.name}: its free parameters are not stored "
                             "in the model file")
        if self.tol_mode == "relative" and self.solver == "peaceman-rachford":
            raise ValueError("tol_mode relative needs an averaged solver: peaceman-rachford stops on its own step")
        if self.solver in MONDEQ_METHODS and self.adjoint != "direct":
            raise ValueError(f"solver {self.solver} is certified by mu_2(A) < 1, under which only the "
                             "direct adjoint is certified: pass adjoint='direct'")
        return self

    def constraint_class(self):
        """The :class:`nemon_np.constraints.Constraint` subclass this config trains with (a one-line
        ``ValueError`` if the model kind has no such mode)."""
        kind = CONSTRAINT_KIND.get(self.model, self.model)
        if self.model == "stack":   # the implicit layer's kind (a conv implicit layer has the conv modes)
            kind = next((layer.constraint_kind for layer in parse_architecture(self.arch) if layer.implicit), kind)
        return get_constraint(kind, MODEL_CONSTRAINT.get(self.model, self.constraint))

    def certified_schedule(self, progress):
        """(eps, kappa) after ``progress`` epochs (a float) of training: eps 0 and kappa 1 during the
        warm-up, then linear ramps to (train_eps_factor x certified_eps, kappa) over eps_ramp epochs,
        then constant."""
        if self.certified_eps == 0:
            return 0.0, 1.0
        t = self._ramp_fraction(progress)
        return t * self.certified_eps * self.train_eps_factor, 1.0 - t * (1.0 - self.kappa)

    def crown_ibp_weight(self, progress):
        """CROWN-IBP's beta after ``progress`` epochs: crown_ibp until the ramp starts, then falling
        linearly to 0 at its end, and 0 after."""
        return 0.0 if self.crown_ibp == 0 else self.crown_ibp * (1.0 - self._ramp_fraction(progress))

    def _ramp_fraction(self, progress):
        """How far the eps ramp has gone after ``progress`` epochs, in [0, 1]."""
        if self.eps_ramp == 0:
            return float(progress >= self.eps_warmup)
        return min(max((progress - self.eps_warmup) / self.eps_ramp, 0.0), 1.0)

    def solver_options(self):
        """Forward solver settings (as :meth:`nemon_np.NEMON.equilibrium` takes them)."""
        options = dict(tol=self.tol, max_iter=self.max_iter, method=self.solver, alpha=self.alpha,
                       tol_mode=self.tol_mode)
        if self.constraint_class().certificate is None:
            options["on_violation"] = "warn"
        return options


def evaluate(model, X, y, batch_size=None, stop="converged", **solver_options):
    """Mean loss, accuracy and per-sample forward iterations of ``model`` on (X, y), in batches
    (default 1000 samples, 200 for a conv model, whose state is C H W floats a sample).

    With ``stop="decided"`` each sample's solve stops where its class provably cannot change
    (:func:`nemon_np.decided.decided_labels`): the same accuracy as the fixed points', in fewer
    iterations (not less CPU, measured: docs/benchmarks.md); the loss, which needs the fixed points'
    logits, is then NaN."""
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
    batch_size = batch_size or (200 if isinstance(model, ConvNEMON) else 1000)
    losses, correct, iterations = 0.0, 0, []
    for start in range(0, len(X), batch_size):
        U, t = X[start:start + batch_size], y[start:start + batch_size]
        if stop == "decided":
            labels, info = decided_labels(model, U, **solver_options)
            losses = np.nan
        else:
            Y, info = model.logits_and_info(U, **solver_options)
            losses += softmax_cross_entropy(Y, t)[0] * len(U)
            labels = Y.argmax(axis=1)
        correct += int(np.count_nonzero(labels == t))
        iterations.append(info.iterations)
    return losses / len(X), correct / len(X), np.concatenate(iterations)


def build_model(config, n_in, n_out, image_shape=None):
    """The untrained model a config describes: NEMON (and the monDEQ baseline, which is a NEMON
    with a monDEQ-parametrized A) on n_in features, or ConvNEMON on images of ``image_shape``
    (C, H, W)."""
    dtype = as_float_dtype(config.dtype)
    if config.model == "stack":
        shape = (n_in,) if image_shape is None else tuple(image_shape)
        if int(np.prod(shape)) != n_in:
            raise ValueError(f"image_shape {image_shape} does not hold the {n_in} input features")
        return StackedClassifier(config.arch, shape, n_out, gamma=config.gamma, seed=config.seed, dtype=dtype,
                                 weight_init=config.weight_init)
    if config.model != "conv":
        return NEMON(n_in, config.hidden, n_out, gamma=config.gamma, seed=config.seed, dtype=dtype,
                     readout_hidden=config.readout_hidden)
    if image_shape is None or len(image_shape) != 3 or int(np.prod(image_shape)) != n_in:
        raise ValueError(f"model conv needs the image shape (C, H, W) of the {n_in} input features, got {image_shape}")
    return ConvNEMON(image_shape[0], image_shape[1:], channels=config.channels, kernel=config.kernel, n_out=n_out,
                     pool=config.pool, gamma=config.gamma, padding=config.padding, seed=config.seed, dtype=dtype,
                     readout_hidden=config.readout_hidden)


def load_initial_model(config, n_in, n_out, image_shape=None):
    """The saved model ``config.init`` (a ``model.npz`` or a run folder holding one), checked to be
    the model ``build_model(config, ...)`` would build: same kind, sizes, gamma and dtype.
    Raises ``ValueError`` naming the first difference."""
    path = pathlib.Path(config.init)
    path = path / "model.npz" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"init: no model file at {path}")
    model = load_model(path)
    reference = build_model(config, n_in, n_out, image_shape)
    if type(model) is not type(reference) or model.metadata.get("model", config.model) != config.model:
        raise ValueError(f"init: {path} holds a {model.metadata.get('model', type(model).__name__)} model, "
                         f"the config asks for {config.model}")
    names = (("in_channels", "image_size", "channels", "kernel", "pool", "padding", "n_out") if config.model == "conv"
             else ("n_in", "n_hidden", "n_out"))
    for name in names + ("readout_hidden", "gamma", "dtype"):
        have, want = getattr(model, name), getattr(reference, name)
        if have != want:
            raise ValueError(f"init: {path} has {name} = {getattr(have, '__name__', have)}, the config asks for "
                             f"{getattr(want, '__name__', want)}")
    return model


class Trainer:
    """Minibatch Adam training of a NEMON classifier on arrays.

    ``Trainer(config, n_in, n_out).fit(X, y, X_test, y_test, on_epoch=callback)``; ``on_epoch``
    receives each epoch's metrics dict after the epoch is complete (checkpoint there).
    """

    def __init__(self, config, n_in, n_out, model=None, image_shape=None):
        self.config = config.validate()
        self.image_shape = image_shape
        if model is None:
            model = (load_initial_model if config.init is not None else build_model)(config, n_in, n_out, image_shape)
        self.model = model
        if hasattr(model, "n_jobs"):   # the models with threads of their own
            model.n_jobs = config.threads
        # The constraint acts on the implicit part (the model itself, or a stack's implicit layer, whose
        # parameters carry the prefix); an explicit stack has none and is well-posed as it is.
        self._constrained, self._prefix = model.implicit_part()
        self.constraint = (None if self._constrained is None
                           else config.constraint_class()(self._constrained, config.min_diagonal))
        self.model.metadata.update(model=config.model,
                                   certificate="mu_2" if config.solver in MONDEQ_METHODS else "mu_inf")
        self.optimizer = Adam(lr=config.lr)
        self.history = []
        self.warm_starts = None   # made at the first epoch, or restored with the training state
        # One stream for the whole run (shuffles and augmentations), saved with the training state so
        # that a resumed run draws what the uninterrupted one would have.
        self.rng = np.random.default_rng(config.seed)

    def _params(self):
        if self.constraint is None:
            return self.model.params()
        implicit = self._prefix + self.constraint.parameter
        free = {self._prefix + k: v for k, v in self.constraint.free.items()}
        return {**free, **{k: v for k, v in self.model.params().items() if k != implicit}}

    @property
    def uncertified(self):
        """Whether the constraint mode gives no certificate (its solver warnings are counted, not printed)."""
        return self.constraint is not None and self.constraint.certificate is None

    def step(self, U, y, lr, eps=0.0, kappa=1.0, crown_weight=0.0, starts=None):
        """One optimizer step on a batch, on the certified loss when eps > 0 and kappa < 1 (boxes of
        radius eps in pixel units, :meth:`input_ball`); returns a dict of the batch's loss, correct
        predictions, forward and adjoint iterations, converged samples, the fixed points solved
        ("state"), and with the certified loss its robust part, the embedded solve's iterations and
        its box ("box"). ``starts`` = (X0, box0) start the forward and embedded solves (None: zeros;
        :meth:`nemon_np.warm_starts.WarmStarts.starts`)."""
        cfg, m = self.config, self.model
        with warnings.catch_warnings():
            if self.uncertified:   # uncertified by design: counted, not printed per batch
                warnings.simplefilter("ignore")
            options = dict(adjoint=cfg.adjoint, adjoint_tol=cfg.adjoint_tol, return_info=True, **cfg.solver_options())
            certified = eps > 0 and kappa < 1
            if starts is not None:
                options["X0"] = starts[0]
                if certified:
                    options["box0"] = starts[1]
            if certified:
                U_lo, U_hi = self.input_ball(U, eps)
                if cfg.warmup_reg > 0:   # while eps ramps up, fading to 0 at its full value
                    eps_max = cfg.certified_eps * cfg.train_eps_factor
                    options["warmup_weight"] = cfg.warmup_reg * max(0.0, 1.0 - eps / eps_max)
                if crown_weight > 0:
                    options["crown_weight"] = crown_weight
                loss, grads, info = m.certified_loss_and_grad(U, y, U_lo, U_hi, kappa, **options)
            else:
                loss, grads, info = m.loss_and_grad(U, y, **options)
        if cfg.lipschitz_reg > 0:
            L, lg = (lipschitz_bound_and_grad if cfg.lipschitz_form == "exact" else smooth_lipschitz_bound_and_grad)(m)
            loss += cfg.lipschitz_reg * L
            for k, g in lg.items():
                grads[k] = grads[k] + cfg.lipschitz_reg * g
        if self.constraint is not None:
            G = grads.pop(self._prefix + self.constraint.parameter)
            grads.update({self._prefix + k: g for k, g in self.constraint.grads(G).items()})
        if cfg.grad_clip > 0:
            norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
            if norm > cfg.grad_clip:
                grads = {k: g * (cfg.grad_clip / norm) for k, g in grads.items()}
        self.optimizer.step(self._params(), grads, lr=lr)
        if self.constraint is not None:
            self.constraint.apply(self._constrained)
        forward = info["forward"]
        return dict(loss=loss, correct=int(np.count_nonzero(forward.logits.argmax(axis=1) == y)),
                    fwd=forward.iterations, bwd=info["backward"].iterations, converged=forward.converged,
                    robust_loss=info.get("robust_loss"), state=info.get("state"), box=info.get("box"),
                    emb_fwd=info["embedded"].iterations if "embedded" in info else None)

    def normalization(self):
        """(mean, std, clip) of the inputs per feature: the model's metadata normalization of images in
        [0, 1] (clip True), or 0, 1 and no clipping for inputs used as given (no metadata)."""
        if "std" not in self.model.metadata:
            return 0.0, 1.0, False
        mean, std = channel_stats(self.model, self.model.n_in)
        return mean, std, True

    def input_ball(self, U, eps):
        """Boxes (U_lo, U_hi) of the eps-ball in pixel units around normalized inputs U."""
        return input_ball(U, eps, *self.normalization())

    def certified_accuracy(self, X, y, eps, batch_size=None):
        """Fraction of (X, y) (normalized inputs) certified correct at radius eps (pixel units) by the
        interval bounds (sound: :meth:`nemon_np.base.ImplicitClassifier.interval_margins`)."""
        batch_size = batch_size or (100 if isinstance(self.model, ConvNEMON) else 2000)
        certified = 0
        for start in range(0, len(X), batch_size):
            U, t = X[start:start + batch_size], y[start:start + batch_size]
            M, _ = self.model.interval_margins(*self.input_ball(U, eps), t, tol=self.config.tol,
                                               max_iter=self.config.max_iter)
            certified += int(np.count_nonzero(certified_rows(M, t)))
        return certified / max(len(X), 1)

    def fit(self, X, y, X_test=None, y_test=None, on_epoch=None, progress=True, should_stop=None):
        """Train for the config's epochs (those not yet in ``history``) on (X, y); evaluate on (X_test,
        y_test) after each epoch when given; ``on_epoch(row)`` after each. ``should_stop()``, asked before
        every batch, ends training there with ``KeyboardInterrupt`` when true (a Ctrl-C that the caller
        recorded). Returns self."""
        with threadpool_limits(self.config.blas_threads, user_api="blas"):
            return self._fit(X, y, X_test, y_test, on_epoch, progress, should_stop or (lambda: False))

    def _fit(self, X, y, X_test, y_test, on_epoch, progress, should_stop):
        cfg = self.config
        dtype = as_float_dtype(cfg.dtype)
        X = np.ascontiguousarray(X, dtype=dtype)
        X_test = None if X_test is None else np.ascontiguousarray(X_test, dtype=dtype)
        rng = self.rng
        augment = AUGMENTATIONS[cfg.augment]
        if augment is not None and self.image_shape is None:
            raise ValueError("augment needs the image shape: pass image_shape to Trainer")
        pad_args = () if cfg.augment_pad is None else (cfg.augment_pad,)  # flip takes no padding
        n_batches = math.ceil(len(X) / cfg.batch_size)
        if cfg.warm_start and self.warm_starts is None:
            self.warm_starts = WarmStarts(len(X))
        if self.warm_starts is not None and self.warm_starts.n_samples != len(X):
            raise ValueError(f"the warm starts are for {self.warm_starts.n_samples} training samples, X has {len(X)}")
        for epoch in range(len(self.history), cfg.epochs):
            t0, cpu0 = time.perf_counter(), time.process_time()
            order = rng.permutation(len(X))
            total_loss, total_correct, fwd, bwd, converged = 0.0, 0, [], [], 0
            robust_loss, robust_seen, emb = 0.0, 0, []
            # disable=None: a bar on a terminal only; a log file gets the per-epoch lines alone.
            bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=None if progress else True, unit="batch")
            for k in bar:
                if should_stop():
                    raise KeyboardInterrupt
                done = epoch + k / n_batches
                lr = learning_rate(cfg.schedule, cfg.lr, done / cfg.epochs)
                eps, kappa = cfg.certified_schedule(done)
                idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
                batch = X[idx] if augment is None else augment(X[idx], self.image_shape, rng, *pad_args)
                warm = self.warm_starts
                out = self.step(batch, y[idx], lr, eps, kappa, cfg.crown_ibp_weight(done),
                                starts=None if warm is None else warm.starts(idx))
                if warm is not None:
                    warm.update(idx, out["state"], out["box"])
                converged += int(np.count_nonzero(out["converged"]))
                total_loss += out["loss"] * len(idx)
                total_correct += out["correct"]
                fwd.append(out["fwd"])
                bwd.append(out["bwd"])
                if out["robust_loss"] is not None:
                    robust_loss += out["robust_loss"] * len(idx)
                    robust_seen += len(idx)
                    if out["emb_fwd"] is not None:   # an explicit stack has no embedded network
                        emb.append(out["emb_fwd"])
                if k % 20 == 0:
                    seen = min((k + 1) * cfg.batch_size, len(X))
                    bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{total_correct / seen:.4f}",
                                    fwd_it=f"{np.mean(out['fwd']):.1f}", bwd_it=f"{np.mean(out['bwd']):.1f}",
                                    **({"eps": f"{eps:.3g}"} if cfg.certified_eps > 0 else {}))
            train_seconds = time.perf_counter() - t0
            # CPU seconds (every thread of this process): what other jobs on a shared machine inflate least,
            # and so the fairer clock for matching two runs' compute.
            train_cpu_seconds = time.process_time() - cpu0
            fwd, bwd = np.concatenate(fwd), np.concatenate(bwd)
            if fwd.max() == 0 and self.warm_starts is None and self._constrained is not None:
                warnings.warn(DEAD_IMPLICIT_LAYER.format(tol=cfg.tol), RuntimeWarning, stacklevel=2)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": total_loss / len(X),
                   "train_acc": total_correct / len(X)}
            if cfg.certified_eps > 0:
                row.update(eps=eps, kappa=kappa, train_robust_loss=robust_loss / robust_seen if robust_seen else None,
                           embedded_fwd_iter_mean=float(np.concatenate(emb).mean()) if emb else None)
                if cfg.crown_ibp > 0:
                    row["crown_ibp_weight"] = cfg.crown_ibp_weight(done)
            if X_test is not None:
                with warnings.catch_warnings():
                    if self.uncertified:
                        warnings.simplefilter("ignore")
                    test_loss, test_acc, test_its = evaluate(self.model, X_test, y_test, **cfg.solver_options())
                row.update(test_loss=test_loss, test_acc=test_acc, test_fwd_iter_mean=float(test_its.mean()))
                if cfg.certified_eps > 0 and cfg.certify_samples > 0:
                    t1 = time.perf_counter()
                    n = min(cfg.certify_samples, len(X_test))
                    row.update(test_certified_acc=self.certified_accuracy(X_test[:n], y_test[:n], cfg.certified_eps),
                               test_certified_samples=n, certify_seconds=time.perf_counter() - t1)
            mu = self.model.mu_inf()
            row.update(mu_inf=mu, mu_inf_unweighted=mu if self.model.weights is None else mu_inf(self.model.A),
                       alpha_star=self.model.alpha_star(),
                       # No l_inf certificate, no bound (monDEQ and unconstrained models may lack one).
                       lipschitz_bound=lipschitz_bound(self.model) if mu < 1 else None,
                       fwd_converged_frac=converged / len(X),
                       fwd_iter_mean=float(fwd.mean()), fwd_iter_max=int(fwd.max()),
                       bwd_iter_mean=float(bwd.mean()), bwd_iter_max=int(bwd.max()),
                       train_seconds=train_seconds, train_cpu_seconds=train_cpu_seconds,
                       epoch_seconds=time.perf_counter() - t0)
            self.history.append(row)
            if on_epoch is not None:
                on_epoch(row)
        return self


# -- run outputs ----------------------------------------------------------------------------------

def metric_columns(history):
    """Every key of the per-epoch rows, in the order they first appear: a run resumed from an older version
    has epochs without the metrics added since, and the columns are all of them."""
    return list(dict.fromkeys(k for row in history for k in row))


def write_metrics(out_dir, config, history, extra=None):
    """``metrics.json`` (config, per-epoch rows, extra) and ``metrics.csv`` (one row per epoch)."""
    out_dir = pathlib.Path(out_dir)
    payload = {"config": asdict(config), "epochs": history, **(extra or {})}
    _atomic_write(out_dir / "metrics.json", json.dumps(payload, indent=2))
    if history:
        tmp = out_dir / "metrics.csv.part"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=metric_columns(history))   # an epoch without a column: empty
            w.writeheader()
            w.writerows(history)
        os.replace(tmp, out_dir / "metrics.csv")


def is_complete(folder):
    """A run is complete when its metrics.json holds the final summary (written after the last epoch)."""
    try:
        return "summary" in json.loads((pathlib.Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return False


def _atomic_write(path, data):
    """``path`` holds the text or bytes ``data``, replaced in one rename: never half written."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    os.replace(tmp, path)


def save_checkpoint(model, out_dir):
    """Write ``model.npz`` atomically: an interrupted write never replaces the last good one."""
    out_dir = pathlib.Path(out_dir)
    tmp = out_dir / "model.npz.part"
    model.save(tmp)
    os.replace(tmp, out_dir / "model.npz")


TRAINING_STATE = "training_state.npz"


def save_training_state(trainer, out_dir):
    """Write what a resumed run needs (atomically, as ``training_state.npz``): the model as ``model.npz``
    holds it, the per-epoch history, Adam's step count and moments, the constraint mode's free
    parameters, the warm starts, the random stream's state and the epochs done.

    The model and the history are in the file too, although ``model.npz`` and ``metrics.json`` hold them,
    so that the state alone, written in one atomic rename, is a consistent place to resume from: a run
    killed between the writes of an epoch's files resumes from the last complete state, never from one
    epoch's model with another epoch's optimizer."""
    _write_training_state(training_state(trainer), out_dir)


def _write_training_state(state, out_dir):
    tmp = pathlib.Path(out_dir) / (TRAINING_STATE + ".part")
    with open(tmp, "wb") as f:
        np.savez(f, **state)
    os.replace(tmp, pathlib.Path(out_dir) / TRAINING_STATE)


def training_state(trainer):
    """The arrays :func:`save_training_state` writes, keyed as in the file: the trainer's own arrays,
    which it updates in place (Adam's moments, the warm starts); :func:`copied_into` copies them."""
    opt = trainer.optimizer
    model = io.BytesIO()
    trainer.model.save(model)
    state = {"adam_t": np.array(opt.t), "epochs_done": np.array(len(trainer.history)),
             "rng_state": np.array(json.dumps(trainer.rng.bit_generator.state)),
             "model_npz": np.frombuffer(model.getvalue(), np.uint8), "history": np.array(json.dumps(trainer.history))}
    state.update({"adam_m." + k: v for k, v in opt.m.items()})
    state.update({"adam_v." + k: v for k, v in opt.v.items()})
    if trainer.constraint is not None:
        state.update({"free." + k: v for k, v in trainer.constraint.free.items()})
    if trainer.warm_starts is not None:
        state.update({"warm." + k: v for k, v in trainer.warm_starts.arrays().items()})
    return state


def copied_into(arrays, buffers):
    """Copies of the dict ``arrays``, each written into the array of the same key in ``buffers`` when
    its shape and dtype match, else a new array. Reused pages are what make the copy cheap: a new
    146 MB copy of a certified run's warm starts took 0.7-0.9 s each epoch on the 2-core VM measured
    (its fresh pages, faulted in while the last epoch's file was being written back), the same copy
    into the pages of the epoch before 15 ms."""
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        b = buffers.get(k)
        if b is not None and b.shape == v.shape and b.dtype == v.dtype:
            np.copyto(b, v)
            out[k] = b
        else:
            out[k] = np.array(v)
    return out


class BackgroundCheckpoints:
    """A run's files after each epoch (``model.npz``, ``training_state.npz``, ``metrics.json`` and
    ``.csv``), written by one background thread from copies taken when :meth:`write` is called, in that
    order and each atomically, as the synchronous functions write them, so that the next epoch's steps
    overlap the writing: a certified dense run's training state is 146 MB an epoch (its warm starts).
    :meth:`write` first waits for the previous write; :meth:`wait` returns when the last one is on
    disk, and raises what a write raised (a full disk is an error, not a lost epoch)."""

    def __init__(self, out_dir):
        self.out_dir = pathlib.Path(out_dir)
        self._thread, self._error = None, None
        self._state = {}   # the last write's copies, whose pages the next copy reuses once it is on disk

    def write(self, trainer, config, extra=None):
        self.wait()
        self._state = copied_into(training_state(trainer), self._state)
        self._thread = threading.Thread(target=self._write, args=(self._state, list(trainer.history), config, extra),
                                        daemon=False)
        self._thread.start()

    def _write(self, state, history, config, extra):
        try:
            # model.npz is the file the state holds the bytes of: the model is serialized once an epoch.
            _atomic_write(self.out_dir / "model.npz", state["model_npz"].tobytes())
            _write_training_state(state, self.out_dir)
            write_metrics(self.out_dir, config, history, extra)
        except BaseException as e:   # handed to the main thread by wait()
            self._error = e

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def resume_point(out_dir):
    """(model, history) to resume the run in ``out_dir`` from: those its ``training_state.npz`` holds, or,
    for a state file written before it held them, ``model.npz`` and None (the history is then
    ``metrics.json``'s, which :func:`restore_training_state` checks against the state). A missing or
    unreadable state file is a one-line ``ValueError``."""
    path = pathlib.Path(out_dir) / TRAINING_STATE
    if not path.is_file():
        raise ValueError(f"resume: {path} not found (runs write it after every epoch)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "model_npz" not in z.files:
                return load_model(pathlib.Path(out_dir) / "model.npz"), None
            model, history = z["model_npz"].tobytes(), json.loads(str(z["history"]))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"resume: {path} is not a readable training state ({type(e).__name__})") from None
    return load_model(io.BytesIO(model)), history


def restore_training_state(trainer, out_dir, history):
    """Put a trainer built on a run's saved model (:func:`resume_point`'s) back where the run stopped: the
    history of its complete epochs (:func:`resume_point`'s, or ``metrics.json``'s for an older state
    file), Adam's state, the constraint's free parameters and the random stream. A state file that does
    not match the history (another run's files) is a one-line ``ValueError``."""
    path = pathlib.Path(out_dir) / TRAINING_STATE
    if not path.is_file():
        raise ValueError(f"resume: {path} not found (runs write it after every epoch)")
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    if int(data["epochs_done"]) != len(history):
        raise ValueError(f"resume: {path} is from epoch {int(data['epochs_done'])}, metrics.json has {len(history)} "
                         "epochs")
    opt = trainer.optimizer
    opt.t = int(data["adam_t"])
    opt.m = {k[7:]: v for k, v in data.items() if k.startswith("adam_m.")}
    opt.v = {k[7:]: v for k, v in data.items() if k.startswith("adam_v.")}
    if trainer.constraint is not None:
        free = {k[5:]: v for k, v in data.items() if k.startswith("free.")}
        if set(free) != set(trainer.constraint.free):
            raise ValueError(f"resume: {path} holds free parameters {sorted(free)}, the constraint has "
                             f"{sorted(trainer.constraint.free)}")
        param = trainer.constraint.parameter
        for k, v in free.items():
            trainer.constraint.free[k][...] = v
        # A mode whose free parameter is the model's own matrix (projection) already holds it: applying
        # it again could move a row by an ulp. The others rebuild the matrix from what was restored.
        if trainer.constraint.free.get(param) is not getattr(trainer._constrained, param):
            trainer.constraint.apply(trainer._constrained)
    warm = {k[5:]: v for k, v in data.items() if k.startswith("warm.")}
    if warm:
        trainer.warm_starts = WarmStarts.from_arrays(warm)
    trainer.rng.bit_generator.state = json.loads(str(data["rng_state"]))
    trainer.history = list(history)
    return trainer


def plot_history(history, path, title="", gamma=None):
    """Training curves (PNG): loss, accuracy, iterations, mu_inf(A), Lipschitz bound, seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in history]
    col = {k: [r.get(k) for r in history] for k in metric_columns(history)}
    fig, ax = plt.subplots(2, 3, figsize=(14, 7))
    ax[0, 0].plot(ep, col["train_loss"], label="train")
    ax[0, 1].plot(ep, [100 * a for a in col["train_acc"]], label="train")
    if "test_loss" in col:
        ax[0, 0].plot(ep, col["test_loss"], label="test")
        ax[0, 1].plot(ep, [100 * a for a in col["test_acc"]], label="test")
        ax[0, 1].annotate(f"{100 * col['test_acc'][-1]:.2f}%", (ep[-1], 100 * col["test_acc"][-1]),
                          textcoords="offset points", xytext=(-40, -15))
    if "test_certified_acc" in col:
        ax[0, 1].plot(ep, [100 * a for a in col["test_certified_acc"]], "--", color="C3",
                      label=f"certified, test subset (eps {history[-1]['eps']:g} at the end)")
    ax[0, 0].set(ylabel="cross-entropy", yscale="log", title="loss")
    ax[0, 1].set(ylabel="accuracy (%)", title="accuracy")
    ax[0, 2].plot(ep, col["fwd_iter_mean"], label="forward, mean")
    ax[0, 2].plot(ep, col["fwd_iter_max"], ":", color="C0", label="forward, max")
    ax[0, 2].plot(ep, col["bwd_iter_mean"], label="adjoint, mean")
    ax[0, 2].set(ylabel="iterations per sample", title="fixed-point iterations")
    ax[1, 0].plot(ep, col["mu_inf"], label="mu_inf(A), the model's norm")
    if any(abs(a - b) > 1e-9 for a, b in zip(col["mu_inf"], col["mu_inf_unweighted"])):
        ax[1, 0].plot(ep, col["mu_inf_unweighted"], label="mu_inf(A), unweighted")
    ax[1, 0].axhline(1.0, color="k", lw=0.8, ls="--", label="1: well-posedness limit")
    if gamma is not None:
        ax[1, 0].axhline(gamma, color="C3", lw=0.8, ls=":", label=f"gamma = {gamma}")
    lo = min(min(col["mu_inf"]), min(col["mu_inf_unweighted"]), 0.0)
    ax[1, 0].set(ylabel="mu_inf(A)", title="well-posedness margin",
                 ylim=(lo - 0.1, max(1.1, max(col["mu_inf_unweighted"]) + 0.1)))
    ax[1, 1].plot(ep, [np.nan if v is None else v for v in col["lipschitz_bound"]], color="C3")
    ax[1, 1].set(ylabel="bound (per unit of normalized input)", yscale="log",
                 title="l_inf Lipschitz bound ||C|| ||B|| / (1 - mu)")
    ax[1, 2].plot(ep, col["epoch_seconds"], label="epoch (with test evaluation)")
    ax[1, 2].plot(ep, col["train_seconds"], label="training part")
    if "train_cpu_seconds" in col:   # a run resumed from an older version has it from its resumption on
        ax[1, 2].plot(ep, [np.nan if v is None else v for v in col["train_cpu_seconds"]], ":",
                      label="training part, CPU seconds (all threads)")
    ax[1, 2].set(ylabel="seconds", ylim=(0, None), title="time per epoch")
    for a in ax.flat:
        a.set(xlabel="epoch")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _field_defaults():
    """Each TrainConfig setting's value when it is not given."""
    return {f.name: f.default for f in fields(TrainConfig)}


def config_from_dict(d):
    """A TrainConfig from a dict, ignoring unknown keys (as written to metrics.json: resolved when its run
    started). A resolved "no floor" (None) becomes -inf, which means the same, so that validating it again
    does not give it today's default floor (certified dense runs have one by default since it was written)."""
    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in d.items() if k in names})
    if "warm_start" not in d:   # written before warm starts existed: its run had none
        config.warm_start = False
    model, unset = "stack" if config.arch is not None else config.model, _field_defaults()
    for name, kinds in ARCHITECTURE_SETTINGS.items():
        if model not in kinds:   # written when every model resolved hidden (100), which only dense models read
            setattr(config, name, unset[name])
    if config.min_diagonal is None and config.constraint_class().takes_min_diagonal:
        config.min_diagonal = -math.inf
    return config
