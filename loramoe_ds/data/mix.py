"""Weighted dataset mixes: each epoch's record order, with fixed per-dataset quotas.

A mix of D datasets (sizes ``n_d``, records stored back to back, dataset ``d`` at
offset ``sum(n_<d)``) with weights ``w_d`` has epochs of ``N = sum(n_d)`` draws.
Dataset ``d`` gets the quota ``c_d``: ``N * w_d / sum(w)`` rounded by largest
remainder (ties to the lower index), so the quotas sum to ``N`` and every epoch
has exactly the weights' share, whatever the seed.

Draws from a dataset follow its own endless stream: pass ``p`` over the
dataset is a permutation of ``range(n_d)`` seeded by ``(seed, d, p)`` (the
identity without shuffling), passes back to back; epoch ``e`` takes the stream
items ``[e * c_d, (e+1) * c_d)``. A down-weighted dataset is thus walked through
over several epochs without repeats, an up-weighted one repeated as whole passes.
The epoch's order is the concatenation of the datasets' draws, shuffled by a
generator seeded ``seed + epoch`` (the sampler's own epoch generator). The
order is a list of record indices, so everything the sampler does with a
permutation (rank striding, global batches, the global data position on resume,
packing) applies to it unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def quotas(weights: Sequence[float], total: int) -> list[int]:
    """Largest-remainder integer shares of ``total`` proportional to ``weights``."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    order = sorted(range(len(w)), key=lambda d: (-(exact[d] - base[d]), d))
    for d in order[:rest]:
        base[d] += 1
    return [int(x) for x in base]


def _stream_seed(seed: int, d: int, p: int) -> int:
    h = hashlib.blake2b(f"{seed}:{d}:{p}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Mix:
    """Sizes and weights of the datasets of a mix (module docstring).

    Args:
        sizes: Records of each dataset, in storage order (all ``>= 1``).
        weights: Relative sampling weights (all ``> 0``).
    """

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.weights) or not self.sizes:
            raise ValueError(f"mix: {len(self.sizes)} sizes but {len(self.weights)} weights")
        if min(self.sizes) < 1:
            raise ValueError(f"mix: dataset sizes {list(self.sizes)}: every dataset needs a record")
        if min(self.weights) <= 0:
            raise ValueError(f"mix: weights {list(self.weights)} must all be > 0")

    @property
    def total(self) -> int:
        """Draws per epoch (the number of records)."""
        return sum(self.sizes)

    @property
    def quotas(self) -> list[int]:
        """Draws of each dataset per epoch."""
        return quotas(self.weights, self.total)

    @property
    def digest(self) -> str:
        """Identity of the mix (sizes and weights) for a resume check."""
        text = repr((self.sizes, tuple(float(w) for w in self.weights)))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def draws(self, d: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        """Local indices of dataset ``d`` drawn in ``epoch``, in stream order."""
        n, c = self.sizes[d], self.quotas[d]
        start, stop = epoch * c, (epoch + 1) * c
        out = []
        for p in range(start // n, -(-stop // n)):
            if shuffle:
                g = torch.Generator().manual_seed(_stream_seed(seed, d, p))
                perm = torch.randperm(n, generator=g).numpy()
            else:
                perm = np.arange(n)
            lo, hi = max(start - p * n, 0), min(stop - p * n, n)
            out.append(perm[lo:hi])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def order(
        self, seed: int, epoch: int, shuffle: bool = True, g: torch.Generator | None = None
    ) -> list[int]:
        """The epoch's record order (global indices), length :attr:`total`.

        Args:
            seed: The sampler's base seed.
            epoch: The epoch.
            shuffle: Shuffle the draws (else datasets in order, streams unshuffled).
            g: The epoch generator to shuffle with (default: seeded ``seed + epoch``).
        """
        offsets = np.cumsum((0, *self.sizes[:-1]))
        parts = [offsets[d] + self.draws(d, seed, epoch, shuffle) for d in range(len(self.sizes))]
        flat = np.concatenate(parts).astype(np.int64)
        if shuffle:
            g = g or torch.Generator().manual_seed(seed + epoch)
            flat = flat[torch.randperm(len(flat), generator=g).numpy()]
        return flat.tolist()

    def dataset_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The dataset of each global record index."""
        bounds = np.cumsum(self.sizes)
        return np.searchsorted(bounds, np.asarray(indices), side="right")
