"""Convolutional networks: curvature products and K-FAC, native and PyTorch, and the peer.

Model: a small ResNet on 32x32 RGB inputs, ``N = 128`` in one batch, float32, CPU,
cross-entropy over 10 classes (:func:`resnet_spec`)::

    Conv2d(3, 16, 3, padding=1) -> BatchNorm2d(16) -> ReLU
    -> Residual(Conv2d(16, 16, 3, p=1) -> BN -> ReLU -> Conv2d(16, 16, 3, p=1) -> BN) -> ReLU
    -> Residual(Conv2d(16, 32, 3, stride=2, p=1) -> BN -> ReLU -> Conv2d(32, 32, 3, p=1) -> BN,
                shortcut: Conv2d(16, 32, 1, stride=2, bias=False) -> BN) -> ReLU
    -> GlobalAvgPool2d -> Linear(32, 10)

with batch normalization in inference form (random running statistics and affine
parameters, the same on every side). The native model is ``curvlinops.nn``; the torch
model is the same network of ``torch.nn`` modules in evaluation mode, built by
``build_cnn`` of ``peers/curvlinops_for_pytorch.py`` (the function the peer builds its
copy with) and given the native weights. Without ``curvlinops.nn.Residual`` the
residual connections are left out (the blocks in a plain chain; the table says which
network was measured).

Rows, each a ratio of two times measured in interleaved rounds in this run
(``_timing.time_ratio``; for the peer, rounds alternating between this process and the
peer's, ``_peers.PeerSession``):

- ``native`` and ``torch``: GGN and Hessian matvecs, K-FAC factors (``fisher_type``
  ``"mc"`` and ``"type-2"``, construction with ``check_deterministic=False`` and
  ``num_data`` given) and K-FAC inverse matvecs (exact damping and the factored
  pi-damping), each over one loss+gradient of the same framework: the native model's
  own loss+gradient (``GGNLinearOperator.gradient_and_loss``, one forward pass and the
  native VJP) and, for ``TorchModel``, ``cross_entropy`` plus ``torch.autograd.grad``.
  No targets (reported);
- ``kernel``: a native ``Conv2d(64, 64, 3, padding=1)`` forward pass and its
  backward pass to the weights, bias and inputs (``Layer.forward_with_state``,
  ``Layer.backward`` on the same state, as inside a linearized network) over
  ``torch.nn.functional.conv2d`` and ``torch.autograd.grad`` on ``(128, 64, 32, 32)``
  inputs, target ``<= 1.5``; and the whole ResNet's loss+gradient, native over torch
  (reported);
- ``peer`` (``--peers``): ours (``TorchModel``) over curvlinops-for-pytorch 3.0.1 on
  the same torch network, weights, vectors and thread count, target ``<= 0.6``: GGN
  matvec, Hessian matvec, and K-FAC type-2 construction with its factors computed
  (the peer's K-FAC takes only Linear and Conv2d parameters, so both sides take those,
  with the batch norms' parameters frozen on ours). The notes give the products' largest
  relative difference between the libraries. Two more rows, without target, time our
  GGN and Hessian matvecs with the forward pass kept across products (``cache=True``,
  ``TorchModel(jvp_method="linearize")``) against the same peer products (which have no
  such option).

Threads: the torch side uses ``torch.set_num_threads(OMP_NUM_THREADS)`` (all CPUs when
unset), the peer the same. For reproducible ratios run single-threaded,
``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1``.

May import: NumPy, curvlinops, torch (optional: without it only the native rows run),
and the benchmarks' helpers (``_timing``, ``_mlp``, ``_peers``,
``peers/curvlinops_for_pytorch.py`` for ``build_cnn``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
from _timing import time_ratio

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.kfac import KFACLinearOperator

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "peers" / "curvlinops_for_pytorch.py"
DAMPING = 1e-3
CLASSES = 10


# -- the network, described by plain data --------------------------------------------


def resnet_spec(residual=True):
    """The ResNet as a list of layer descriptions (see ``build_cnn`` in the peer script).

    With ``residual=False`` each residual connection is replaced by its block alone.
    """
    counter = iter(range(100))

    def conv(cin, cout, k=3, stride=1, bias=True):
        return {"op": "conv", "in": cin, "out": cout, "k": k, "stride": stride, "pad": k // 2,
                "bias": bias}  # fmt: skip

    def bn(c):
        return {"op": "bn", "c": c, "stats": next(counter)}

    relu = {"op": "relu"}

    def res(block, shortcut=None):
        if not residual:
            return block
        return [{"op": "res", "block": block, "shortcut": shortcut}]

    return [
        conv(3, 16),
        bn(16),
        relu,
        *res([conv(16, 16), bn(16), relu, conv(16, 16), bn(16)]),
        relu,
        *res(
            [conv(16, 32, stride=2), bn(32), relu, conv(32, 32), bn(32)],
            [conv(16, 32, k=1, stride=2, bias=False), bn(32)],
        ),
        relu,
        {"op": "gap"},
        {"op": "linear", "in": 32, "out": CLASSES},
    ]


def _walk(spec):
    """The layer descriptions in parameter order (a residual's block, then shortcut)."""
    for item in spec:
        if item["op"] == "res":
            yield from _walk(item["block"])
            yield from _walk(item["shortcut"] or [])
        else:
            yield item


def native_model(spec, stats):
    """The ``curvlinops.nn.Sequential`` of ``spec``; ``stats[i]`` = (mean, var) of BN i."""

    def layer(item):
        op = item["op"]
        if op == "conv":
            return nn.Conv2d(item["in"], item["out"], item["k"], stride=item["stride"],
                             padding=item["pad"], bias=item["bias"])  # fmt: skip
        if op == "bn":
            mean, var = stats[item["stats"]]
            return nn.BatchNorm2d(item["c"], running_mean=mean, running_var=var)
        if op == "relu":
            return nn.ReLU()
        if op == "res":
            short = item["shortcut"]
            return nn.Residual(
                nn.Sequential(*map(layer, item["block"])),
                None if short is None else nn.Sequential(*map(layer, short)),
            )
        if op == "gap":
            return nn.GlobalAvgPool2d()
        if op == "linear":
            return nn.Linear(item["in"], item["out"])
        raise ValueError(op)

    return nn.Sequential(*map(layer, spec))


def problem(quick, seed=0):
    """``(spec, stats, model, params, X, y)``: the network, its weights and data (NumPy)."""
    import array_api_compat.numpy as xp

    spec = resnet_spec(residual=hasattr(nn, "Residual"))
    rng = np.random.default_rng(seed)
    bns = [item for item in _walk(spec) if item["op"] == "bn"]
    stats = [
        (
            (0.1 * rng.standard_normal(b["c"])).astype(np.float32),
            rng.uniform(0.5, 1.5, b["c"]).astype(np.float32),
        )
        for b in bns
    ]
    model = native_model(spec, stats)
    params = model.init(seed, xp=xp, dtype=xp.float32)
    # Batch norm's affine parameters away from (1, 0), so that they matter.
    i = 0
    for item in _walk(spec):
        if item["op"] == "bn":
            params[i] = rng.uniform(0.5, 1.5, item["c"]).astype(np.float32)
            params[i + 1] = (0.1 * rng.standard_normal(item["c"])).astype(np.float32)
        i += {"conv": 1 + item.get("bias", False), "bn": 2, "linear": 2}.get(item["op"], 0)
    assert i == len(params)
    N = 32 if quick else 128
    X = rng.standard_normal((N, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, CLASSES, size=N)
    return spec, stats, model, params, X, y


def arrays_of(spec, stats, params):
    """The ``.npz`` payload that describes the network for ``build_cnn``."""
    out = {"cnn": json.dumps(spec)}
    for i, (mean, var) in enumerate(stats):
        out[f"mean{i}"], out[f"var{i}"] = mean, var
    for i, p in enumerate(params):
        out[f"p{i}"] = np.asarray(p)
    return out


def _build_cnn():
    """``build_cnn`` from the peer script (it imports torch and NumPy only)."""
    spec = importlib.util.spec_from_file_location("_cnn_peer_script", PEER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_cnn, module.tapped_params


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

    def ratio(self, side, what, fn, baseline, target=None, *, slow=False, note=""):
        rounds = 2 if self.quick else (5 if slow else 7)
        ratio = time_ratio(fn, baseline, rounds=rounds, block=1 if self.quick or slow else 3)
        self.add(side, what, ratio, target, note)

    def add(self, side, what, ratio, target=None, note=""):
        self.rows.append(
            {
                "side": side,
                "quantity": what,
                "ratio": ratio,
                "target": "" if target is None else f"<= {target}",
                "met": "" if target is None else bool(ratio <= target),
                "note": note,
            }
        )


def _curvature_rows(rows, side, model, params, data, lossgrad, v, num_data, reference=None):
    """GGN, Hessian, K-FAC factors and K-FAC inverse matvecs over ``lossgrad``; returns
    the GGN product (compared with ``reference``, another side's, in the GGN row)."""
    loss = cl.CrossEntropyLoss()
    kw = dict(check_deterministic=False)
    G = cl.GGNLinearOperator(model, loss, params, data, num_data=num_data, **kw)
    H = cl.HessianLinearOperator(model, loss, params, data, num_data=num_data, **kw)

    def kfac(fisher_type):
        return KFACLinearOperator(
            model, loss, params, data, fisher_type=fisher_type, num_data=num_data, **kw
        )

    K = kfac("type-2")
    exact, factored = K.inverse(DAMPING), K.factored_inverse(DAMPING, pi_damping=True)
    over = "/ loss+grad"
    note = ""
    if reference is not None:
        note = f"vs native: max rel. diff {_rel(G @ v, reference):.1e}"
    rows.ratio(side, f"GGN matvec {over}", lambda: G @ v, lossgrad, note=note)
    rows.ratio(side, f"Hessian matvec {over}", lambda: H @ v, lossgrad)
    rows.ratio(side, f"K-FAC factors, mc (1 sample) {over}", lambda: kfac("mc"), lossgrad)
    rows.ratio(side, f"K-FAC factors, type-2 {over}", lambda: kfac("type-2"), lossgrad, slow=True)
    rows.ratio(side, f"K-FAC inverse matvec, exact damping {over}", lambda: exact @ v, lossgrad)
    rows.ratio(side, f"K-FAC inverse matvec, pi-damping {over}", lambda: factored @ v, lossgrad)
    return G @ v


def _kernel_rows(rows, quick, torch):
    """A native Conv2d's forward+backward over torch's, on (N, 64, 32, 32)."""
    import array_api_compat.numpy as xp

    N, C = (16, 64) if quick else (128, 64)
    layer = nn.Conv2d(C, C, 3, padding=1)
    params = layer.init(0, xp=xp, dtype=xp.float32)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, C, 32, 32), dtype=np.float32)
    g = rng.standard_normal((N, C, 32, 32), dtype=np.float32)
    g_internal = g[:, :, :, None, :]  # one cotangent, internal layout (N, C, H, K, W)

    def native():
        # As in a linearization (``Module.linearize``): the forward pass keeps what it
        # made of the input (the conv's channels-last grid) in the layer's state, and
        # the backward pass reads it from there.
        state = {"input": x, "channels_first": True}
        layer.forward_with_state(params, x, xp, state)
        return layer.backward(params, state, g_internal, xp)

    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = (torch.from_numpy(np.asarray(p)).requires_grad_() for p in params)
    gt = torch.from_numpy(g)

    def reference():
        out = torch.nn.functional.conv2d(xt, wt, bt, padding=1)
        return torch.autograd.grad(out, (xt, wt, bt), gt)

    grads, g_in = native()
    gx, gw, gb = reference()
    note = (
        f"N={N}; max rel. diff: inputs {_rel(g_in[:, :, :, 0, :], gx):.1e}, "
        f"weight {_rel(grads[0][..., 0], gw):.1e}"
    )
    rows.ratio("kernel", f"Conv2d({C}, {C}, 3) forward+backward / torch", native, reference, 1.5,
               note=note)  # fmt: skip


def run(quick: bool) -> list[dict]:
    spec, stats, model, params, X, y = problem(quick)
    N = X.shape[0]
    data = [(X, y)]
    rows = _Rows(quick)
    arch = "ResNet" if hasattr(nn, "Residual") else "plain CNN (no curvlinops.nn.Residual)"
    P = sum(p.size for p in params)
    rows.rows.append({"side": "model", "quantity": arch, "note": f"N={N}, P={P}"})
    rng = np.random.default_rng(1)
    v = rng.standard_normal(P).astype(np.float32)
    G = cl.GGNLinearOperator(
        model, cl.CrossEntropyLoss(), params, data, num_data=N, check_deterministic=False
    )
    native_lossgrad = G.gradient_and_loss
    ggn_native = _curvature_rows(rows, "native", model, params, data, native_lossgrad, v, N)
    if importlib.util.find_spec("torch") is None:
        rows.rows.append({"side": "torch", "quantity": "skipped", "note": "torch not installed"})
        return rows.rows
    import torch

    from curvlinops.frontends.torch import TorchModel

    torch.set_num_threads(_threads())
    build_cnn, tapped_params = _build_cnn()
    arrays = arrays_of(spec, stats, params)
    net = build_cnn(spec, arrays)
    tmodel = TorchModel(net)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    out_native, out_torch = model(params, X), net(Xt).detach().numpy()
    if _rel(out_torch, out_native) > 1e-4:
        raise AssertionError(f"torch and native networks differ: {_rel(out_torch, out_native)}")
    trainable = list(net.parameters())

    def torch_lossgrad():
        loss = torch.nn.functional.cross_entropy(net(Xt), yt)
        return torch.autograd.grad(loss, trainable)

    vt = torch.from_numpy(v)
    _curvature_rows(
        rows, "torch", tmodel, tmodel.params, [(Xt, yt)], torch_lossgrad, vt, N, ggn_native
    )
    rows.ratio(
        "kernel",
        "ResNet loss+grad, native / torch",
        native_lossgrad,
        torch_lossgrad,
    )
    _kernel_rows(rows, quick, torch)
    _peer_rows(rows, arrays, net, tmodel, tapped_params, Xt, yt, v, torch)
    return rows.rows


def _interleaved(fn, session, operation, *, rounds, block):
    """Our ``fn`` over the peer's ``operation``: rounds alternating the two processes
    (each round a block of the peer's calls, then a block of ours; the ratio of the
    medians; the median over rounds), as ``_timing.time_ratio`` within one process."""
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


def _peer_rows(rows, arrays, net, tmodel, tapped_params, Xt, yt, v, torch):
    """Ours (TorchModel) over curvlinops-for-pytorch on the same torch network."""
    if os.environ.get("CURVLINOPS_BENCH_PEERS") != "1":
        rows.rows.append({"side": "peer", "quantity": "curvlinops-for-pytorch",
                          "met": "skipped (--peers)"})  # fmt: skip
        return
    from _peers import PeerSession, PeerUnavailable

    from curvlinops.frontends.torch import TorchModel

    N = Xt.shape[0]
    data = [(Xt, yt)]
    loss = cl.CrossEntropyLoss()
    kw = dict(check_deterministic=False, num_data=N)
    # K-FAC on the Linear and Conv2d parameters only (what the peer's K-FAC takes): a
    # copy of the network with the batch norms' parameters frozen.
    frozen = _build_cnn()[0](json.loads(arrays["cnn"]), arrays)
    kept = {id(p) for p in tapped_params(frozen)}
    for p in frozen.parameters():
        p.requires_grad_(id(p) in kept)
    fmodel = TorchModel(frozen)
    P_kfac = sum(p.numel() for p in fmodel.params)
    v_kfac = np.random.default_rng(2).standard_normal(P_kfac).astype(np.float32)
    inputs = {
        **arrays,
        "X": Xt.numpy(),
        "y": yt.numpy(),
        "v": v,
        "v_kfac": v_kfac,
        "threads": torch.get_num_threads(),
    }
    G = cl.GGNLinearOperator(tmodel, loss, tmodel.params, data, **kw)
    H = cl.HessianLinearOperator(tmodel, loss, tmodel.params, data, **kw)

    def kfac():
        return KFACLinearOperator(fmodel, loss, fmodel.params, data, fisher_type="type-2", **kw)

    # Our operators with the forward pass kept across products (cache=True) and the
    # tangent map traced once (jvp_method="linearize"); the peer has no such option.
    lmodel = TorchModel(net, jvp_method="linearize")
    Gc = cl.GGNLinearOperator(lmodel, loss, lmodel.params, data, cache=True, **kw)
    Hc = cl.HessianLinearOperator(lmodel, loss, lmodel.params, data, cache=True, **kw)

    vt, vk = torch.from_numpy(v), torch.from_numpy(v_kfac)
    try:
        with PeerSession("curvlinops-for-pytorch", inputs) as peer:
            res = peer.results
            quick = rows.quick
            for what, fn, op, value, reference in (
                ("GGN matvec", lambda: G @ vt, "ggn", lambda: G @ vt, res["ggn_v"]),
                ("Hessian matvec", lambda: H @ vt, "hessian", lambda: H @ vt, res["hess_v"]),
                ("K-FAC type-2 construction", kfac, "kfac", lambda: kfac() @ vk, res["kfac_v"]),
            ):
                slow = op == "kfac"
                ratio = _interleaved(
                    fn,
                    peer,
                    op,
                    rounds=2 if quick else (5 if slow else 7),
                    block=1 if quick or slow else 3,
                )
                note = f"max rel. diff {_rel(value(), reference):.1e}"
                rows.add("peer", f"ours (TorchModel) / peer: {what}", ratio, 0.6, note)
            for what, fn, op in (
                ("GGN matvec", lambda: Gc @ vt, "ggn"),
                ("Hessian matvec", lambda: Hc @ vt, "hessian"),
            ):
                ratio = _interleaved(
                    fn, peer, op, rounds=2 if quick else 7, block=1 if quick else 3
                )
                rows.add("peer", f"ours cached + linearize / peer: {what}", ratio,
                         note="cache=True, jvp_method='linearize'; the peer recomputes "
                         "its forward pass in every product")  # fmt: skip
            ratio = _interleaved(
                lambda: torch.autograd.grad(
                    torch.nn.functional.cross_entropy(net(Xt), yt), list(net.parameters())
                ),
                peer,
                "grad",
                rounds=2 if quick else 5,
                block=1 if quick else 3,
            )
            rows.add("peer", "torch loss+grad here / in the peer's process", ratio,
                     note="same computation: how alike the two processes run")  # fmt: skip
    except PeerUnavailable as err:
        rows.rows.append({"side": "peer", "quantity": "curvlinops-for-pytorch",
                          "met": f"unavailable: {err}"})  # fmt: skip
