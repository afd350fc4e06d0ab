"""The butterfly paper's compression layers (BP, BPBP) and an untied butterfly for projection.

BP / BPBP (Dao et al. 2019, section 4.3): nblocks in {1, 2} of [P, then B], applied in order:
    W = B_2 P_2 B_1 P_1 (bpbp) or B_1 P_1 (bp),
B a tied butterfly (kernels.butterfly.Butterfly, tied=True: 4(n-1) real numbers, 8(n-1) when
complex) and P either the fixed bit-reversal permutation (an index gather) or a learned relaxed
Permutation (kernels.permutation, share=True: 3 logits). Complex layers take real input,
compute in complex and return the real part, so W = Re(B_2 P_2 B_1 P_1).
On the CPU every layer runs factored and compiled, training included: each B through
kernels.multiply (the row loop or the tiled kernels, complex included, with their backward) and
a learned P through kernels.cpu.permute (an inference plan, or `relaxed_permute` with its
gradients when training), both chosen in kernels.multiply. `materialised` (B P built in
O(n^2), one GEMM) is the earlier training path, kept for the bench and as a check.

Init: Butterfly's "ortho" (every 2x2 Haar orthogonal / unitary), so each B is orthogonal /
unitary and a fixed-P real layer is orthogonal at init (norm-preserving; a complex layer's
product is unitary, its real part a contraction). The paper's randn init is not used here.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.butterfly import Butterfly, tied_bp_matrix
from kernels.cpu.permute import PermutationPlanCache
from kernels.factorize import hierarchical_butterfly
from kernels.multiply import butterfly_multiply, relaxed_permutation
from kernels.permutation import Permutation, bit_reversal
from kernels.structured.base import StructuredLayer, check_size

INIT = "ortho"
LOGIT_INIT = 4.0  # sigmoid(4) = 0.98 per level: close to bit reversal, still trainable


def bp_param_count(n: int, nblocks: int, complex_: bool, learned: bool) -> int:
    """4(n-1) per tied butterfly (x2 complex), plus 3 logits per learned permutation."""
    return nblocks * (4 * (n - 1) * (2 if complex_ else 1) + (3 if learned else 0))


class BPLayer(StructuredLayer):
    """W = Re(B_k P_k ... B_1 P_1) (module doc): bp_param_count(n, ...) parameters."""

    def __init__(
        self,
        n: int,
        nblocks: int,
        complex_: bool,
        learned: bool,
        generator: torch.Generator | None = None,
    ):
        super().__init__(check_size(n, power_of_two=True, minimum=4))
        self.nblocks, self.complex, self.learned = nblocks, complex_, learned
        perms, bflys = [], []
        for _ in range(nblocks):  # P then B per block, drawing from the generator in that order
            if learned:
                perm = Permutation(n, share=True, generator=generator)
                with torch.no_grad():  # start near bit reversal: random logits blur the
                    # input into near-zero output (||W||^2/n ~ 0.006 at n = 1024)
                    perm.logits.copy_(Permutation.bit_reversal_logits(n, LOGIT_INIT)[:1])
                perms.append(perm)
            bflys.append(
                Butterfly(
                    n, n, bias=False, complex=complex_, tied=True, init=INIT, generator=generator
                )
            )
        self.perms = nn.ModuleList(perms)
        self.butterflies = nn.ModuleList(bflys)
        self.register_buffer("perm", bit_reversal(n))

    def _permute(self, block: int, x: torch.Tensor) -> torch.Tensor:
        if not self.learned:
            return x.index_select(1, self.perm)
        cache = self.__dict__.get("_perm_plans")
        if cache is None:  # layers pickled before the cache existed
            cache = self._perm_plans = PermutationPlanCache()
        return relaxed_permutation(self.perms[block], x, cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        for block, bfly in enumerate(self.butterflies):
            x = bfly(self._permute(block, x))
        return x.real if x.is_complex() else x

    def materialised(self, x: torch.Tensor) -> torch.Tensor:
        """x (B_k P_k ... B_1 P_1)^T, real part, with each block an n x n matrix built in O(n^2)."""
        for block in range(self.nblocks):
            bp = self._block_matrix(block)
            x = (x if bp.is_complex() == x.is_complex() else x.to(bp.dtype)) @ bp.T
        return x.real if x.is_complex() else x

    def _block_matrix(self, block: int) -> torch.Tensor:
        """B_k P_k as an n x n matrix (complex for complex layers), O(n^2) (tied_bp_matrix)."""
        tw = self.butterflies[block].twiddle_tensor()[0]
        if self.learned:
            return tied_bp_matrix(tw, self.perms[block].probs())  # soft P, as forward
        # (P x)[i] = x[perm[i]], so column perm[i] of B P is column i of B
        return tied_bp_matrix(tw, None)[:, torch.argsort(self.perm)]

    def matrix(self) -> torch.Tensor:
        """Re of the product, O(n^2) per block (tied_bp_matrix) plus one n^3 product."""
        mat: torch.Tensor | None = None
        for block in range(self.nblocks):
            bp = self._block_matrix(block)
            mat = bp if mat is None else bp @ mat
        assert mat is not None
        return mat.real if mat.is_complex() else mat

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, nblocks={self.nblocks}, complex={self.complex}, "
            f"learned_permutation={self.learned}"
        )


class ButterflyUntied(StructuredLayer):
    """One untied real butterfly (increasing stride, m = log2 n levels of n/2 2x2 blocks):
    2 n log2(n) parameters; W = B_{m-1} ... B_0 (kernels.reference layout). Init "ortho".

    `from_matrix(W)` sets the twiddle to kernels.factorize.hierarchical_butterfly(W), exact
    when W is a butterfly matrix: the "train dense, project, fine-tune" baseline.
    """

    def __init__(self, n: int, generator: torch.Generator | None = None):
        super().__init__(check_size(n, power_of_two=True))
        self.butterfly = Butterfly(
            n, n, bias=False, complex=False, tied=False, nblocks=1, init=INIT, generator=generator
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.butterfly(x)

    def matrix(self) -> torch.Tensor:
        # the multiply on the identity's rows gives W^T in O(n^2 log n); the explicit factor
        # product kernels.reference.butterfly_dense is the tests' independent check
        eye = torch.eye(self.n, dtype=self.butterfly.twiddle.dtype)
        return butterfly_multiply(self.butterfly.twiddle, eye).T

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> ButterflyUntied:
        """The hierarchical butterfly projection of a real matrix (n, n), in its dtype."""
        if matrix.is_complex():
            raise ValueError("ButterflyUntied is real: got a complex matrix")
        layer = cls(matrix.shape[0]).to(matrix.dtype)
        with torch.no_grad():
            layer.butterfly.twiddle.copy_(hierarchical_butterfly(matrix.detach()))
        return layer
