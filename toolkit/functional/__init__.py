"""Pure tensor functions, one per method: no state, no Lightning (like `torchmetrics.functional`)."""

from toolkit.functional._reduce import reduce
from toolkit.functional.cross_entropy import cross_entropy
from toolkit.functional.kd import kd_loss
from toolkit.functional.ps_kd import ps_kd_alpha, ps_kd_loss, ps_kd_targets

__all__ = ["cross_entropy", "kd_loss", "ps_kd_alpha", "ps_kd_loss", "ps_kd_targets", "reduce"]
