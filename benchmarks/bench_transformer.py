"""A small GPT: GGN and Hessian matvecs and K-FAC factors, native, PyTorch and JAX, and the peer.

Model (:func:`gpt_spec`): a nanoGPT-like language model, vocabulary 256, width 128,
4 heads, sequence 64, two causal pre-norm blocks (LayerNorm, self-attention with the
packed projection of ``torch.nn.MultiheadAttention``, LayerNorm, GELU MLP of width
512, both residual), learned positions (an embedding of the position ids), a final
LayerNorm and a linear head; one batch of ``N = 16`` sequences, cross-entropy at every
position, float32, CPU. The same weights on every side:

- ``native``: ``curvlinops.nn.Sequential(Embedding, PositionalEmbedding,
  TransformerBlock, TransformerBlock, LayerNorm, Linear)``;
- ``torch``: the ``torch.nn`` GPT of ``build_gpt`` in ``peers/curvlinops_for_pytorch.py``
  (the function the peer builds its copy with), in evaluation mode, through
  ``TorchModel``;
- ``jax``: a plain JAX function with ``dense``/``embed`` marks through ``JaxModel``.
  Its LayerNorms are plain JAX code (the JAX frontend taps dense and embedding layers
  only), so its K-FAC runs on a second ``JaxModel`` of the same function with the
  LayerNorms' parameters as constants (the table says so).

Rows, each a ratio of two times measured in interleaved rounds in this run
(``_timing.time_ratio``; for the peer, rounds alternating between this process and the
peer's, ``_peers.PeerSession``):

- ``native``, ``torch``, ``jax``: GGN matvec, Hessian matvec and K-FAC type-2 factors
  (construction with ``check_deterministic=False`` and ``num_data`` given), each over
  one loss+gradient of the same framework: the native model's own
  (``GGNLinearOperator.gradient_and_loss``), ``cross_entropy`` plus
  ``torch.autograd.grad`` for torch, and ``jax.jit(jax.value_and_grad(loss))`` for JAX.
  The GGN row's note gives the product's largest relative difference from the native
  one. No targets (reported);
- ``peer`` (``--peers``): ours (``TorchModel``) over curvlinops-for-pytorch 3.0.1 on the
  same torch network, weights, vector and thread count: GGN matvec, Hessian matvec and
  K-FAC type-2 construction with its factors computed. The peer's K-FAC takes
  ``torch.nn.Linear`` and ``Conv2d`` modules only: not the embeddings, the LayerNorms,
  or attention's projections (``MultiheadAttention`` uses its weights directly, not
  through ``Linear`` modules), so both sides take the MLPs' and the head's parameters
  (ours on a copy of the network with the others frozen). The peer's losses want the
  classes on axis 1: it evaluates the same network with its logits transposed to
  ``(N, V, S)``. The notes give the products' largest relative difference. (The peer's
  Hessian product, ``jvp`` of ``jacrev`` under ``vmap``, differs from ours by a few
  percent on this GPT; ours agrees with the native one and with ``torch.autograd``
  double backward to float32 rounding, and to 1e-15 in float64, at the quick size.)

Threads: ``torch.set_num_threads(OMP_NUM_THREADS)`` (all CPUs when unset), the peer the
same. For reproducible ratios run single-threaded, ``OMP_NUM_THREADS=1
OPENBLAS_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1"``.

May import: NumPy, curvlinops, torch and jax (optional: each side runs if installed),
and the benchmarks' helpers (``_timing``, ``_peers``, ``peers/curvlinops_for_pytorch.py``
for ``build_gpt``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
from _timing import time_ratio

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.kfac import KFACLinearOperator

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "peers" / "curvlinops_for_pytorch.py"
EPS = 1e-5


def gpt_spec(quick):
    """The GPT as plain data (``build_gpt`` in the peer script takes it)."""
    if quick:
        return {"vocab": 64, "width": 32, "heads": 4, "seq": 16, "blocks": 1, "ratio": 4}
    return {"vocab": 256, "width": 128, "heads": 4, "seq": 64, "blocks": 2, "ratio": 4}


def native_model(spec):
    E = spec["width"]
    return nn.Sequential(
        nn.Embedding(spec["vocab"], E),
        nn.PositionalEmbedding(spec["seq"], E),
        *[
            nn.TransformerBlock(E, spec["heads"], mlp_ratio=spec["ratio"])
            for _ in range(spec["blocks"])
        ],
        nn.LayerNorm(E, eps=EPS),
        nn.Linear(E, spec["vocab"]),
    )


def layer_norm_indices(spec):
    """Positions of the LayerNorms' weights and biases in the parameter list."""
    per_block = 12  # ln1 (2), in_proj (2), out_proj (2), ln2 (2), fc1 (2), fc2 (2)
    out = []
    for b in range(spec["blocks"]):
        start = 2 + per_block * b
        out += [start, start + 1, start + 6, start + 7]
    final = 2 + per_block * spec["blocks"]
    return out + [final, final + 1]


