"""Shared test tools: central-difference gradients and llm.c-style comparisons."""
import numpy as np


def rel_error(got, ref):
    """max|got - ref| / max(max|got|, max|ref|): the error relative to the tensor's scale."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = max(np.abs(got).max(initial=0.0), np.abs(ref).max(initial=0.0))
    diff = np.abs(got - ref).max(initial=0.0)
    return diff / scale if scale > 0 else diff


def check_close(name, got, ref, tol):
    """Compare one tensor; return a report line. Shapes must match exactly."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64)).max(initial=0.0)
    rel = rel_error(got, ref)
    status = "OK" if rel <= tol else "FAIL"
    return rel <= tol, f"{status:4} {name:40s} max|Δ| {diff:.3e}  rel {rel:.3e}  (tol {tol:.0e})"


def assert_all_close(pairs, tol):
    """pairs: iterable of (name, got, ref). Prints every line; fails listing the bad ones."""
    lines, bad = [], []
    for name, got, ref in pairs:
        ok, line = check_close(name, got, ref, tol)
        lines.append(line)
        if not ok:
            bad.append(line)
    print("\n".join(lines))
    assert not bad, "tensors differ:\n" + "\n".join(bad)


def numerical_gradient(f, x, h=1e-5):
    """Central-difference gradient of the scalar f() with respect to x (perturbed in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views: x must be contiguous
    assert np.shares_memory(flat, x)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def gradcheck(forward, inputs, dout, analytic, tol=1e-7):
    """Check analytic gradients of loss = sum(forward(**inputs) * dout) against central differences.

    inputs: dict name -> float64 array (perturbed in place and restored);
    analytic: dict name -> gradient from the backward pass.
    """
    def loss():
        return float(np.sum(forward(**inputs) * dout))

    pairs = [(f"d{name}", analytic[name], numerical_gradient(loss, x)) for name, x in inputs.items()]
    assert_all_close(pairs, tol)


# The token-mixing fc2 bias adds one constant per token across all D channels, and
# every consumer of the residual stream is a LayerNorm over D, which removes such a
# constant: its true gradient is exactly zero, so both sides hold only rounding noise
# and a relative comparison is meaningless. It is checked to be zero instead.
STRUCTURALLY_ZERO = "mlp_tokens.fc2.bias"


def assert_grads_close(pairs, tol, zero_tol):
    """Like assert_all_close, but gradients that are zero in exact arithmetic must be
    ≤ zero_tol × (the largest reference gradient) on both sides."""
    pairs = list(pairs)
    scale = max(np.abs(np.asarray(ref, dtype=np.float64)).max(initial=0.0) for _, _, ref in pairs)
    regular = [p for p in pairs if not p[0].endswith(STRUCTURALLY_ZERO)]
    lines, bad = [], []
    for name, got, ref in pairs:
        if name.endswith(STRUCTURALLY_ZERO):
            size = max(np.abs(got).max(), np.abs(ref).max()) / scale
            ok = size <= zero_tol
            line = f"{'OK' if ok else 'FAIL':4} {name:40s} zero: max|g|/max|all| {size:.3e}  (tol {zero_tol:.0e})"
            lines.append(line)
            if not ok:
                bad.append(line)
    print("\n".join(lines))
    assert not bad, "gradients that must vanish do not:\n" + "\n".join(bad)
    assert_all_close(regular, tol)
