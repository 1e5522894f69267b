"""What a GPU run would break on, checked on gloo: host tensors in collectives, syncs.

* Loading pretrained weights into an unpartitioned base (ZeRO stage 0/1/2) made
  rank 0 ``dist.broadcast`` host (CPU) tensors; an NCCL-only process group has
  no backend for them ("No backend type associated with device type cpu").
  Every rank now reads the memory-mapped files itself and the load makes no
  collective. The recorder declares the compute device ``cuda``; that NCCL
  accepts what remains can only be shown on GPUs (docs/gpu.md).
* The expert-parallel dispatch reads the device at most once per adapted linear
  per forward (the split sizes of its row all-to-all) and never in the backward;
  a CPU count of the Python-level reads (``tolist``, ``item``, ``int()``, ...).
  Reads hidden inside kernels (e.g. ``bincount`` on CUDA) are counted by the
  ``gpu``-marked test with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import _common as C
import pytest

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_paths")
    return C.launch(2, None, {"checks": ["load", "syncs"]}, out, timeout=300,
                    worker="_device_paths_worker.py")  # fmt: skip


def test_unpartitioned_load_makes_no_host_collective(results):
    for r, res in enumerate(results):
        assert res["load_equal"], f"rank {r}: weights differ from the file"
        assert not res["load_off_device"], (
            f"rank {r}: collectives on host tensors while the compute device is cuda: "
            f"{res['load_calls']}"
        )


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_ep_dispatch_sync_budget(results, mode):
    for r, res in enumerate(results):
        syncs = res["syncs"][mode]
        assert len(syncs["forward"]) <= 1, f"rank {r} {mode} forward: {syncs['forward']}"
        assert not syncs["backward"], f"rank {r} {mode} backward: {syncs['backward']}"
