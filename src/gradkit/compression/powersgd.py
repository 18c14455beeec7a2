"""PowerSGD (Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression
for Distributed Optimization").

Each gradient matrix M (n x m, a weight reshaped to its first dim) is sent as
two thin factors: P = M·Q (n x r), all-reduced and orthonormalized to P̂, then
Q = Mᵀ·P̂ (m x r), all-reduced; the rank receives P̂·Qᵀ. One power-iteration
step per training step, warm-started from the previous Q. Error feedback is
built in: what the rank's own approximation P̂·(MᵀP̂)ᵀ missed is added to the
next step. Vectors and matrices that rank r would not shrink go uncompressed
(all-reduced with the first factor). A rank-r matrix is reconstructed exactly.
"""

from __future__ import annotations

import datetime
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradkit import _checks
from gradkit.compression.base import Compressor, Deferred, Payload
from gradkit.compression.keyed_state import KeyedState, Layout, check_named_tensors, layout_for, named_fields, sizes
from gradkit.distributed import PendingReduce

__all__ = ["PowerSGD"]


class PowerSGD(Compressor):
    """Low-rank compression with warm start and error feedback.

    Args:
        rank: r, the rank of the approximation (paper: 1 to 4).
        warm_start: start each power iteration from the previous Q (the paper's
            default); False draws a fresh Q every step.
        seed: seed of the initial Q, shared by all ranks.

    Memory: one residual as large as the gradients, plus Q (m x r) per matrix.

    Example:
        >>> pipe = gk.GradientPipeline(model, average=gk.Average(gk.PowerSGD(rank=2)))
    """

    keeps_residual = True
    keyed = True

    def __init__(self, rank: int = 1, *, warm_start: bool = True, seed: int = 0) -> None:
        self.rank = _checks.positive_int("rank", rank, "pass the rank of the approximation, e.g. 2")
        self.warm_start = _checks.flag("warm_start", warm_start, "pass warm_start=True (the paper's default) or False")
        self.seed = _checks.non_negative_int("seed", seed, "pass any integer >= 0 shared by all ranks")
        self._residuals = KeyedState(["residual"])
        self._q: dict[str, Tensor] = {}
        self._deferred: Deferred[tuple[Tensor, Tensor, dict[str, Tensor]]] = Deferred(self._keep)

    # -- single process ---------------------------------------------------------

    def compress(self, tensor: Tensor, key: str | Layout | None = None, *, commit: bool = True) -> Payload:
        """Compress one tensor (no communication); key names its residual and Q."""
        tensor = self._check_input(tensor)
        pending = self.start_reduce(tensor.reshape(-1), layout_for(key, tensor), None, 1.0, "PowerSGD", None)
        approximation = pending.wait()
        if commit:
            self.commit()
        return Payload([approximation], tensor.shape, tensor.dtype, self, wire_nbytes=pending.nbytes)

    def decompress(self, payload: Payload) -> Tensor:
        payload = self._check_payload(payload)
        return payload.tensors[0].view(payload.shape)

    # -- across ranks (used by gk.Average) --------------------------------------

    def start_reduce(  # type: ignore[override]  # Compressor's optional hook, here a method
        self,
        flat: Tensor,
        layout: Layout,
        group: dist.ProcessGroup | None,
        weight: Tensor | float,
        what: str,
        timeout: datetime.timedelta | None,
    ) -> PendingReduce:
        """Start compressing and summing `flat` over `group` (None: this process only): the first
        factor's all-reduce now, the second when `wait()` orthonormalizes the first."""
        residual = self._residuals.get(layout, flat)["residual"]
        corrected = flat + residual
        pieces = corrected.split(sizes(layout))
        matrices: list[tuple[str, Tensor, Tensor]] = []  # (name, M, Q)
        dense: list[Tensor] = []
        for (name, shape), piece in zip(layout, pieces):
            matrix = self._as_matrix(piece, shape)
            if matrix is None:
                dense.append(piece)
            else:
                matrices.append((name, matrix, self._q_for(name, matrix)))
        w = weight.to(corrected) if isinstance(weight, Tensor) else weight
        first = (
            torch.cat([(m @ q).reshape(-1) * w for _, m, q in matrices] + [d * w for d in dense])
            if (matrices or dense)
            else corrected.new_zeros(0)
        )
        works = [] if group is None else [dist.all_reduce(first, group=group, async_op=True)]
        nbytes = (
            first.numel() * first.element_size()
            + sum(m.shape[1] * self.rank for _, m, _ in matrices) * corrected.element_size()
        )

        def finish() -> Tensor:
            from gradkit import distributed

            p_sizes = [m.shape[0] * q.shape[1] for _, m, q in matrices]
            p_flat, dense_flat = first.split([sum(p_sizes), first.numel() - sum(p_sizes)])
            p_hats = [
                _orthonormal(p.view(m.shape[0], q.shape[1])) for p, (_, m, q) in zip(p_flat.split(p_sizes), matrices)
            ]
            local_q = [m.T @ p_hat for (_, m, _), p_hat in zip(matrices, p_hats)]
            summed_q = torch.cat([(q * w).reshape(-1) for q in local_q]) if local_q else corrected.new_zeros(0)
            if group is not None and summed_q.numel():
                distributed.run(dist.all_reduce, f"{what} (PowerSGD second factor)", timeout, summed_q, group=group)
            q_sums = [q.view(lq.shape) for q, lq in zip(summed_q.split([lq.numel() for lq in local_q]), local_q)]
            # What this rank's own approximation missed stays behind (error feedback). Every
            # element of both is written below, straight from the matmuls (no clones, no temporaries).
            new_residual = torch.empty_like(corrected)
            out = torch.empty_like(corrected)
            matrix_iter = iter(zip(matrices, p_hats, local_q, q_sums))
            dense_iter = iter(dense_flat.split([d.numel() for d in dense]))
            offset = 0
            new_q: dict[str, Tensor] = {}
            for (name, shape), size in zip(layout, sizes(layout)):
                view = slice(offset, offset + size)
                offset += size
                if self._as_matrix(corrected[view], shape) is None:
                    out[view] = next(dense_iter)
                    new_residual[view] = 0
                    continue
                (_, m, _), p_hat, lq, qs = next(matrix_iter)
                torch.mm(p_hat, qs.T, out=out[view].view(m.shape))
                torch.addmm(m, p_hat, lq.T, beta=1, alpha=-1, out=new_residual[view].view(m.shape))
                new_q[name] = qs
            self._deferred.add(residual, new_residual, new_q)
            return out

        return PendingReduce(works, finish, nbytes, what, timeout)

    def _keep(self, residual: Tensor, new_residual: Tensor, new_q: dict[str, Tensor]) -> None:
        residual.copy_(new_residual)
        if self.warm_start:
            self._q.update({name: q.clone() for name, q in new_q.items()})

    def _as_matrix(self, piece: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        """The matrix view of a parameter, or None when rank r would not shrink it."""
        if len(shape) < 2 or piece.numel() == 0:
            return None
        n = shape[0]
        m = piece.numel() // n
        if self.rank * (n + m) >= n * m:
            return None
        return piece.view(n, m)

    def _q_for(self, name: str, matrix: Tensor) -> Tensor:
        q = self._q.get(name) if self.warm_start else None
        if q is None or q.shape != (matrix.shape[1], self.rank):
            # Same seed and name on every rank: the same starting Q everywhere.
            generator = torch.Generator().manual_seed(self.seed * 7919 + zlib.crc32(name.encode()))
            q = torch.randn(matrix.shape[1], self.rank, generator=generator, dtype=torch.float64)
        return q.to(matrix)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": self._residuals.state_dict()["residual"], "q": {k: v.clone() for k, v in self._q.items()}}

    def named_state(self, state: object) -> list[tuple[str, Any, bool]]:
        # Q is kept for the matrices that rank r shrinks, and only with a warm start.
        return named_fields(state, residuals=True, q=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checks.state_keys("PowerSGD", state, {"residuals", "q"})
        q = state["q"]
        if not isinstance(q, dict) or not all(
            isinstance(v, Tensor) and v.ndim == 2 and v.shape[1] == self.rank for v in q.values()
        ):
            raise ValueError(
                f"PowerSGD.load_state_dict: 'q' must map names to (m, {self.rank}) tensors; "
                "build PowerSGD with the rank it was saved with"
            )
        check_named_tensors("PowerSGD", "residuals", state["residuals"])
        self._residuals.load_state_dict({"residual": state["residuals"]}, "PowerSGD")
        self._q = {k: v.clone() for k, v in q.items()}
        self.discard()  # deferred state belongs to the state just replaced


def _orthonormal(p: Tensor) -> Tensor:
    """Orthonormal columns spanning P's columns (reduced QR)."""
    return torch.linalg.qr(p if p.dtype in (torch.float32, torch.float64) else p.float()).Q.to(p.dtype)