def problem(quick, seed=0):
    """``(spec, model, params, X, y)`` in NumPy float32."""
    import array_api_compat.numpy as xp

    spec = gpt_spec(quick)
    model = native_model(spec)
    params = model.init(seed, xp=xp, dtype=xp.float32)
    rng = np.random.default_rng(seed)
    params[0] = (0.1 * params[0]).astype(np.float32)  # token and position tables
    params[1] = (0.1 * params[1]).astype(np.float32)
    for i in layer_norm_indices(spec):  # the LayerNorms' affine parts away from (1, 0)
        base = 1.0 if i in layer_norm_indices(spec)[0::2] else 0.0
        params[i] = (base + 0.1 * rng.standard_normal(params[i].shape)).astype(np.float32)
    N = 4 if quick else 16
    X = rng.integers(0, spec["vocab"], size=(N, spec["seq"]))
    y = rng.integers(0, spec["vocab"], size=(N, spec["seq"]))
    return spec, model, params, X, y


def _peer_functions():
    """``build_gpt`` and ``gpt_linear_params`` from the peer script (torch and NumPy)."""
    module_spec = importlib.util.spec_from_file_location("_gpt_peer_script", PEER_SCRIPT)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.build_gpt, module.gpt_linear_params


def _threads():
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- rows -------------------------------------------------------------------------------


class _Rows:
    def __init__(self, quick):
        self.quick = quick
        self.rows = []

    def ratio(self, side, what, fn, baseline, *, slow=False, note=""):
        rounds = 2 if self.quick else (5 if slow else 7)
        ratio = time_ratio(fn, baseline, rounds=rounds, block=1 if self.quick or slow else 3)
        self.add(side, what, ratio, note)

    def add(self, side, what, ratio, note=""):
        self.rows.append({"side": side, "quantity": what, "ratio": ratio, "note": note})


def _curvature_rows(rows, side, model, params, data, lossgrad, v, N, reference=None, kfac=None):
    """GGN and Hessian matvecs and K-FAC type-2 factors over ``lossgrad``; returns ``G v``.

    ``kfac``: ``(model, params)`` for K-FAC when it differs (a subset of the parameters).
    """
    loss = cl.CrossEntropyLoss()
    kw = dict(check_deterministic=False, num_data=N)
    G = cl.GGNLinearOperator(model, loss, params, data, **kw)
    H = cl.HessianLinearOperator(model, loss, params, data, **kw)
    k_model, k_params = kfac or (model, params)

    def factors():
        return KFACLinearOperator(k_model, loss, k_params, data, fisher_type="type-2", **kw)

    ggn_v = np.asarray(cl.to_numpy(G @ v))
    note = "" if reference is None else f"vs native: max rel. diff {_rel(ggn_v, reference):.1e}"
    over = "/ loss+grad"
    rows.ratio(side, f"GGN matvec {over}", lambda: G @ v, lossgrad, note=note)
    rows.ratio(side, f"Hessian matvec {over}", lambda: H @ v, lossgrad)
    note = "" if kfac is None else "LayerNorm parameters as constants (not tapped in JAX)"
    rows.ratio(side, f"K-FAC factors, type-2 {over}", factors, lossgrad, slow=True, note=note)
    return ggn_v


