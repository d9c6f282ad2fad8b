"""MLflow tracking: ``tracker`` (rank 0's background logger), ``info`` (run params and tags), ``model`` (the
generator as an MLflow pyfunc model) and ``redact`` (secrets out of anything logged).

This package's own namespace stays light on purpose: generator models logged before tracking became a
package name ``gan_dist.tracking`` as their MLflow loader module, so importing it must give MLflow the
loader hook without starting any logging machinery. The hook is resolved on first access (PEP 562), so that
``gan_dist.tracking.redact`` stays importable without importing MLflow (the driver's console, every rank).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "_load_pyfunc":  # MLflow's loader hook for older models
        from gan_dist.tracking.model import _load_pyfunc

        return _load_pyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
