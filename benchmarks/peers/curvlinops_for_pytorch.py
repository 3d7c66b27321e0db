"""Peer script: curvlinops-for-pytorch on the benchmarks' models (runs in the peer's venv).

Usage: ``python curvlinops_for_pytorch.py inputs.npz results.npz [--serve]``.

MLP (``bench_curvature``, ``bench_kfac``): reads the weights of an MLP (``W0, b0, W1,
b1, ...``), data ``X, y`` and vectors ``v (P,)``, ``V (P, K)``; writes the products and
the median times of loss+gradient and of the products, so the benchmark can check that
both libraries compute the same numbers and report ratios measured in one run on one
machine.

CNN (``bench_cnn``, an input ``cnn``): the network is described by plain data, a JSON
list of layers (:func:`build_cnn`; convolutions with their channels, kernel, stride,
padding and bias, batch normalization in evaluation mode, ReLU, residual connections,
global average pooling, Linear) with its weights ``p0, p1, ...`` in
``named_parameters()`` order and the batch norms' running statistics ``mean<i>,
var<i>``; the benchmark builds its own torch model with the same function, so both
sides evaluate one network. The script writes the products (``ggn_v``, ``hess_v``,
``kfac_v``) to ``results.npz`` and, with ``--serve``, then stays up to time its
operations on request (:func:`serve`), so that the benchmark can interleave rounds of
its own calls with rounds of the peer's (see ``benchmarks/_peers.py``).

GPT (``bench_transformer``, an input ``gpt``): a JSON description of a small GPT
(:func:`build_gpt`: vocabulary, width, heads, sequence length, blocks, MLP ratio) with
its weights ``p0, p1, ...`` in ``named_parameters()`` order; the benchmark builds its
torch model with the same function. The peer's losses take the classes on axis 1, so
the peer evaluates the GPT's logits transposed to ``(N, V, S)`` (the same loss, the
mean over the ``N S`` positions); its K-FAC takes the ``torch.nn.Linear`` modules (the
MLPs and the head: the attention projections are no ``Linear`` calls, and embeddings
and LayerNorms are not supported), :func:`gpt_linear_params`. Writes ``ggn_v``,
``hess_v``, ``kfac_v``; ``--serve`` as for the CNN.

Imports torch and NumPy at the top (``build_cnn`` is also loaded by the benchmark, in
curvlinops' environment); the peer's ``curvlinops`` only inside the functions.
"""

import gc
import json
import statistics
import sys
import time

import numpy as np
import torch


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Residual(torch.nn.Module):
    """``block(x) + shortcut(x)``; the identity shortcut when ``shortcut`` is None."""

    def __init__(self, block, shortcut=None):
        super().__init__()
        self.block = block
        self.shortcut = shortcut

    def forward(self, x):
        return self.block(x) + (x if self.shortcut is None else self.shortcut(x))


