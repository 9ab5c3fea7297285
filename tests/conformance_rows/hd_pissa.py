"""HD-PiSSA on one device: PiSSA on the `devices·rank` principal components it
stacks, with the weight itself as the base (no residual), so the identity at init is exact. The
distributed step and its oracles are in tests/distributed/."""

from jpeft.methods.hd_pissa import HDPiSSA
from tests.conformance_table import Case

ROWS = [
    Case("hd_pissa", "hd_pissa", HDPiSSA(rank=4, alpha=4, devices=2)),
    Case("hd_pissa_trained_randomized", "hd_pissa",
         HDPiSSA(rank=4, alpha=8, devices=2, frames="trained", svd_niter=4)),
]
