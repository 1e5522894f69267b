"""Experts per layer: an int, a per-layer list, or a MoLA pattern.

MoLA (Gao et al. 2024, arXiv 2402.08562) allocates a different number of LoRA
experts to different depths. A pattern string such as ``"2468"`` splits the
decoder layers into ``len(pattern)`` contiguous groups (bottom to top) and gives
every layer of group ``g`` ``int(pattern[g])`` experts.

Split rule (documented and tested): the groups differ in size by at most one
layer and the *lower* groups take the extra layers, exactly like
``numpy.array_split``. On 32 layers ``"2468"`` gives 8 layers each of 2, 4, 6, 8
experts; on 30 layers it gives 8, 8, 7, 7 layers.

Ints versus patterns (documented and tested): an int is always the number of
experts of *every* layer, and a pattern is always a string. YAML reads an
unquoted ``num_experts: 2468`` and the command line reads
``adapter.num_experts=2468`` as the int 2468, which was almost certainly meant
as the pattern. So an int of :data:`AMBIGUOUS_MIN_DIGITS` or more digits, all of
them 1-9, is rejected with a message showing both spellings: the pattern
``num_experts: "2468"`` (quoted in YAML; ``adapter.num_experts=2,4,6,8`` or a
name on the command line) or, for that many experts on every layer, a list with
one count per layer. Realistic uniform counts (6, 16, 64, 256, 1024) are
unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Named MoLA allocations (the paper's shapes, bottom layer group first).
NAMED_PATTERNS: dict[str, str] = {
    "rectangle": "5555",
    "triangle": "8642",
    "inverted_triangle": "2468",
    "hourglass": "8228",
}


AMBIGUOUS_MIN_DIGITS = 4
"""An int ``num_experts`` with at least this many digits, none of them 0, could be
a pattern (``2468``) and is rejected as ambiguous."""


def check_uniform_count(n: int) -> int:
    """Validate an int ``num_experts`` (experts on every layer).

    Args:
        n: The count.

    Returns:
        ``n``.

    Raises:
        ValueError: If ``n < 1``, or if ``n`` reads as a MoLA pattern (at least
            :data:`AMBIGUOUS_MIN_DIGITS` digits, all 1-9); the message shows the
            pattern spelling and the per-layer-list spelling.
    """
    if n < 1:
        raise ValueError(f"num_experts={n}: must be >= 1")
    text = str(n)
    if len(text) >= AMBIGUOUS_MIN_DIGITS and all(c in "123456789" for c in text):
        raise ValueError(
            f"num_experts={n} is ambiguous: an int means {n} experts on every layer. For the "
            f'MoLA pattern write a string: num_experts: "{text}" in YAML (quoted), '
            f"adapter.num_experts={','.join(text)} on the command line. For {n} experts on "
            f"every layer give a list with one count per layer: [{n}, {n}, ...]"
        )
    return n


def group_sizes(num_layers: int, num_groups: int) -> list[int]:
    """Sizes of ``num_groups`` contiguous layer groups covering ``num_layers``.

    Args:
        num_layers: Decoder layers in the model.
        num_groups: Groups in the pattern.

    Returns:
        Group sizes, bottom group first; lower groups take the remainder.

    Raises:
        ValueError: If there are fewer layers than groups.
    """
    if num_groups < 1 or num_layers < num_groups:
        raise ValueError(
            f"cannot split {num_layers} layers into {num_groups} groups: a pattern needs "
            f"at most one group per layer (use a pattern of length <= {num_layers})"
        )
    base, extra = divmod(num_layers, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def parse_pattern(pattern: str) -> list[int]:
    """Parse a pattern name or digit string into per-group expert counts.

    Args:
        pattern: A name from :data:`NAMED_PATTERNS` or a string of digits 1-9
            (e.g. ``"2468"``), or comma-separated integers (``"2,4,16,32"``)
            for counts above 9.

    Returns:
        Expert count of each group, bottom group first.

    Raises:
        ValueError: If the string is neither a known name nor a valid pattern.
    """
    text = NAMED_PATTERNS.get(pattern, pattern).strip()
    valid = (
        f"a name in {sorted(NAMED_PATTERNS)}, a digit string like '2468' (digits 1-9), "
        "or comma-separated positive integers like '2,4,16,32'"
    )
    if not text:
        raise ValueError(f"empty expert pattern; expected {valid}")
    if "," in text:
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"invalid expert pattern {pattern!r}; expected {valid}")
        return [int(p) for p in parts]
    if not all(c in "123456789" for c in text):
        raise ValueError(f"invalid expert pattern {pattern!r}; expected {valid}")
    return [int(c) for c in text]


def experts_per_layer(spec: int | Sequence[int] | str, num_layers: int) -> list[int]:
    """Resolve an expert-count spec into one count per decoder layer.

    Args:
        spec: An int (same count everywhere), a list with one count per layer,
            or a pattern (see :func:`parse_pattern`).
        num_layers: Number of decoder layers of the base model.

    Returns:
        ``num_layers`` expert counts, bottom layer first.

    Raises:
        ValueError: If the spec is invalid or does not fit ``num_layers``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(spec, bool):
        raise ValueError(f"num_experts must be an int, list or pattern, got {spec!r}")
    if isinstance(spec, int):
        return [check_uniform_count(spec)] * num_layers
    if isinstance(spec, str):
        counts = parse_pattern(spec)
        sizes = group_sizes(num_layers, len(counts))
        return [c for c, n in zip(counts, sizes) for _ in range(n)]
    counts = list(spec)
    if len(counts) != num_layers:
        raise ValueError(
            f"num_experts list has {len(counts)} entries but the model has {num_layers} "
            "layers; give one count per layer, an int, or a pattern like '2468'"
        )
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"num_experts[{i}] = {c!r}: every count must be an int >= 1")
    return counts
