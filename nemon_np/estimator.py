"""scikit-learn estimator: ``NEMONClassifier`` drops a NEMON model into Pipeline and GridSearchCV.

Inputs are used as given (put a scaler in front of it in a Pipeline); labels may be
any hashable values (mapped to 0..k-1 through ``classes_``).
"""
import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .training import TrainConfig, Trainer

__all__ = ["NEMONClassifier"]


class NEMONClassifier(ClassifierMixin, BaseEstimator):
    """NEMON classifier ``x = relu(Ax + Bu + b)``, ``y = Cx + c`` with mu_inf(A) <= gamma.

    Parameters are those of ``python -m nemon_np.train`` (see :class:`nemon_np.training.TrainConfig`):
    model ("nemon", "mondeq" or "conv"), hidden, channels, kernel, pool, padding (conv), readout_hidden
    (the width of a hidden ReLU layer in the read-out, 0: linear; :mod:`nemon_np.readout`), epochs,
    batch_size, lr, schedule, gamma, constraint, min_diagonal, lipschitz_reg,
    lipschitz_form, solver, alpha, tol, max_iter, adjoint, dtype, seed (hidden, epochs, lr, gamma, tol,
    min_diagonal, solver and adjoint None: the command line's defaults for the model, and for certified
    training when certified_eps > 0, as :data:`nemon_np.training.MODEL_DEFAULTS` and ``CERTIFIED_DEFAULTS``
    give them: a dense model trains 40 epochs at lr 1e-3 with 100 units and gamma 0.95, or with
    certified_eps 200 units, gamma 0.5, the diagonal floor 0, the relative tolerance and warm starts),
    and certified training: certified_eps (the radius of the l_inf
    balls around the inputs, in the units of the inputs as given: no clipping), kappa, eps_warmup,
    eps_ramp. ``arch`` (a preset or comma-separated layers of :mod:`nemon_np.stack`) selects a stacked
    model, with ``weight_init`` "default" or "ibp", and its certified training's recipes warmup_reg
    (None: 0.5 with certified_eps > 0, as the command line), grad_clip and crown_ibp. ``n_jobs`` is a
    conv model's threads (TrainConfig's ``threads``: the same model, faster on idle cores).
    ``image_shape`` (C, H, W) says how a conv model (or a stack's first conv layer) reads each row of X
    (channel-major, as the data loaders flatten images); None reads it as one channel of 1 x n_features
    for a conv model (pair it with padding="zero" and pool=1, which work on any size) and as flat
    features for a stack.

    Attributes
    ----------
    model_ : nemon_np.NEMON; classes_ : (k,) labels; history_ : list of per-epoch metrics dicts;
    config_ : the resolved TrainConfig; n_features_in_ : int; n_iter_ : int, the epochs run
    """

    def __init__(self, model="nemon", hidden=None, epochs=None, batch_size=100, lr=None, schedule="cosine",
                 gamma=None, constraint="projection", min_diagonal=None, lipschitz_reg=0.0, lipschitz_form="exact",
                 solver=None, alpha=None, tol=None, max_iter=300, adjoint=None, dtype="float32", seed=0,
                 certified_eps=0.0, kappa=0.5, eps_warmup=None, eps_ramp=None, channels=32, kernel=3, pool=4,
                 padding="circular", image_shape=None, n_jobs=1, readout_hidden=0, arch=None, weight_init="default",
                 warmup_reg=None, grad_clip=0.0, crown_ibp=0.0):
        self.model = model
        self.arch = arch
        self.weight_init = weight_init
        self.hidden = hidden
        self.channels = channels
        self.kernel = kernel
        self.pool = pool
        self.padding = padding
        self.readout_hidden = readout_hidden
        self.image_shape = image_shape
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.schedule = schedule
        self.gamma = gamma
        self.constraint = constraint
        self.min_diagonal = min_diagonal
        self.lipschitz_reg = lipschitz_reg
        self.lipschitz_form = lipschitz_form
        self.solver = solver
        self.alpha = alpha
        self.tol = tol
        self.max_iter = max_iter
        self.adjoint = adjoint
        self.dtype = dtype
        self.seed = seed
        self.certified_eps = certified_eps
        self.kappa = kappa
        self.eps_warmup = eps_warmup
        self.eps_ramp = eps_ramp
        self.n_jobs = n_jobs
        self.warmup_reg = warmup_reg
        self.grad_clip = grad_clip
        self.crown_ibp = crown_ibp

    def _config(self):
        params = self.get_params()
        params.pop("image_shape")
        params["threads"] = params.pop("n_jobs")
        return TrainConfig(**params).validate()

    def _image_shape(self, n_features):
        if self.arch is not None:   # a stack reads images when image_shape is given, flat rows otherwise
            return None if self.image_shape is None else tuple(int(v) for v in self.image_shape)
        if self.model != "conv":
            return None
        shape = (1, 1, n_features) if self.image_shape is None else tuple(int(v) for v in self.image_shape)
        if len(shape) != 3 or int(np.prod(shape)) != n_features:
            raise ValueError(f"image_shape {self.image_shape} does not hold the {n_features} features of a row of X")
        return shape

    def fit(self, X, y):
        """Train on X (n_samples, n_features) and labels y; returns self."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"NEMONClassifier needs samples of at least 2 classes, got {len(self.classes_)} class")
        config = self._config()
        trainer = Trainer(config, X.shape[1], len(self.classes_), image_shape=self._image_shape(X.shape[1]))
        trainer.fit(X, y_idx.astype(np.int64), progress=False)
        self.model_, self.history_, self.config_ = trainer.model, trainer.history, config
        self.n_iter_ = len(trainer.history)
        return self

    def _logits(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self.model_.logits(X, **self.config_.solver_options())

    def decision_function(self, X):
        """Logits, shape (n_samples, n_classes); for two classes the difference of the second and the
        first logit, shape (n_samples,), positive for ``classes_[1]`` (scikit-learn's convention)."""
        Y = self._logits(X)
        return Y[:, 1] - Y[:, 0] if Y.shape[1] == 2 else Y

    def predict_proba(self, X):
        """Softmax of the logits, shape (n_samples, n_classes)."""
        return softmax(self._logits(X).astype(np.float64), axis=1)

    def predict(self, X):
        """The class of the largest logit, among ``classes_``."""
        index = np.argmax(self._logits(X), axis=1)   # first: it checks that the model is fitted
        return self.classes_[index]

    def score(self, X, y, sample_weight=None):
        """Mean accuracy of :meth:`predict` on (X, y), weighted by ``sample_weight`` if given
        (scikit-learn's ClassifierMixin.score, which is what runs)."""
        return super().score(X, y, sample_weight)