def _jax_rows(rows, spec, params, X, y, v, reference):
    import jax
    import jax.numpy as jnp

    from curvlinops.frontends.jax import JaxModel, dense, embed

    E, H = spec["width"], spec["heads"]
    d = E // H
    ln = set(layer_norm_indices(spec))

    def layer_norm(x, w, b):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + EPS) * w + b

    def attention(qkv):
        N, S, _ = qkv.shape
        q, k, v_ = (
            jnp.transpose(t.reshape(N, S, H, d), (0, 2, 1, 3)) for t in jnp.split(qkv, 3, -1)
        )
        scores = jnp.where(
            jnp.tril(jnp.ones((S, S), dtype=bool)), q @ jnp.swapaxes(k, -1, -2) / math.sqrt(d),
            -jnp.inf,
        )  # fmt: skip
        o = jax.nn.softmax(scores, axis=-1) @ v_
        return jnp.transpose(o, (0, 2, 1, 3)).reshape(N, S, E)

    def gpt(p, ids):
        """``p`` the native parameter list (torch layouts)."""
        N, S = ids.shape
        h = embed(ids, p[0]) + embed(jnp.broadcast_to(jnp.arange(S), (N, S)), p[1])
        for b in range(spec["blocks"]):
            q = p[2 + 12 * b : 14 + 12 * b]
            h = h + dense(attention(dense(layer_norm(h, q[0], q[1]), q[2], q[3])), q[4], q[5])
            m = jax.nn.gelu(dense(layer_norm(h, q[6], q[7]), q[8], q[9]), approximate=False)
            h = h + dense(m, q[10], q[11])
        f = 2 + 12 * spec["blocks"]
        return dense(layer_norm(h, p[f], p[f + 1]), p[f + 2], p[f + 3])

    jparams = [jnp.asarray(p) for p in params]
    Xj, yj = jnp.asarray(X), jnp.asarray(y)
    model = JaxModel(gpt, jparams, layer_taps=True)
    constants = {i: jparams[i] for i in ln}
    kept = [i for i in range(len(jparams)) if i not in ln]

    def gpt_tapped(p, ids):  # the LayerNorms' parameters as constants
        full, it = [], iter(p)
        for i in range(len(jparams)):
            full.append(constants[i] if i in ln else next(it))
        return gpt(full, ids)

    k_model = JaxModel(gpt_tapped, [jparams[i] for i in kept], layer_taps=True)

    @jax.jit
    def lossgrad(p):
        def loss(p):
            logp = jax.nn.log_softmax(gpt(p, Xj), axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, yj[..., None], axis=-1))

        return jax.value_and_grad(loss)(p)

    def baseline():  # a tuple has no block_until_ready of its own: wait for it here
        return jax.block_until_ready(lossgrad(jparams))

    _curvature_rows(
        rows, "jax", model, jparams, [(Xj, yj)], baseline, jnp.asarray(v),
        X.shape[0], reference, kfac=(k_model, k_model.params),
    )  # fmt: skip


def run(quick: bool) -> list[dict]:
    spec, model, params, X, y = problem(quick)
    N = X.shape[0]
    rows = _Rows(quick)
    P = sum(p.size for p in params)
    rows.rows.append(
        {"side": "model", "quantity": "GPT", "note": f"{json.dumps(spec)}, N={N}, P={P}"}
    )
    v = np.random.default_rng(1).standard_normal(P).astype(np.float32)
    data = [(X, y)]
    G = cl.GGNLinearOperator(
        model, cl.CrossEntropyLoss(), params, data, num_data=N, check_deterministic=False
    )
    ggn_native = _curvature_rows(rows, "native", model, params, data, G.gradient_and_loss, v, N)
    if importlib.util.find_spec("torch") is not None:
        _torch_rows(rows, spec, params, X, y, v, ggn_native)
    else:
        rows.rows.append({"side": "torch", "quantity": "skipped", "note": "torch not installed"})
    if importlib.util.find_spec("jax") is not None:
        _jax_rows(rows, spec, params, X, y, v, ggn_native)
    else:
        rows.rows.append({"side": "jax", "quantity": "skipped", "note": "jax not installed"})
    return rows.rows


def _torch_rows(rows, spec, params, X, y, v, reference):
    import torch

    from curvlinops.frontends.torch import TorchModel

    torch.set_num_threads(_threads())
    build_gpt, linear_params = _peer_functions()
    arrays = {"gpt": json.dumps(spec), **{f"p{i}": np.asarray(p) for i, p in enumerate(params)}}
    net = build_gpt(spec, arrays)
    tmodel = TorchModel(net)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    trainable = list(net.parameters())

    def lossgrad():
        out = net(Xt)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yt.reshape(-1))
        return torch.autograd.grad(loss, trainable)

    vt = torch.from_numpy(v)
    data = [(Xt, yt)]
    _curvature_rows(rows, "torch", tmodel, tmodel.params, data, lossgrad, vt, X.shape[0], reference)
    _peer_rows(rows, spec, arrays, net, linear_params, Xt, yt, v, torch)


