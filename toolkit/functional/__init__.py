"""Pure tensor functions, one per method: no state, no Lightning (like `torchmetrics.functional`)."""

from toolkit.functional._reduce import reduce
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.kd import kd_loss

__all__ = ["cross_entropy", "kd_loss", "reduce"]
