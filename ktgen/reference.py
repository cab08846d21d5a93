"""Float64 NumPy reference (the oracle) for the MoE LoRA layer (docs/design.md, "The math").

Dimension legend
----------------
    T   number of tokens
    k   routing slots per token (num_experts_per_tok)
    E   number of experts
    H   hidden size (model dim; input and output of the layer)
    I   intermediate size (per expert)
    r   LoRA rank

Shapes
------
    x                [T, H]        input activations
    expert_ids       [T, k]        int, -1 .. E-1 (-1: skipped slot)
    routing_weights  [T, k]
    gate, up         [E, I, H]     frozen base weights (any float dtype, e.g. bf16)
    down             [E, H, I]
    lora.gate_a      [E, r, H]     lora.gate_b  [E, I, r]
    lora.up_a        [E, r, H]     lora.up_b    [E, I, r]
    lora.down_a      [E, r, I]     lora.down_b  [E, H, r]
    grad_out         [T, H]

Math (per token t, slot j, e = expert_ids[t, j], w = routing_weights[t, j]; s = scale)
    g = W_gate[e] x + s * B_gate[e] (A_gate[e] x)
    u = W_up[e]   x + s * B_up[e]   (A_up[e]   x)
    h = silu(g) * u
    y = W_down[e] h + s * B_down[e] (A_down[e] h)
    out[t] = sum_j w * y

Everything is computed in float64. The base weights are converted one expert at a
time, and only for experts that received tokens, so that a full bf16 layer is never
expanded to float64 in memory.
"""

import numpy as np

from .formats import FORMATS
from .spec import LORA_NAMES

# Accuracy limits on relL2 against this reference (docs/design.md, "Accuracy"): (out, every
# gradient: input, routing weights and LoRA) per quant mode.
ACCURACY_LIMITS = {name: fmt.limits for name, fmt in FORMATS.items()}


def limits(mode: str) -> tuple[float, float]:
    """(out limit, gradient limit) of a quant mode."""
    if mode not in ACCURACY_LIMITS:
        raise ValueError(f"mode: expected one of {', '.join(ACCURACY_LIMITS)}, got {mode!r}")
    return ACCURACY_LIMITS[mode]


def rel_l2(actual, expected) -> float:
    """||actual - expected||_2 / max(||expected||_2, 1e-12), in float64."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    if a.shape != e.shape:
        raise ValueError(f"rel_l2: shape mismatch {np.shape(actual)} vs {np.shape(expected)}")
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-12))


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _sigmoid(z):
    # exp(-|z|) never overflows; equals 1/(1+exp(-z)) for every z.
    ez = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))


def _check_routing(x, expert_ids, routing_weights, E):
    T = x.shape[0]
    ids = np.asarray(expert_ids)
    if ids.ndim != 2 or ids.shape[0] != T:
        raise ValueError(f"expert_ids: expected shape [T={T}, k], got {ids.shape}")
    if np.asarray(routing_weights).shape != ids.shape:
        raise ValueError(f"routing_weights: expected shape {ids.shape}, got {np.shape(routing_weights)}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < -1 or ids.max() >= E):
        raise ValueError(f"expert_ids: values must be in -1 .. {E - 1}")
    return ids


def _expert_weights(e, gate, up, down, lora):
    """Float64 copies of expert e's base weights and LoRA matrices (None without LoRA)."""
    Wg, Wu, Wd = _f64(gate[e]), _f64(up[e]), _f64(down[e])
    L = None
    if lora is not None:
        L = {n: _f64(getattr(lora, n)[e]) for n in LORA_NAMES}
    return Wg, Wu, Wd, L


def _expert_forward(xe, Wg, Wu, Wd, L, s, clamp=None):
    """Forward of one expert on its gathered tokens xe [n, H]; returns the intermediates. With
    `clamp` (swiglu_limit L): h = silu(min(g, L)) * clip(u, -L, L)."""
    g = xe @ Wg.T                                   # [n, I]
    u = xe @ Wu.T                                   # [n, I]
    if L is not None:
        ag = xe @ L["gate_a"].T                     # [n, r]  A_gate x
        au = xe @ L["up_a"].T                       # [n, r]  A_up x
        g = g + s * (ag @ L["gate_b"].T)
        u = u + s * (au @ L["up_b"].T)
    else:
        ag = au = None
    gc, uc = (g, u) if clamp is None else (np.minimum(g, clamp), np.clip(u, -clamp, clamp))
    sig = _sigmoid(gc)
    act = gc * sig                                  # silu(g)
    h = act * uc                                    # [n, I]
    y = h @ Wd.T                                    # [n, H]
    if L is not None:
        ad = h @ L["down_a"].T                      # [n, r]  A_down h
        y = y + s * (ad @ L["down_b"].T)
    else:
        ad = None
    return dict(g=g, u=u, gc=gc, uc=uc, sig=sig, act=act, h=h, y=y, ag=ag, au=au, ad=ad)


