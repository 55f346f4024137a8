"""Flat parameter buckets.

Parameters are moved into a few large contiguous tensors ("buckets") and become views into them, so one
collective moves many parameters and one kernel scales or mixes them. One set of buckets per
(device, dtype): mixed-precision and multi-device models keep each parameter in its own dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from loguru import logger

__all__ = ["Bucket", "build_buckets", "describe_params", "check_views", "check_bucket_cap", "check_params"]

# Every parameter starts on a 128-byte boundary inside its bucket, so vectorised kernels and the
# communication library see aligned data; the padding stays zero and averages to zero.
_ALIGN_BYTES = 128


@dataclass
class Bucket:
    """A flat tensor whose slices are the storage of ``params``."""

    flat: torch.Tensor
    params: list[torch.Tensor] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    # Holds only parameters with requires_grad=False: not communicated until one of them is thawed.
    frozen: bool = False
    # Holds only matrices that travel as low-rank factors (see config.LowRank).
    lowrank: bool = False
    # Each parameter's data pointer as bucketed: a parameter whose pointer changed left its bucket.
    pointers: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def _aligned(numel: int, element_size: int) -> int:
    step = max(1, _ALIGN_BYTES // element_size)
    return (numel + step - 1) // step * step


def check_bucket_cap(bucket_cap_mb: object, name: str = "bucket_cap_mb") -> None:
    """``ValueError`` unless ``bucket_cap_mb`` is a number > 0 (``inf``: one bucket per device and dtype)."""
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
        raise ValueError(f"Invalid {name}={bucket_cap_mb!r}. Must be a number > 0.")


def check_params(params: Iterable[torch.Tensor]) -> None:
    """``ValueError`` for the first parameter that cannot be bucketed, named by its position."""
    for i, p in enumerate(params):
        _check_param(p, f" (parameter {i} of the optimizer, counted over its param_groups)")


def _check_param(p: torch.Tensor, where: str = "") -> None:
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"Invalid parameter{where} of type {type(p).__name__}; the optimizer must hold tensors.")
    if not (p.is_floating_point() or p.is_complex()):
        raise ValueError(f"Invalid parameter{where} of shape {tuple(p.shape)} and dtype {p.dtype}: only floating-point "
                         "parameters can be averaged. Keep integer and boolean tensors out of the optimizer (register "
                         "them as buffers: module.register_buffer).")
    if p.is_sparse or p.layout != torch.strided:
        raise ValueError(f"Invalid parameter{where} with layout {p.layout}; only dense (strided) parameters can be "
                         "bucketed.")
    if not p.is_leaf:
        raise ValueError(f"Invalid parameter{where}: it is not a leaf tensor, so it cannot be moved into a bucket.")
    if p.device.type == "meta":
        raise ValueError(f"Invalid parameter{where} of shape {tuple(p.shape)} on the meta device: it has no values to "
                         "average. Materialise the model (e.g. model.to_empty(device=...) and initialise it) "
                         "before wrapping its optimizer.")


def _dense_strides(p: torch.Tensor) -> tuple[int, ...] | None:
    """``p``'s strides if its elements cover a dense block in some dimension order (channels_last, a transpose),
    so that its bucket view can keep its memory format; ``None`` for anything else (then: contiguous)."""
    expected = 1
    for d in sorted(range(p.dim()), key=lambda d: (p.stride(d), p.size(d))):
        if p.size(d) == 1:
            continue
        if p.stride(d) != expected:
            return None
        expected *= p.size(d)
    return tuple(p.stride())


@torch.no_grad()
def build_buckets(params: Iterable[torch.Tensor], bucket_cap_mb: float,
                  lowrank: Callable[[torch.Tensor], bool] | None = None) -> list[Bucket]:
    """Move ``params`` into flat buckets of at most ``bucket_cap_mb`` MiB (a larger parameter gets its own).

    Values are copied exactly and each parameter's ``.data`` becomes a view into its bucket, so the
    ``Parameter`` objects (and the optimizer state keyed by them) stay the same. A tensor listed twice is
    bucketed once. Order follows first appearance, so every rank with the same model builds the same layout.
    Parameters for which ``lowrank`` says so get buckets of their own (they travel as low-rank factors).
    """
    check_bucket_cap(bucket_cap_mb)
    cap_bytes = bucket_cap_mb * 1024 * 1024

    # Frozen parameters get buckets of their own, so that they cost no communication while frozen.
    by_key: dict[tuple[torch.device, torch.dtype, bool, bool], list[torch.Tensor]] = {}
    seen: set[int] = set()
    for p in params:
        _check_param(p)
        if id(p) in seen:
            continue
        seen.add(id(p))
        low = lowrank is not None and lowrank(p)
        by_key.setdefault((p.device, p.dtype, not p.requires_grad, low), []).append(p)

    buckets: list[Bucket] = []
    for (device, dtype, frozen, low), group in by_key.items():
        esize = torch.empty((), dtype=dtype).element_size()
        chunk: list[torch.Tensor] = []
        chunk_elems = 0
        for p in group:
            size = _aligned(p.numel(), esize)
            if chunk and (chunk_elems + size) * esize > cap_bytes:
                buckets.append(_make_bucket(chunk, device, dtype, esize, frozen, low))
                chunk, chunk_elems = [], 0
            chunk.append(p)
            chunk_elems += size
        if chunk:
            buckets.append(_make_bucket(chunk, device, dtype, esize, frozen, low))

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0  # the global rank
    for i, b in enumerate(buckets):
        logger.debug(
            "rank {}: bucket {}: {} params, {} elements ({:.2f} MiB), {} on {}{}",
            rank, i, len(b.params), b.flat.numel(), b.nbytes / 2**20, b.flat.dtype, b.flat.device,
            " (frozen)" if b.frozen else "",
        )
    return buckets


def _make_bucket(chunk: list[torch.Tensor], device: torch.device, dtype: torch.dtype, esize: int,
                 frozen: bool, lowrank: bool = False) -> Bucket:
    total = sum(_aligned(p.numel(), esize) for p in chunk)
    flat = torch.zeros(total, dtype=dtype, device=device)
    bucket = Bucket(flat, frozen=frozen, lowrank=lowrank)
    offset = 0
    for p in chunk:
        strides = _dense_strides(p) if p.numel() > 0 else None
        if strides is None:
            view = flat.narrow(0, offset, p.numel()).view(p.shape)
        else:  # keep the memory format (channels_last kernels stay fast; strides users rely on stay the same)
            view = flat.as_strided(p.shape, strides, offset)
        view.copy_(p.data)
        p.data = view
        bucket.params.append(p)
        bucket.offsets.append(offset)
        bucket.pointers.append(p.data_ptr())
        offset += _aligned(p.numel(), esize)
    return bucket


def describe_params(params: Iterable[torch.Tensor]) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """What the bucket layout depends on, per parameter (dtype, device type, shape, trainable): equal on ranks
    that hold the same model in the same order."""
    return [(str(p.dtype), p.device.type, tuple(p.shape), p.requires_grad) for p in params]


_data_ptr = torch.Tensor.data_ptr


def check_views(buckets: list[Bucket]) -> tuple[int, int] | None:
    """The first parameter (bucket index, position) that is no longer a view into its bucket, or ``None``.

    ``model.double()``, ``model.to(...)``, ``model.to_empty(...)`` or ``p.data = ...`` after wrapping give a
    parameter new storage: it would silently stop being averaged. Comparing data pointers with the ones
    recorded at bucketing is one C call per parameter.
    """
    for bi, b in enumerate(buckets):
        if list(map(_data_ptr, b.params)) != b.pointers:
            for pi, (p, ptr) in enumerate(zip(b.params, b.pointers)):
                if p.data_ptr() != ptr:
                    return bi, pi
    return None
