"""cem_jax.xla_cpu: the XLA:CPU flags set on import, and that they change no function."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np

from cem_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def test_flags_are_added_once_and_the_users_own_are_kept():
    assert xla_cpu.recommended_xla_flags("", "0.10.2") == FLAG
    assert xla_cpu.recommended_xla_flags(FLAG, "0.10.2") == FLAG
    mine = "--xla_cpu_experimental_ynn_fusion_type=eltwise"
    assert xla_cpu.recommended_xla_flags(f"--a=1 {mine}", "0.10.7") == f"--a=1 {mine}"
    assert xla_cpu.recommended_xla_flags("--a=1", "0.10.2") == f"--a=1 {FLAG}"
    # a jaxlib the flags were not measured on (and may not know them: fatal in XLA) gets none
    assert xla_cpu.recommended_xla_flags("--a=1", "0.11.0") == "--a=1"
    assert xla_cpu.recommended_xla_flags("", None) == ""


def test_apply_sets_the_environment_unless_opted_out(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: "0.10.2")
    env = {"XLA_FLAGS": "--a=1"}
    assert xla_cpu.apply(env) == [FLAG]
    assert env["XLA_FLAGS"] == f"--a=1 {FLAG}"
    assert xla_cpu.apply(env) == []  # idempotent
    env = {xla_cpu.OPT_OUT: "0"}
    assert xla_cpu.apply(env) == [] and "XLA_FLAGS" not in env


_STEP = r"""
import json, os, sys
import cem_jax  # sets the flags (or not, CEM_JAX_XLA_CPU_FLAGS=0)
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from cem_jax.models.decoder import InversionDecoder
from cem_jax.models import vgg

out = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
# the decoder attack's step: loss and gradients of a res_normN2C64 decoder (its 2x2 sub-pixel
# upsamplings and 1x1 shortcut take XLA or the im2col matmul depending on the flags)
dec = InversionDecoder(in_channels=8, feature_size=8, image_size=32, num_blocks=2, width=64,
                       rngs=nnx.Rngs(0))
z = jax.random.uniform(jax.random.key(1), (8, 8, 8, 8))
x = jax.random.uniform(jax.random.key(2), (8, 32, 32, 3))
g, s = nnx.split(dec)
def loss(s):
    return jnp.mean((nnx.merge(g, s)(z) - x) ** 2)
l, gr = jax.jit(jax.value_and_grad(loss))(s)
out["decoder_loss"] = float(l)
out["decoder_grads"] = np.concatenate([np.ravel(a) for a in jax.tree.leaves(gr)]).tolist()
# the split client's features and their gradient
client = vgg.VGGClient(4, 8, rngs=nnx.Rngs(3))
gc, sc = nnx.split(client)
xi = jax.random.normal(jax.random.key(4), (8, 32, 32, 3))
def closs(sc):
    return jnp.sum(nnx.merge(gc, sc)(xi) ** 2)
lc, grc = jax.jit(jax.value_and_grad(closs))(sc)
out["client_loss"] = float(lc)
out["client_grads"] = np.concatenate([np.ravel(a) for a in jax.tree.leaves(grc)]).tolist()
print(json.dumps(out))
"""


def _json_of(script: str, env: dict, *args: str, timeout: float | None = None) -> dict:
    """The JSON object on the last line that ``script`` prints, run in a subprocess with ``env``."""
    res = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _run(opt_out: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env[xla_cpu.OPT_OUT] = "0" if opt_out else "1"
    return _json_of(_STEP, env)


def test_the_flags_change_no_function():
    """A decoder step and a client step with the flags (and the conv rule they switch) against the
    same steps without them: same losses and gradients to float32 rounding."""
    with_flags, without = _run(opt_out=False), _run(opt_out=True)
    if xla_cpu.recommended_xla_flags("", xla_cpu._jaxlib_version()):
        assert FLAG in with_flags["xla_flags"]
    assert FLAG not in without["xla_flags"]
    for key in ("decoder_loss", "client_loss"):
        np.testing.assert_allclose(with_flags[key], without[key], rtol=1e-5)
    for key in ("decoder_grads", "client_grads"):
        a, b = np.asarray(with_flags[key]), np.asarray(without[key])
        assert a.shape == b.shape and np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5 * np.abs(b).max())


def test_linear_algebra_still_compiles_under_the_flags():
    """The flags are set on ``import cem_jax`` for the user's whole process: programs that read the
    column-major results of LAPACK (Cholesky, eigh) must still compile. ``eltwise`` broke them in
    jaxlib 0.10.2 ("unsupported layout in YNN fusion"); this runs under the package's flags."""
    code = (
        "import cem_jax, jax, jax.numpy as jnp, numpy as np\n"
        "x = jax.random.normal(jax.random.key(0), (64, 64)); a = x @ x.T + 64 * jnp.eye(64)\n"
        "c = jax.jit(lambda a: jnp.linalg.cholesky(a) * 2)(a)\n"
        "w = jax.jit(lambda a: jnp.linalg.eigh(a)[0] * 2)(a)\n"
        "an = np.asarray(a, np.float64)\n"
        "np.testing.assert_allclose(c, 2 * np.linalg.cholesky(an), rtol=1e-4, atol=1e-4)\n"
        "np.testing.assert_allclose(w, 2 * np.linalg.eigvalsh(an), rtol=1e-4)\n"
        "import os; print(os.environ.get('XLA_FLAGS', ''))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    if xla_cpu.recommended_xla_flags("", xla_cpu._jaxlib_version()):
        assert FLAG in res.stdout


def test_tune_malloc_sets_glibc_options_unless_opted_out():
    assert xla_cpu.tune_malloc({xla_cpu.MALLOC_OPT_OUT: "0"}) == []
    glibc = sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver()).lower()
    expected = list(xla_cpu.MALLOC_SETTINGS) if glibc else []
    assert xla_cpu.tune_malloc({}) == expected
    assert xla_cpu.tune_malloc({}) == expected  # idempotent


_FAULTS = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from cem_jax import xla_cpu
from cem_jax.cli import config_flags  # what the programs import before they tune
applied = xla_cpu.tune_malloc(dict(CEM_JAX_MALLOC=sys.argv[1]))

@jax.jit
def f(x, w):
    h = jax.nn.relu(x @ w)  # [8192, 2048]: 64 MB, 16,384 pages
    g = jnp.tanh(h @ w.T)
    return jnp.tanh(g @ w) @ w.T  # another [8192, 2048] on the way, and the output

x, w = jnp.ones((8192, 256)), jnp.full((256, 2048), 0.01)
for _ in range(2):
    f(x, w).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 4
print(json.dumps({"applied": applied, "faults_per_call": faults}))
"""


def test_tuned_malloc_reuses_xlas_buffers_instead_of_faulting_them_in_each_call():
    """Each call of ``f`` allocates and frees >= 64 MB (16,384 pages). Untuned, glibc serves it with
    fresh mmaps that fault in page by page on every call; tuned, the freed heap is reused."""
    out = {}
    for mode in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out[mode] = _json_of(_FAULTS, env, mode, timeout=300)
    if not out["1"]["applied"]:  # not glibc: nothing set, nothing to compare
        assert out["0"]["applied"] == []
        return
    assert out["1"]["applied"] == list(xla_cpu.MALLOC_SETTINGS)
    assert out["0"]["faults_per_call"] > 16_384, out  # the untuned cost the setting removes
    assert out["1"]["faults_per_call"] < 16_384 / 10, out
