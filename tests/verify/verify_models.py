"""A hand-written two-layer tanh network speaking the model protocol, with optional bugs.

``f(x) = tanh(x W1^T + b1) W2^T`` with parameters ``[W1 (H, D), b1 (H,), W2 (C, H)]``,
all three tiers derived by hand with array-API calls. ``bug`` plants one mistake:

- ``"vjp_scale"``: the vjp is scaled by 1.01;
- ``"vjp_transpose"``: the vjp uses ``W2`` where ``W2^T`` belongs (needs ``C == H``);
- ``"jvp_sign"``: the ``W2`` part of the jvp has the wrong sign;
- ``"second_order"``: the second-order product drops the tanh curvature term;
- ``"taps"``: the first layer's output gradients miss the tanh derivative;
- ``"vjp_shape"``: the vjp returns the first weight's gradient transposed.
"""

from __future__ import annotations

from curvlinops import LayerTap, Linearization, Model, Tier, array_namespace


class TanhNetLinearization(Linearization):
    def __init__(self, model, params, x, outputs, hidden):
        super().__init__(model, params, x, outputs)
        self.hidden = hidden
        self.xp = array_namespace(x)
        self.bug = model.bug

    def _dtanh(self):
        return (1 - self.hidden**2)[..., None]

    def _hidden_tangent(self, tangents):
        V1, Vb, _ = tangents
        return self._dtanh() * (self.xp.tensordot(self.x, V1, axes=([1], [1])) + Vb[None, ...])

    def _jvp(self, tangents):
        xp = self.xp
        W2 = self.params[2]
        da = self._hidden_tangent(tangents)
        through = xp.permute_dims(xp.tensordot(da, W2, axes=([1], [1])), (0, 2, 1))
        direct = xp.tensordot(self.hidden, tangents[2], axes=([1], [1]))
        return through - direct if self.bug == "jvp_sign" else through + direct

    def _hidden_cotangent(self, U):
        xp = self.xp
        W2 = self.params[2]
        if self.bug == "vjp_transpose":
            ga = xp.tensordot(U, W2, axes=([1], [1]))
        else:
            ga = xp.tensordot(U, W2, axes=([1], [0]))
        return xp.permute_dims(ga, (0, 2, 1))

    def _first_layer_grads(self, gz):
        xp = self.xp
        gW1 = xp.permute_dims(xp.tensordot(gz, self.x, axes=([0], [0])), (0, 2, 1))
        return gW1, xp.sum(gz, axis=0)

    def _vjp(self, U):
        xp = self.xp
        gz = self._dtanh() * self._hidden_cotangent(U)
        gW1, gb = self._first_layer_grads(gz)
        gW2 = xp.permute_dims(xp.tensordot(U, self.hidden, axes=([0], [0])), (0, 2, 1))
        if self.bug == "vjp_shape":
            gW1 = xp.permute_dims(gW1, (1, 0, 2))
        grads = [gW1, gb, gW2]
        return [1.01 * g for g in grads] if self.bug == "vjp_scale" else grads

    def _second_order_vjp(self, u, tangents, cotangent_tangent):
        xp = self.xp
        a = self.hidden[..., None]
        da = self._hidden_tangent(tangents)
        ga = (u @ self.params[2])[..., None]
        d_ga = xp.tensordot(u, tangents[2], axes=([1], [0]))
        d_gz = self._dtanh() * d_ga
        if self.bug != "second_order":
            d_gz = d_gz - 2 * a * da * ga
        gW1, gb = self._first_layer_grads(d_gz)
        gW2 = xp.tensordot(u, da, axes=([0], [0]))
        out = [gW1, gb, gW2]
        if cotangent_tangent is not None:
            w = cotangent_tangent
            w = w(self._jvp(tangents)) if callable(w) else w
            out = [o + g for o, g in zip(out, self._vjp(w), strict=True)]
        return out

    def _layer_taps(self, U):
        if U is None:
            return [LayerTap("0", 0, 1, self.x), LayerTap("1", 2, None, self.hidden)]
        ga = self._hidden_cotangent(U)
        gz = ga if self.bug == "taps" else self._dtanh() * ga
        return [LayerTap("0", 0, 1, self.x, gz), LayerTap("1", 2, None, self.hidden, U)]


class TanhNet(Model):
    """Two-layer tanh network with hand-derived products (all tiers unless told)."""

    def __init__(self, bug=None, tiers=frozenset(Tier)):
        self.bug = bug
        self.tiers = frozenset(tiers)

    def _hidden(self, params, x):
        xp = array_namespace(x)
        return xp.tanh(x @ xp.matrix_transpose(params[0]) + params[1])

    def __call__(self, params, x):
        xp = array_namespace(x)
        return self._hidden(params, x) @ xp.matrix_transpose(params[2])

    def linearize(self, params, x):
        hidden = self._hidden(params, x)
        xp = array_namespace(x)
        outputs = hidden @ xp.matrix_transpose(params[2])
        return TanhNetLinearization(self, params, x, outputs, hidden)


def make_params(rng, D=3, H=4, C=4):
    """NumPy float64 parameters ``[W1, b1, W2]`` and an input batch of 5."""
    params = [rng.normal(size=(H, D)), rng.normal(size=(H,)), rng.normal(size=(C, H))]
    return params, rng.normal(size=(5, D))
