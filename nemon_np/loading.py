"""Reading a saved model of either kind: :func:`load_model`.

It sits above both model modules (it imports them, they do not import it), so that the package's
imports run one way.
"""
from .base import model_file_format
from .conv_model import FORMAT_NAME as CONV_FORMAT, ConvNEMON
from .models import FORMAT_NAME as DENSE_FORMAT, NEMON
from .stack import FORMAT_NAME as STACK_FORMAT, StackedClassifier

__all__ = ["load_model"]

MODEL_CLASSES = {DENSE_FORMAT: NEMON, CONV_FORMAT: ConvNEMON, STACK_FORMAT: StackedClassifier}


def load_model(path):
    """Read a saved :class:`nemon_np.NEMON`, :class:`nemon_np.ConvNEMON` or
    :class:`nemon_np.stack.StackedClassifier`, whichever the file holds.

    A file that is not a nemon_np model is a one-line ``ValueError`` naming it; a missing one a
    ``FileNotFoundError``."""
    kind = model_file_format(path)
    if kind not in MODEL_CLASSES:
        raise ValueError(f"{path}: not a nemon_np model file (format marker {kind or 'none'!r})")
    return MODEL_CLASSES[kind].load(path)
