"""What every implicit classifier here shares: the loss, label checks, the model file format and
the base class with ``logits`` and ``predict``.

Both model modules (:mod:`nemon_np.models`, :mod:`nemon_np.conv_model`) import this one and nothing
imports them back; :func:`nemon_np.loading.load_model`, which knows both, sits above them.
"""
import zipfile

import numpy as np
from scipy.special import log_softmax

__all__ = ["softmax_cross_entropy", "check_labels", "read_model_file", "write_model_file", "model_file_format", "ImplicitClassifier"]


def softmax_cross_entropy(Y, labels):
    """Mean cross-entropy of logits Y (m, k) against integer labels (m,), and dL/dY."""
    logp = log_softmax(Y.astype(np.float64), axis=1)
    m = Y.shape[0]
    rows = np.arange(m)
    loss = -logp[rows, labels].mean()
    dY = np.exp(logp)
    dY[rows, labels] -= 1.0
    return float(loss), (dY / m).astype(Y.dtype)


def check_labels(y, m, n_out):
    """y as m integer class labels in [0, n_out); anything else is a one-line ``ValueError``."""
    y = np.asarray(y)
    if y.shape != (m,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be {m} integer class labels, got shape {y.shape} dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= n_out):
        raise ValueError(f"labels must lie in [0, {n_out - 1}], got range [{y.min()}, {y.max()}]")
    return y


def _read_arrays(path):
    """Every array of an ``.npz`` file, as a dict; anything else (a pickle, a plain ``.npy``, text,
    a truncated archive, object arrays) is a one-line ``ValueError`` naming the file. A missing
    file stays a ``FileNotFoundError``."""
    not_model = f"{path}: not a nemon_np model file"
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError(f"{not_model} (a single NumPy array, not an .npz archive)")
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a model file") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if str(e).startswith(not_model):
            raise
        # numpy's own message advises unpickling untrusted data: not repeated here.
        reason = "pickled or object data" if "pickle" in str(e) or "Object arrays" in str(e) else type(e).__name__
        raise ValueError(f"{not_model} ({reason})") from None


def model_file_format(path):
    """The format marker of a model file (``"nemon_np.NEMON"``, ``"nemon_np.ConvNEMON"``), ``""``
    when it has none; an unreadable file is a one-line ``ValueError``."""
    data = _read_arrays(path)
    return str(data["format"]) if "format" in data else ""


def read_model_file(path, format_name, version, required):
    """The arrays of a model ``.npz`` as a dict, checked for its format marker, version and keys,
    with the ``meta.`` entries gathered under "metadata"; a truncated or foreign file is a
    one-line ``ValueError``."""
    data = _read_arrays(path)
    if str(data.get("format", "")) != format_name:
        raise ValueError(f"{path}: not a nemon_np model file of kind {format_name} "
                         f"(format marker {str(data.get('format', 'none'))!r})")
    if int(data["version"]) > version:
        raise ValueError(f"{path}: model format version {int(data['version'])} is newer than "
                         f"this nemon_np reads ({version})")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: model file lacks {', '.join(missing)}")
    data["metadata"] = {k[5:]: (v.item() if v.ndim == 0 else v) for k, v in data.items() if k.startswith("meta.")}
    return data


def write_model_file(path, format_name, version, params, metadata, **settings):
    """One ``.npz`` (no pickled objects): the parameter arrays, the settings, a format marker and
    version, and each metadata entry under ``meta.<key>``; the inverse of :func:`read_model_file`."""
    state = {k: np.asarray(v) for k, v in {**params, **settings}.items()}
    state.update(format=np.array(format_name), version=np.array(version))
    for k, v in metadata.items():
        state["meta." + k] = np.asarray(v)
    with open(path, "wb") as f:
        np.savez(f, **state)


class ImplicitClassifier:
    """What every implicit classifier here derives from its ``equilibrium(U, **options) -> (X, info)``
    and ``readout(X) -> logits``: the logits of inputs and the predicted classes."""

    def logits(self, U, **solver_options):
        """Logits ``y = C x* + c`` (after pooling for a conv model), shape (m, n_out); keyword
        options go to ``equilibrium``."""
        X, _ = self.equilibrium(U, **solver_options)
        return self.readout(X)

    def predict(self, U, **solver_options):
        """Predicted class per sample, argmax of the logits."""
        return np.argmax(self.logits(U, **solver_options), axis=1)
