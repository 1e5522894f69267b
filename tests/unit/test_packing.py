"""Sequence packing: the packer, the packed sampler/loader (resume, ranks), the collator."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from loramoe_ds.data import (
    IGNORE_INDEX,
    DataConfig,
    PackedCollator,
    PackedDistributedSampler,
    PackedRows,
    ResumableDistributedSampler,
    StatefulLoader,
    build_dataloader,
    load_tokenized,
    pack_first_fit_decreasing,
    padding_stats,
)
from loramoe_ds.tiny import tiny_sp_tokenizer as tiny_tokenizer


# ----------------------------------------------------------------------------- packer
def _reference_ffd(order, lengths, max_length, window):
    """Plain-loop first-fit-decreasing per window (no numpy)."""
    rows = []
    for start in range(0, len(order), window):
        chunk = list(order[start : start + window])
        chunk = sorted(chunk, key=lambda i: (-lengths[i], chunk.index(i)))
        win, free = [], []
        for i in chunk:
            for r in range(len(win)):
                if free[r] >= lengths[i]:
                    win[r].append(i)
                    free[r] -= lengths[i]
                    break
            else:
                win.append([i])
                free.append(max_length - lengths[i])
        rows += win
    return rows


def _lengths(n: int, max_length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(max_length, max(1, int(rng.lognormvariate(3.0, 1.0)))) for _ in range(n)]


def test_hand_example() -> None:
    lengths = [3, 5, 2, 8, 4, 1, 3]
    # Longest first: #3 (8), #1 (5), #4 (4), #0 (3), #6 (3), #2 (2), #5 (1) into rows of 8:
    # #3 opens row 0 (full); #1 row 1; #4 row 2; #0 fills row 1; #6 joins row 2 (room 1);
    # #2 fits nowhere: row 3; #5 fills row 2.
    rows = pack_first_fit_decreasing(range(7), lengths, max_length=8, window=7)
    assert rows == [[3], [1, 0], [4, 6, 5], [2]]
    assert pack_first_fit_decreasing(range(7), lengths, 8, window=1) == [[i] for i in range(7)]


@pytest.mark.parametrize("window", [1, 7, 64, 10_000])
def test_packer_matches_plain_loop_and_is_first_fit(window: int) -> None:
    max_length = 96
    lengths = _lengths(500, max_length)
    order = list(range(500))
    random.Random(1).shuffle(order)
    rows = pack_first_fit_decreasing(order, lengths, max_length, window)
    assert rows == pack_first_fit_decreasing(order, lengths, max_length, window)  # deterministic
    assert rows == _reference_ffd(order, lengths, max_length, window)
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(500))  # no record lost or duplicated
    assert all(sum(lengths[i] for i in r) <= max_length for r in rows)
    # First fit: a record placed in row j did not fit in any earlier row of its window
    # (a row's room only shrinks, so its final room is smaller than that record).
    pos = {i: k for k, i in enumerate(order)}
    for j, row in enumerate(rows):
        w = pos[row[0]] // window
        for i_row in rows[:j]:
            if pos[i_row[0]] // window != w:
                continue
            room = max_length - sum(lengths[i] for i in i_row)
            assert all(lengths[i] > room for i in row)
    # Rows stay inside their window.
    assert all(len({pos[i] // window for i in r}) == 1 for r in rows)


def test_packer_rejects_too_long() -> None:
    with pytest.raises(ValueError, match="record 1 has 9 tokens"):
        pack_first_fit_decreasing([0, 1], [3, 9], max_length=8)
    with pytest.raises(ValueError, match="window"):
        pack_first_fit_decreasing([0], [3], max_length=8, window=0)


# ----------------------------------------------------------------------------- sampler
def _rows_of(sampler: PackedDistributedSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_sampler_ranks_disjoint_equal_cover(world: int) -> None:
    lengths = _lengths(300, 64)
    parts = [
        _rows_of(PackedDistributedSampler(lengths, 64, world, r, seed=5), 2) for r in range(world)
    ]
    full = PackedDistributedSampler(lengths, 64, 1, 0, seed=5).rows(2)
    assert all(len(p) == len(full) // world for p in parts)
    flat = [i for p in parts for row in p for i in row]
    assert len(set(flat)) == len(flat)
    tail = [i for row in full[len(full) // world * world :] for i in row]
    assert sorted(flat + tail) == list(range(300))  # only the len(rows) % W tail is unseen
    # Rank r takes r::W of the global rows; the global rows are the packing of the
    # unpacked sampler's permutation, rows then shuffled.
    assert parts[-1] == full[world - 1 : len(full) // world * world : world]
    perm = ResumableDistributedSampler(300, 1, 0, seed=5).indices(2)
    packed = pack_first_fit_decreasing(perm, lengths, 64)
    assert sorted(map(tuple, full)) == sorted(map(tuple, packed))


def test_packed_sampler_deterministic_reshuffled() -> None:
    lengths = _lengths(300, 64)
    a = _rows_of(PackedDistributedSampler(lengths, 64, 2, 1, seed=5), 3)
    assert a == _rows_of(PackedDistributedSampler(lengths, 64, 2, 1, seed=5), 3)
    assert a != _rows_of(PackedDistributedSampler(lengths, 64, 2, 1, seed=5), 4)
    assert a != _rows_of(PackedDistributedSampler(lengths, 64, 2, 1, seed=6), 3)
    ordered = PackedDistributedSampler(lengths, 64, 1, 0, shuffle=False).rows(0)
    assert ordered == pack_first_fit_decreasing(range(300), lengths, 64)


def test_packed_state_checks() -> None:
    lengths = _lengths(100, 64)
    packed = PackedDistributedSampler(lengths, 64, 2, 0, seed=3)
    plain = ResumableDistributedSampler(100, 2, 0, seed=3)
    with pytest.raises(ValueError, match="packed"):
        plain.load_state_dict(packed.state_dict())
    with pytest.raises(ValueError, match="packed"):
        packed.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="max_length"):
        PackedDistributedSampler(lengths, 65, 2, 0, seed=3).load_state_dict(packed.state_dict())
    other = list(lengths)
    other[0] = other[0] % 64 + 1 if other[0] != 64 else 63
    with pytest.raises(ValueError, match="lengths_digest"):
        PackedDistributedSampler(other, 64, 2, 0, seed=3).load_state_dict(packed.state_dict())
    with pytest.raises(ValueError, match="fewer than 4 ranks"):
        PackedDistributedSampler([60, 60, 60], 64, 4, 0)


# ----------------------------------------------------------------------------- loader resume
class _Toy(torch.utils.data.Dataset):
    """Record i: tokens ``[1000*i + k]``, ``1 + (7*i) % 13`` long, prompt 1 token."""

    def __len__(self) -> int:
        return 97

    def __getitem__(self, i: int) -> dict:
        n = 1 + (7 * i) % 13
        return {"input_ids": [1000 * i + k for k in range(n)], "prompt_len": 1, "task_type": i % 2}


def _toy_loader(rank: int, workers: int = 0) -> StatefulLoader:
    ds = _Toy()
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    s = PackedDistributedSampler(lengths, 16, 2, rank, seed=11, window=32)
    return StatefulLoader(PackedRows(ds), s, 2, PackedCollator(0), num_workers=workers)


def _records(batch: dict) -> list[list[int]]:
    """Record ids of each row of a packed toy batch, from seq_ids and input_ids."""
    out = []
    for ids, seq in zip(batch["input_ids"].tolist(), batch["seq_ids"].tolist()):
        out.append([ids[t] // 1000 for t in range(len(ids)) if seq[t] >= 0 and ids[t] % 1000 == 0])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_loader_resume_equals_uninterrupted_two_ranks(workers: int) -> None:
    for rank in (0, 1):
        ref = _toy_loader(rank)
        uninterrupted = [_records(b) for _ in range(3) for b in ref]
        first = _toy_loader(rank, workers)
        got = [_records(b) for b in first]  # epoch 0
        n1 = len(first)  # epoch 1's batches (rows can differ per epoch)
        it = iter(first)
        k = n1 // 2
        got += [_records(next(it)) for _ in range(k)]  # workers prefetch beyond k
        state = first.state_dict()
        del it
        assert state["epoch"] == 1 and state["position"] == 2 * k and state["packed"]
        resumed = _toy_loader(rank, workers)
        resumed.load_state_dict(state)
        got += [_records(b) for b in resumed]
        assert resumed.epoch == 2
        got += [_records(b) for b in resumed]
        assert got == uninterrupted
    # Both ranks run the same number of micro-batches, on disjoint records.
    a, b = _toy_loader(0), _toy_loader(1)
    ra = [i for x in a for row in _records(x) for i in row]
    rb = [i for x in b for row in _records(x) for i in row]
    assert len(a) == len(b) and not set(ra) & set(rb)


# ----------------------------------------------------------------------------- collator
def test_packed_collator_hand_built() -> None:
    rows = [
        [
            {"input_ids": [11, 12, 13, 14], "prompt_len": 2, "task_type": 1},
            {"input_ids": [21, 22, 23], "prompt_len": 1, "task_type": 0},
        ],
        [{"input_ids": [31, 32, 33], "prompt_len": 2, "task_type": 0}],
    ]
    b = PackedCollator(pad_token_id=0)(rows)
    assert set(b) == {
        "input_ids",
        "attention_mask",
        "labels",
        "position_ids",
        "seq_ids",
        "task_type",
    }
    assert all(v.shape == (2, 7) and v.dtype == torch.long for v in b.values())
    assert b["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23], [31, 32, 33, 0, 0, 0, 0]]
    X = IGNORE_INDEX
    assert b["labels"].tolist() == [[X, X, 13, 14, X, 22, 23], [X, X, 33, X, X, X, X]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    assert b["seq_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, -1, -1, -1, -1]]
    assert b["task_type"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    # A record's first token is never a target, even with prompt_len 0.
    b0 = PackedCollator(0)([[{"input_ids": [5, 6], "prompt_len": 0, "task_type": 0}] * 2])
    assert b0["labels"].tolist() == [[X, 6, X, 6]]
    b8 = PackedCollator(0, pad_to_multiple_of=8)(rows)
    assert b8["input_ids"].shape == (2, 8) and b8["position_ids"][0].tolist()[-1] == 0
    # Flash-attention varlen kwargs over the flattened 2*7 tokens: records 4, 3 | 3, pad 4.
    fa = PackedCollator(0, flash_attn_kwargs=True)(rows)
    assert fa["cu_seq_lens_q"].tolist() == [0, 4, 7, 10, 14] == fa["cu_seq_lens_k"].tolist()
    assert fa["cu_seq_lens_q"].dtype == torch.int32
    assert fa["max_length_q"] == fa["max_length_k"] == 4
    assert all(torch.equal(fa[k], b[k]) for k in b)


# ----------------------------------------------------------------------------- pipeline
def _write_records(path: Path, n: int) -> Path:
    rng = random.Random(0)
    words = "apple pear fig plum river stone cloud Paris France capital sum".split()
    with path.open("w") as f:
        for i in range(n):
            out = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
            rec = {"instruction": f"Repeat {i}.", "output": out, "task_type": i % 2}
            f.write(json.dumps(rec) + "\n")
    return path


def test_build_dataloader_packing(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    path = _write_records(tmp_path / "d.jsonl", 60)
    cfg = DataConfig(max_length=96, cache_dir=str(tmp_path / "cache"), packing=True, seed=2)
    ds, _ = load_tokenized(path, tok, cfg)
    by_ids = {tuple(ds[i]["input_ids"]): ds[i] for i in range(len(ds))}
    seen = []
    for rank in (0, 1):
        loader = build_dataloader(path, tok, cfg, batch_size=2, rank=rank, world_size=2)
        for b in loader:
            assert b["input_ids"].shape[1] <= 96 and b["task_type"].shape == b["seq_ids"].shape
            for r in range(2):
                seq, ids = b["seq_ids"][r], b["input_ids"][r]
                for j in range(int(seq.max()) + 1):
                    sel = seq == j
                    rec = by_ids[tuple(ids[sel].tolist())]  # each segment is one whole record
                    assert b["position_ids"][r][sel].tolist() == list(range(int(sel.sum())))
                    assert (b["task_type"][r][sel] == rec["task_type"]).all()
                    lab = b["labels"][r][sel]
                    P = rec["prompt_len"]
                    assert (lab[:P] == IGNORE_INDEX).all() and lab[P:].tolist() == ids[sel][
                        P:
                    ].tolist()
                    seen.append(tuple(ids[sel].tolist()))
    assert len(seen) == len(set(seen))
    pad = loader.padding
    assert pad.packed_fraction < pad.padded_fraction
    # The reported fractions are those of the loader's actual epoch-0 batches.
    plain = build_dataloader(
        path, tok, DataConfig(**{**cfg.__dict__, "packing": False}), batch_size=2, world_size=1
    )
    one = build_dataloader(path, tok, cfg, batch_size=2, world_size=1)
    tok_pos = [(int(b["attention_mask"].sum()), b["input_ids"].numel()) for b in plain]
    assert plain.padding.padded_fraction == pytest.approx(
        1 - sum(t for t, _ in tok_pos) / sum(p for _, p in tok_pos)
    )
    tok_pos = [(int(b["attention_mask"].sum()), b["input_ids"].numel()) for b in one]
    assert one.padding.packed_fraction == pytest.approx(
        1 - sum(t for t, _ in tok_pos) / sum(p for _, p in tok_pos)
    )


def test_padding_stats_formula() -> None:
    lengths = np.array([4, 2, 3, 1, 5, 5])
    st = padding_stats(
        lengths, [0, 1, 2, 3, 4, 5], [[0, 1], [4, 3], [2], [5]], world_size=1, batch_size=2
    )
    # padded batches: (4,2)->8, (3,1)->6, (5,5)->10: 20 tokens in 24 positions
    assert (st.tokens, st.padded_positions) == (20, 24)
    # packed rows 6,6 -> 12; 3,5 -> 10: 20 tokens in 22 positions
    assert (st.packed_tokens, st.packed_positions, st.packed_records) == (20, 22, 6)
    assert st.packed_fraction == pytest.approx(2 / 22)


# ----------------------------------------------------------------------------- model equality
def _equality_records(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(3, 23, (1,), generator=g))
        P = int(torch.randint(1, L, (1,), generator=g))
        ids = torch.randint(1, 128, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "prompt_len": P, "task_type": (i * 7 // 3) % 2})
    return out


def _loss_and_grads(model, batch: dict) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    keys = ["loss", "lm_loss", "lbc_loss", "load_balance_loss", "z_loss"]
    if model.cfg.router_supervision_coef > 0:
        keys.append("router_supervision_loss")
    losses = {k: getattr(out, k).detach().clone() for k in keys}
    losses["num_label_tokens"] = torch.tensor(float(out.num_label_tokens))
    grads = {n: p.grad.detach().clone() for n, p in model.adapter_named_parameters()}
    return losses, grads


NULL_SUP = {"null_experts": 2, "router_supervision_coef": 0.5}


@pytest.mark.parametrize(
    "arch,router,attn,lbc_variant,extra",
    [
        ("llama", "soft", "sdpa", "published", {}),
        ("llama", "topk", "sdpa", "intended", {}),
        ("llama", "soft", "eager", "intended", {}),
        ("qwen2", "soft", "sdpa", "intended", {}),
        ("qwen2", "topk", "sdpa", "published", {}),
        ("qwen2", "topk", "eager", "published", {}),
        ("llama", "soft", "sdpa", "intended", NULL_SUP),
        ("qwen2", "topk", "sdpa", "intended", NULL_SUP),
    ],
)
def test_packed_batch_equals_padded_batch(
    arch: str, router: str, attn: str, lbc_variant: str, extra: dict
):
    """Loss, every aux loss and every adapter gradient: packed rows == one record per row.

    fp32, dropout 0, LBC on with both task types, load-balance and z losses on (and
    null experts with router supervision where ``extra`` says). The reference is the
    ordinary right-padded batch of the same 10 records.
    """
    from loramoe_ds.config import AdapterConfig
    from loramoe_ds.data import Collator
    from loramoe_ds.model.inject import inject
    from loramoe_ds.tiny import tiny_model

    cfg = AdapterConfig(
        router=router,
        num_experts=4,
        top_k=2,
        rank=4,
        alpha=8.0,
        dropout=0.0,
        lbc_beta=0.5,
        lbc_delta=0.2,
        load_balance_coef=0.3,
        z_loss_coef=0.01,
        target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"),
        lbc_variant=lbc_variant,
        **extra,
    )
    base = tiny_model(arch, seed=3)
    base.set_attn_implementation(attn)
    model = inject(base, cfg)
    model.train()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-zero LoRA B so that every adapter weight gets a gradient
        for _, p in model.adapter_named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    records = _equality_records(10, seed=5)
    assert {r["task_type"] for r in records} == {0, 1}
    rows = pack_first_fit_decreasing(range(10), [len(r["input_ids"]) for r in records], 40)
    assert len(rows) < 10 and max(len(r) for r in rows) >= 3  # really packed, padding left
    packed = PackedCollator(0)([[records[i] for i in row] for row in rows])
    assert (packed["seq_ids"] < 0).any()
    padded = Collator(0)(records)

    ref_l, ref_g = _loss_and_grads(model, padded)
    got_l, got_g = _loss_and_grads(model, packed)
    if attn == "sdpa":  # the flash-attention kwargs are ignored off flash attention
        fa_l, _ = _loss_and_grads(
            model,
            PackedCollator(0, flash_attn_kwargs=True)([[records[i] for i in row] for row in rows]),
        )
        assert fa_l["loss"] == got_l["loss"]
    assert ref_l["num_label_tokens"] == got_l["num_label_tokens"]
    for k in ref_l:
        assert ref_l[k] > 0, k  # every term is really on
        torch.testing.assert_close(got_l[k], ref_l[k], rtol=1e-5, atol=1e-6, msg=k)
    assert ref_g.keys() == got_g.keys() and len(ref_g) > 0
    for n in ref_g:
        assert ref_g[n].abs().max() > 0, n
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-5, atol=1e-6, msg=n)
