"""The lookup tables are correctly rounded and match the genesis pin."""

from __future__ import annotations

import random
from decimal import ROUND_FLOOR, Decimal, localcontext

from consensus.genesis import Genesis
from training.tables import _exact_gelu, build_tables


def round_half_up(value: Decimal) -> int:
    return int((value + Decimal("0.5")).to_integral_value(rounding=ROUND_FLOOR))


def test_tables_hash_is_pinned_by_genesis(devnet: Genesis) -> None:
    assert build_tables().sha256() == devnet.evaluation.tables_sha256


def test_sampled_entries_equal_high_precision_values() -> None:
    tables = build_tables()
    chooser = random.Random(20261122)
    with localcontext() as context:
        context.prec = 60
        for i in chooser.sample(range(len(tables.attention_exp)), 300):
            exact = (Decimal(i - 16384) / 1024).exp() * (1 << 20)
            assert tables.attention_exp[i] == round_half_up(exact), i
        for i in chooser.sample(range(len(tables.loss_exp)), 300):
            exact = (Decimal(i - 24576) / 1024).exp() * (1 << 32)
            assert tables.loss_exp[i] == round_half_up(exact), i
        for i in chooser.sample(range(len(tables.log)), 300):
            exact = (1 + Decimal(i) / (1 << 15)).ln() * (1 << 16)
            assert tables.log[i] == round_half_up(exact), i
        for i in chooser.sample(range(len(tables.gelu)), 100):
            exact = _exact_gelu(Decimal(i - 32768) / 2048) * 2048
            assert tables.gelu[i] == round_half_up(exact), i
        ln2 = Decimal(2).ln()
        for k, value in enumerate(tables.ln2_multiples):
            assert value == round_half_up(k * ln2 * (1 << 16))


def test_table_shapes_and_end_points() -> None:
    tables = build_tables()
    assert len(tables.attention_exp) == 16385 and tables.attention_exp[-1] == 1 << 20
    assert len(tables.loss_exp) == 24577 and tables.loss_exp[-1] == 1 << 32
    assert len(tables.gelu) == 65536 and tables.gelu[32768] == 0
    assert len(tables.log) == 32769 and tables.log[0] == 0
    # A masked attention score maps to entry 0, which must be exactly zero.
    assert tables.attention_exp[0] == 0 and tables.loss_exp[0] == 0