def build_cnn(spec, arrays, dtype=torch.float32):
    """The ``torch.nn.Sequential`` described by ``spec``, in evaluation mode.

    ``spec`` is a list of layers, each a dict with ``"op"``: ``"conv"`` (``in, out, k,
    stride, pad, bias``: ``Conv2d``), ``"bn"`` (``c``, ``stats``: ``BatchNorm2d`` with
    running statistics ``arrays["mean<stats>"]``, ``arrays["var<stats>"]``),
    ``"relu"``, ``"res"`` (``block``, ``shortcut``: lists of layers, the shortcut
    possibly None), ``"gap"`` (``AdaptiveAvgPool2d(1)`` and ``Flatten``), ``"linear"``
    (``in, out``). The parameters are set from ``arrays["p0"], arrays["p1"], ...`` in
    ``named_parameters()`` order (per layer weight then bias; a residual's block before
    its shortcut).
    """

    def layers(items):
        return torch.nn.Sequential(*[layer(item) for item in items])

    def layer(item):
        op = item["op"]
        if op == "conv":
            return torch.nn.Conv2d(
                item["in"],
                item["out"],
                item["k"],
                stride=item["stride"],
                padding=item["pad"],
                bias=item["bias"],
            )
        if op == "bn":
            bn = torch.nn.BatchNorm2d(item["c"])
            with torch.no_grad():
                bn.running_mean.copy_(torch.as_tensor(arrays[f"mean{item['stats']}"]))
                bn.running_var.copy_(torch.as_tensor(arrays[f"var{item['stats']}"]))
            return bn
        if op == "relu":
            return torch.nn.ReLU()
        if op == "res":
            shortcut = item.get("shortcut")
            return Residual(layers(item["block"]), None if shortcut is None else layers(shortcut))
        if op == "gap":
            return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        if op == "linear":
            return torch.nn.Linear(item["in"], item["out"])
        raise ValueError(f"unknown layer {op!r} in the CNN description")

    net = layers(spec).to(dtype)
    params = list(net.parameters())
    with torch.no_grad():
        for i, p in enumerate(params):
            value = torch.as_tensor(arrays[f"p{i}"], dtype=dtype)
            if value.shape != p.shape:
                raise ValueError(f"p{i} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.copy_(value)
    if f"p{len(params)}" in arrays:
        raise ValueError(f"the description has {len(params)} parameters, the arrays more")
    return net.eval()


def tapped_params(net):
    """The parameters of the ``Linear`` and ``Conv2d`` modules (what the peer's K-FAC
    takes), in ``net.parameters()`` order."""
    ids = {
        id(p)
        for m in net.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        for p in m.parameters()
    }
    return [p for p in net.parameters() if id(p) in ids]


class GPTBlock(torch.nn.Module):
    """A pre-norm block: causal ``MultiheadAttention`` and a GELU MLP, both residual."""

    def __init__(self, width, heads, ratio):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, ratio * width)
        self.fc2 = torch.nn.Linear(ratio * width, width)

    def forward(self, h):
        a = self.ln1(h)
        length = h.shape[1]
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool, device=h.device), 1)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h))))


class GPT(torch.nn.Module):
    """Token embedding, learned positions (an ``Embedding`` of ``arange(S)``), blocks,
    final LayerNorm and a linear head; logits ``(N, S, V)``, or ``(N, V, S)`` with
    ``classes_second`` (as ``torch.nn.CrossEntropyLoss`` takes them)."""

    def __init__(self, spec, classes_second=False):
        super().__init__()
        V, E = spec["vocab"], spec["width"]
        self.classes_second = classes_second
        self.tok = torch.nn.Embedding(V, E)
        self.pos = torch.nn.Embedding(spec["seq"], E)
        self.blocks = torch.nn.ModuleList(
            [GPTBlock(E, spec["heads"], spec["ratio"]) for _ in range(spec["blocks"])]
        )
        self.ln_f = torch.nn.LayerNorm(E)
        self.head = torch.nn.Linear(E, V)

    def forward(self, ids):
        N, length = ids.shape
        positions = torch.arange(length, device=ids.device).expand(N, length)
        h = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.ln_f(h))
        return logits.transpose(1, 2) if self.classes_second else logits


