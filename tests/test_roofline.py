"""``benchmarks.roofline``: XLA's FLOP count of a compiled function against the closed forms of a
dot and a convolution, the forms ``cost_analysis()`` comes in, and the matmul peak's type.

Fast: small shapes, one 64 x 64 matmul timed once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from benchmarks import roofline


def test_dot_counts_two_flops_per_multiply_add():
    m, k, n = 24, 40, 56
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    gflop = roofline.compiled_gflop(jax.jit(jnp.dot), a, b)
    assert gflop == pytest.approx(2 * m * k * n / 1e9, rel=1e-6)


def test_conv_counts_two_flops_per_multiply_add():
    """A 3x3 ``VALID`` conv: 2·B·H·W·k·k·Cin·Cout with H, W the output's side (with ``SAME``
    padding XLA leaves the taps on the zero border out, a lower count)."""
    batch, side_h, side_w, k, cin, cout = 2, 10, 12, 3, 5, 7
    x = jnp.ones((batch, side_h, side_w, cin), jnp.float32)
    w = jnp.ones((k, k, cin, cout), jnp.float32)
    conv = jax.jit(
        lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    out_h, out_w = side_h - k + 1, side_w - k + 1
    expected = 2 * batch * out_h * out_w * k * k * cin * cout / 1e9
    assert roofline.compiled_gflop(conv, x, w) == pytest.approx(expected, rel=1e-3)


def test_kwargs_are_passed_to_lower():
    a = jnp.ones((8, 16), jnp.float32)
    f = jax.jit(lambda a, *, b: a @ b)
    assert roofline.compiled_gflop(f, a, b=a.T) == pytest.approx(2 * 8 * 16 * 8 / 1e9)


def test_a_program_of_copies_counts_zero():
    """XLA leaves zero entries out of its cost analysis: a pad is 0 FLOP, not an error."""
    assert roofline.compiled_gflop(jax.jit(lambda x: jnp.pad(x, 1)), jnp.ones((4, 6))) == 0


@pytest.mark.parametrize(
    "cost, flops",
    [({"flops": 2e9, "bytes accessed": 1.0}, 2e9), ([{"flops": 4.0}], 4.0), ({"bytes": 1.0}, 0)],
)
def test_cost_analysis_as_a_dict_or_a_list_of_one(cost, flops):
    assert roofline._flops(cost) == flops


@pytest.mark.parametrize("cost", [None, {}, [], [{"flops": 1.0}, {"flops": 2.0}]])
def test_no_cost_model_is_a_clear_error(cost):
    with pytest.raises(RuntimeError, match="no 'flops'"):
        roofline._flops(cost)


def test_matmul_peak_is_a_positive_rate():
    peak = roofline.matmul_peak_gflops(n=64, repeats=1)
    assert isinstance(peak, float) and math.isfinite(peak) and peak > 0


def test_percent_of_peak():
    assert roofline.percent_of_peak(50.0, 200.0) == 25.0