def _interleaved(fn, session, operation, *, rounds, block):
    """Our ``fn`` over the peer's ``operation`` in rounds alternating the two processes
    (as in ``bench_cnn``)."""
    import gc
    import statistics
    import time

    session.time(operation, 1)
    fn()
    ratios = []
    for _ in range(rounds):
        theirs = statistics.median(session.time(operation, block))
        times = []
        gc.disable()
        try:
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        finally:
            gc.enable()
        ratios.append(statistics.median(times) / theirs)
    return statistics.median(ratios)


def _peer_rows(rows, spec, arrays, net, linear_params, Xt, yt, v, torch):
    """Ours (TorchModel) over curvlinops-for-pytorch on the same torch network."""
    if os.environ.get("CURVLINOPS_BENCH_PEERS") != "1":
        rows.rows.append({"side": "peer", "quantity": "curvlinops-for-pytorch",
                          "note": "skipped (--peers)"})  # fmt: skip
        return
    from _peers import PeerSession, PeerUnavailable

    from curvlinops.frontends.torch import TorchModel

    N = Xt.shape[0]
    data = [(Xt, yt)]
    loss = cl.CrossEntropyLoss()
    kw = dict(check_deterministic=False, num_data=N)
    frozen = _peer_functions()[0](spec, arrays)
    kept = {id(p) for p in linear_params(frozen)}
    for p in frozen.parameters():
        p.requires_grad_(id(p) in kept)
    fmodel = TorchModel(frozen)
    v_kfac = np.random.default_rng(2).standard_normal(sum(p.numel() for p in fmodel.params))
    v_kfac = v_kfac.astype(np.float32)
    inputs = {**arrays, "X": Xt.numpy(), "y": yt.numpy(), "v": v, "v_kfac": v_kfac,
              "threads": torch.get_num_threads()}  # fmt: skip
    tmodel = TorchModel(net)
    G = cl.GGNLinearOperator(tmodel, loss, tmodel.params, data, **kw)
    H = cl.HessianLinearOperator(tmodel, loss, tmodel.params, data, **kw)

    def kfac():
        return KFACLinearOperator(
            fmodel, loss, fmodel.params, data, fisher_type="type-2", kfac_approx="expand", **kw
        )

    vt, vk = torch.from_numpy(v), torch.from_numpy(v_kfac)
    try:
        with PeerSession("curvlinops-for-pytorch", inputs) as peer:
            res = peer.results
            for what, fn, op, value, ref in (
                ("GGN matvec", lambda: G @ vt, "ggn", lambda: G @ vt, res["ggn_v"]),
                ("Hessian matvec", lambda: H @ vt, "hessian", lambda: H @ vt, res["hess_v"]),
                ("K-FAC type-2 construction", kfac, "kfac", lambda: kfac() @ vk, res["kfac_v"]),
            ):
                slow = op == "kfac"
                ratio = _interleaved(
                    fn, peer, op, rounds=2 if rows.quick else (5 if slow else 7),
                    block=1 if rows.quick or slow else 3,
                )  # fmt: skip
                note = f"max rel. diff {_rel(value(), ref):.1e}"
                if slow:
                    note += "; both sides: the MLPs' and the head's Linear parameters only"
                rows.add("peer", f"ours (TorchModel) / peer: {what}", ratio, note)
            ratio = _interleaved(
                lambda: torch.autograd.grad(
                    torch.nn.functional.cross_entropy(net(Xt).transpose(1, 2), yt),
                    list(net.parameters()),
                ),
                peer,
                "grad",
                rounds=2 if rows.quick else 5,
                block=1 if rows.quick else 3,
            )
            rows.add("peer", "torch loss+grad here / in the peer's process", ratio,
                     "same computation: how alike the two processes run")  # fmt: skip
    except PeerUnavailable as err:
        rows.rows.append({"side": "peer", "quantity": "curvlinops-for-pytorch",
                          "note": f"unavailable: {err}"})  # fmt: skip