def build_gpt(spec, arrays, dtype=torch.float32, classes_second=False):
    """The :class:`GPT` of ``spec`` (keys ``vocab, width, heads, seq, blocks, ratio``), in
    evaluation mode, its parameters set from ``arrays["p0"], ...`` in
    ``named_parameters()`` order (``tok, pos``; per block ``ln1, attn (in_proj_weight,
    in_proj_bias, out_proj), ln2, fc1, fc2``; ``ln_f, head``)."""
    net = GPT(spec, classes_second).to(dtype)
    params = list(net.parameters())
    with torch.no_grad():
        for i, p in enumerate(params):
            value = torch.as_tensor(arrays[f"p{i}"], dtype=dtype)
            if value.shape != p.shape:
                raise ValueError(f"p{i} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
            p.copy_(value)
    if f"p{len(params)}" in arrays:
        raise ValueError(f"the description has {len(params)} parameters, the arrays more")
    return net.eval()


def gpt_linear_params(net):
    """The parameters of the GPT's ``torch.nn.Linear`` modules called as modules (the
    MLPs and the head; not ``MultiheadAttention.out_proj``, whose weight the attention
    uses directly), in ``net.parameters()`` order: what the peer's K-FAC can take."""
    ids = {
        id(p)
        for m in net.modules()
        if type(m) is torch.nn.Linear  # out_proj is a subclass, not called as a module
        for p in m.parameters()
    }
    return [p for p in net.parameters() if id(p) in ids]


def serve(operations):
    """Answer timing requests on stdin until ``quit`` (or end of input).

    A request ``<name> <count>`` runs ``operations[name]()`` ``count`` times and answers
    one line, the JSON list of the calls' wall times in seconds (garbage collection off
    while timing, as in ``_timing.time_ratio``).
    """
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        fn, count = operations[words[0]], int(words[1])
        times = []
        gc.disable()
        try:
            for _ in range(count):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        finally:
            gc.enable()
        print(json.dumps(times), flush=True)


def main_cnn(d, dst, serve_after):
    """The CNN: products for the value checks, then (``serve_after``) timing on request."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator, KFACLinearOperator

    torch.set_num_threads(int(d["threads"]))
    net = build_cnn(json.loads(str(d["cnn"])), d)
    params = list(net.parameters())
    X = torch.as_tensor(d["X"], dtype=torch.float32)
    y = torch.as_tensor(d["y"]).long()
    N = X.shape[0]
    data = [(X, y)]
    loss = torch.nn.CrossEntropyLoss()
    v = torch.as_tensor(d["v"], dtype=torch.float32)
    v_kfac = torch.as_tensor(d["v_kfac"], dtype=torch.float32)
    kw = dict(check_deterministic=False, num_data=N)
    G = GGNLinearOperator(net, loss, params, data, **kw)
    H = HessianLinearOperator(net, loss, params, data, **kw)

    def kfac():
        # The peer computes its factors lazily (in the first product): compute them here,
        # so that construction means factors, as in curvlinops.
        K = KFACLinearOperator(
            net,
            loss,
            tapped_params(net),
            data,
            fisher_type="type-2",
            num_per_example_loss_terms=1,  # else one more pass over the data counts them
            **kw,
        )
        K.compute_kronecker_factors()
        return K

    def lossgrad():
        return torch.autograd.grad(loss(net(X), y), params)

    out = {"ggn_v": (G @ v).numpy(), "hess_v": (H @ v).numpy(), "kfac_v": (kfac() @ v_kfac).numpy()}
    np.savez(dst, **out)
    if serve_after:
        serve({"grad": lossgrad, "ggn": lambda: G @ v, "hessian": lambda: H @ v, "kfac": kfac})


def main_gpt(d, dst, serve_after):
    """The GPT: products for the value checks, then (``serve_after``) timing on request."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator, KFACLinearOperator

    torch.set_num_threads(int(d["threads"]))
    # Attention through differentiable operations, as curvlinops' TorchModel runs it:
    # the fast path of evaluation mode and the fused scaled-dot-product kernels have no
    # forward-mode derivative (nor double backward).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.backends.mha.set_fastpath_enabled(False)
    math_attention = sdpa_kernel([SDPBackend.MATH])
    math_attention.__enter__()  # for the rest of the process (kept referenced below)
    spec = json.loads(str(d["gpt"]))
    net = build_gpt(spec, d, classes_second=True)
    params = list(net.parameters())
    X = torch.as_tensor(d["X"]).long()
    y = torch.as_tensor(d["y"]).long()
    N, S = X.shape
    data = [(X, y)]
    loss = torch.nn.CrossEntropyLoss()
    v = torch.as_tensor(d["v"], dtype=torch.float32)
    v_kfac = torch.as_tensor(d["v_kfac"], dtype=torch.float32)
    kw = dict(check_deterministic=False, num_data=N)
    G = GGNLinearOperator(net, loss, params, data, **kw)
    H = HessianLinearOperator(net, loss, params, data, **kw)

    def kfac():
        K = KFACLinearOperator(
            net,
            loss,
            gpt_linear_params(net),
            data,
            fisher_type="type-2",
            kfac_approx="expand",
            num_per_example_loss_terms=S,
            **kw,
        )
        K.compute_kronecker_factors()
        return K

    def lossgrad():
        return torch.autograd.grad(loss(net(X), y), params)

    out = {"ggn_v": (G @ v).numpy(), "hess_v": (H @ v).numpy(), "kfac_v": (kfac() @ v_kfac).numpy()}
    np.savez(dst, **out)
    if serve_after:
        serve({"grad": lossgrad, "ggn": lambda: G @ v, "hessian": lambda: H @ v, "kfac": kfac})
    math_attention.__exit__(None, None, None)


def main(src, dst, serve_after=False):
    d = np.load(src)
    if "cnn" in d.files:
        return main_cnn(d, dst, serve_after)
    if "gpt" in d.files:
        return main_gpt(d, dst, serve_after)
    from curvlinops import (
        EKFACLinearOperator,
        GGNLinearOperator,
        HessianLinearOperator,
        KFACLinearOperator,
    )

    repeats = int(d["repeats"])
    torch.set_num_threads(int(d["threads"]))
    dtype = getattr(torch, str(d["dtype"]))
    num_layers = int(d["num_layers"])
    layers = []
    for i in range(num_layers):
        W = torch.as_tensor(d[f"W{i}"], dtype=dtype)
        lin = torch.nn.Linear(W.shape[1], W.shape[0]).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(torch.as_tensor(d[f"b{i}"], dtype=dtype))
        layers.append(lin)
        if i < num_layers - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    params = [p for p in model.parameters() if p.requires_grad]
    X = torch.as_tensor(d["X"], dtype=dtype)
    y = torch.as_tensor(d["y"]).long()
    data = [(X, y)]
    loss = torch.nn.CrossEntropyLoss()
    v = torch.as_tensor(d["v"], dtype=dtype)
    V = torch.as_tensor(d["V"], dtype=dtype)
    out = {}
    G = GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    H = HessianLinearOperator(model, loss, params, data, check_deterministic=False)
    out["t_grad"] = timed(lambda: G.gradient_and_loss(), repeats)
    out["ggn_v"] = (G @ v).numpy()
    out["hess_v"] = (H @ v).numpy()
    out["t_ggn_matvec"] = timed(lambda: G @ v, repeats)
    out["t_hess_matvec"] = timed(lambda: H @ v, repeats)
    out["t_ggn_matmat"] = timed(lambda: G @ V, max(1, repeats // 2))
    if int(d.get("kfac", 0)):

        def kfac():
            return KFACLinearOperator(
                model, loss, params, data, fisher_type="type-2", check_deterministic=False
            )

        def ekfac():
            return EKFACLinearOperator(
                model, loss, params, data, fisher_type="type-2", check_deterministic=False
            )

        # The peer computes its factors lazily, in the first product: time construction
        # together with one product so that the factors are really computed.
        K = kfac()
        out["kfac_v"] = (K @ v).numpy()
        out["t_kfac_build"] = timed(lambda: kfac() @ v, max(1, repeats // 2))
        out["t_kfac_matvec"] = timed(lambda: K @ v, repeats)
        E = ekfac()
        out["ekfac_v"] = (E @ v).numpy()
        out["t_ekfac_build"] = timed(lambda: ekfac() @ v, max(1, repeats // 2))
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], serve_after="--serve" in sys.argv[3:])