def _routed(ids, E):
    """Yield (e, token indices, slot indices) for every expert with at least one slot."""
    tok, slot = np.nonzero(ids >= 0)
    exp = ids[tok, slot]
    order = np.argsort(exp, kind="stable")
    tok, slot, exp = tok[order], slot[order], exp[order]
    bounds = np.searchsorted(exp, np.arange(E + 1))
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            yield e, tok[lo:hi], slot[lo:hi]


def forward(x, expert_ids, routing_weights, gate, up, down, lora=None, scale=1.0, clamp=None):
    """out [T, H] float64 = sum over slots of w * expert_e(x) (clamp: the spec's swiglu_limit)."""
    x64 = _f64(x)
    T, H = x64.shape
    E = gate.shape[0]
    ids = _check_routing(x64, expert_ids, routing_weights, E)
    w64 = _f64(routing_weights)
    s = float(scale)

    out = np.zeros((T, H), dtype=np.float64)
    for e, tok, slot in _routed(ids, E):
        Wg, Wu, Wd, L = _expert_weights(e, gate, up, down, lora)
        f = _expert_forward(x64[tok], Wg, Wu, Wd, L, s, clamp)
        # scatter: duplicate tokens (same expert twice in a row) must accumulate
        np.add.at(out, tok, w64[tok, slot][:, None] * f["y"])
    return out


def backward(x, expert_ids, routing_weights, gate, up, down, grad_out, lora=None, scale=1.0, clamp=None):
    """Gradients of sum(out * grad_out) w.r.t. x, routing weights and the LoRA matrices.

    Returns a dict of float64 arrays: "input" [T, H], "routing_weights" [T, k], and with
    LoRA "gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b" (the LoRA shapes).
    """
    x64 = _f64(x)
    T, H = x64.shape
    E = gate.shape[0]
    ids = _check_routing(x64, expert_ids, routing_weights, E)
    w64 = _f64(routing_weights)
    dout = _f64(grad_out)
    if dout.shape != (T, H):
        raise ValueError(f"grad_out: expected shape {(T, H)}, got {dout.shape}")
    s = float(scale)

    dx = np.zeros((T, H), dtype=np.float64)
    dw = np.zeros(ids.shape, dtype=np.float64)
    grads = {"input": dx, "routing_weights": dw}
    if lora is not None:
        for n in LORA_NAMES:
            grads[n] = np.zeros(np.shape(getattr(lora, n)), dtype=np.float64)

    for e, tok, slot in _routed(ids, E):
        Wg, Wu, Wd, L = _expert_weights(e, gate, up, down, lora)
        xe = x64[tok]                                           # [n, H]
        f = _expert_forward(xe, Wg, Wu, Wd, L, s, clamp)
        do = dout[tok]                                          # [n, H]

        dw[tok, slot] = np.sum(do * f["y"], axis=1)             # <dOut[t], y>
        dy = w64[tok, slot][:, None] * do                       # [n, H]

        dh = dy @ Wd                                            # W_down^T dy   [n, I]
        if L is not None:
            bdy = dy @ L["down_b"]                              # B_down^T dy   [n, r]
            dh = dh + s * (bdy @ L["down_a"])                   # A_down^T (.)
            grads["down_b"][e] += s * (dy.T @ f["ad"])          # [H, r]
            grads["down_a"][e] += s * (bdy.T @ f["h"])          # [r, I]

        g, sig = f["gc"], f["sig"]
        dg = dh * f["uc"] * sig * (1.0 + g * (1.0 - sig))       # [n, I]
        du = dh * f["act"]                                      # [n, I]
        if clamp is not None:  # the clamps pass the gradient inside their bounds (included)
            dg = dg * (f["g"] <= clamp)
            du = du * ((f["u"] >= -clamp) & (f["u"] <= clamp))

        dxe = dg @ Wg + du @ Wu                                 # [n, H]
        if L is not None:
            bdg = dg @ L["gate_b"]                              # B_gate^T dg   [n, r]
            bdu = du @ L["up_b"]                                # B_up^T du     [n, r]
            dxe = dxe + s * (bdg @ L["gate_a"]) + s * (bdu @ L["up_a"])
            grads["gate_b"][e] += s * (dg.T @ f["ag"])          # [I, r]
            grads["gate_a"][e] += s * (bdg.T @ xe)              # [r, H]
            grads["up_b"][e] += s * (du.T @ f["au"])            # [I, r]
            grads["up_a"][e] += s * (bdu.T @ xe)                # [r, H]
        np.add.at(dx, tok, dxe)
    return grads
