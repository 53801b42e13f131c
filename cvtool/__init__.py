"""cvtool: a batch computer-vision toolkit for folders of images.

Every CLI command is a thin wrapper over a plain function in this package, so
the same work can be done from Python::

    from cvtool.train import train
    from cvtool.predict import predict
"""

__version__ = "0.1.0"

import os as _os

# Silence TensorFlow's C++ log noise before anything imports it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
