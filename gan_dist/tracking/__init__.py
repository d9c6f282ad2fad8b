"""MLflow tracking: ``tracker`` (rank 0's background logger), ``info`` (run params and tags), ``model`` (the
generator as an MLflow pyfunc model) and ``redact`` (secrets out of anything logged).

This package's own namespace stays light on purpose: generator models logged before tracking became a
package name ``gan_dist.tracking`` as their MLflow loader module, so importing it must give MLflow the
loader hook without starting any logging machinery.
"""

from gan_dist.tracking.model import _load_pyfunc  # noqa: F401  (MLflow's loader hook for older models)
