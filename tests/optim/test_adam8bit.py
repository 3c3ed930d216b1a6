"""8-bit AdamW: the moment encoding, bitsandbytes' AdamW8bit (CPU oracle), and 32-bit AdamW.

Tolerances, and what they are measured against:

* Encoding (``bnb_backend="cuda"``) against a float64 NumPy nearest-code search: identical codes,
  except the sign guard's documented one-code moves.
* bitsandbytes ``AdamW8bit`` on its CPU backend (``bnb_backend="cpu"``), one step at a time from
  the same state: identical codes except at a rounding tie of bitsandbytes' lookup table (then the
  tie's two codes), absmax within two roundings, parameters within bounds derived from float32
  rounding and beta's float32 representation. Over 10 steps from the same start: codes within one
  code, absmax within 1e-6 relative, parameters within one learning rate.
* Float32 AdamW on a least-squares problem: after 20 steps the 8-bit parameters are within 8% of
  the distance the float32 ones travelled; the loss curves stay within 10% of each other over 300
  steps and end within 1%.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax import optim
from qlora_jax.optim import quantized_moments as qm
from qlora_jax.quant import blockwise
from qlora_jax.quant.codebooks import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED


def moments_like(rng, shape, signed):
    """Values spanning many decades within a block, as Adam moments do (and some exact zeros)."""
    x = np.exp(rng.uniform(np.log(1e-9), 0.0, size=shape)) * np.exp(rng.normal(0, 2, size=shape[:-1] + (1,)))
    if signed:
        x *= rng.choice([-1.0, 1.0], size=shape)
    x[..., ::97] = 0.0
    return x.astype(np.float32)


@pytest.mark.parametrize("signed", [False, True])
def test_cuda_encoding_is_the_nearest_code_with_the_sign_guard(rng, signed):
    x = moments_like(rng, (37, 256), signed)
    codes, absmax = qm.encode_moment(jnp.asarray(x), signed=signed, bnb_backend="cuda")
    codes, absmax = np.asarray(codes).astype(np.int64), np.asarray(absmax)
    np.testing.assert_array_equal(absmax, np.abs(x).max(axis=1))
    table = (DYNAMIC_MAP_SIGNED if signed else DYNAMIC_MAP_UNSIGNED).astype(np.float64)
    unit = x.astype(np.float64) / absmax[:, None].astype(np.float64)
    nearest = np.abs(unit[..., None] - table).argmin(-1)
    expected = nearest.copy()
    if signed:
        # bitsandbytes' kernel moves a code whose value has the other sign one step towards the
        # value's side (a tiny negative moment whose nearest code is +0 becomes the smallest negative).
        flipped = np.signbit(table[nearest]) != np.signbit(x)
        expected[flipped] += np.where(x[flipped] > 0, 1, -1)
        assert flipped.any()
        assert not (np.signbit(table[codes]) != np.signbit(x)).any()
    np.testing.assert_array_equal(codes, expected)
    decoded = np.asarray(qm.decode_moment(jnp.asarray(codes.astype(np.uint8)), jnp.asarray(absmax), signed=signed))
    np.testing.assert_allclose(decoded, table[codes].astype(np.float32) * absmax[:, None], rtol=1e-6, atol=0)


def test_tail_blocks_and_shapes():
    x = jnp.linspace(-1.0, 2.0, 300 * 37, dtype=jnp.float32).reshape(300, 37)
    codes, absmax = qm.encode_moment(x, signed=True)
    assert codes.shape == (300, 37) and codes.dtype == jnp.uint8
    assert absmax.shape == (qm.num_blocks(300 * 37),) == (44,)
    flat = np.asarray(x).reshape(-1)
    np.testing.assert_array_equal(np.asarray(absmax)[-1], np.abs(flat[43 * 256:]).max())
    with pytest.raises(ValueError, match=r"absmax .* must have shape \(44,\)"):
        qm.decode_moment(codes, absmax[:-1], signed=True)
    with pytest.raises(ValueError, match="bnb_backend"):
        qm.encode_moment(x, signed=True, bnb_backend="tpu")


def test_small_leaves_keep_float32_moments_and_state_is_a_quarter():
    params = {"big": jnp.zeros((64, 128)), "small": jnp.zeros((16, 100)), "edge": jnp.zeros(4096)}
    state = optim.scale_by_adam_8bit().init(params)
    assert state.mu["big"].dtype == jnp.uint8 and state.nu["edge"].dtype == jnp.uint8
    assert state.mu["small"].dtype == jnp.float32 and state.mu_absmax["small"] is None
    assert state.mu_absmax["big"].shape == (32,)
    n = 64 * 128
    big = (state.mu["big"], state.nu["big"], state.mu_absmax["big"], state.nu_absmax["big"])
    big_bytes = sum(x.nbytes for x in big)
    assert big_bytes == 2 * (n + 4 * n // 256)  # vs 8 * n for float32 Adam


def _bnb_case(rng):
    """Parameters of several kinds and 10 steps of gradients with per-element scales over decades."""
    shapes = [(64, 128), (300, 37), (16, 100), (4096,)]  # full blocks, tail block, < 4096 (float32), the edge
    layers, layer_shape = 3, (40, 110)  # a layer-stacked leaf: bitsandbytes sees 3 tensors of 4400
    params = [rng.normal(0, 0.1, size=s).astype(np.float32) for s in shapes]
    params += [rng.normal(0, 0.1, size=layer_shape).astype(np.float32) for _ in range(layers)]
    scales = [np.exp(rng.normal(-2.0, 1.0, size=p.shape)).astype(np.float32) for p in params]
    grads = [[(rng.standard_normal(p.shape) * s).astype(np.float32) for p, s in zip(params, scales, strict=True)]
             for _ in range(10)]
    return params, grads, len(shapes), layers


def test_adamw_8bit_matches_bitsandbytes_adamw8bit(rng, oracle):
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    params, grads, n_plain, layers = _bnb_case(rng)
    steps = len(grads)
    arrays = {f"c/p/{i}": p for i, p in enumerate(params)}
    arrays.update({f"c/g/{t + 1}/{i}": g for t, gs in enumerate(grads) for i, g in enumerate(gs)})
    ref = oracle.run("bnb_optim.py", arrays, {"cases": [{
        "name": "c", "optimizer": "AdamW8bit", "lr": lr, "betas": list(betas), "eps": eps, "weight_decay": wd,
        "num_params": len(params), "steps": steps}]})

    # Ours: the plain leaves as a list, the three layers stacked (per_layer gives each its own blocks).
    def pack(xs):
        return {"plain": [jnp.asarray(x) for x in xs[:n_plain]],
                "layers": {"w": jnp.asarray(np.stack(xs[n_plain:]))}}

    def unpack(tree):
        stacked = np.asarray(tree["layers"]["w"])
        return [np.asarray(x) for x in tree["plain"]] + [stacked[i] for i in range(layers)]

    tx = optim.per_layer(optim.adamw_8bit(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=wd,
                                          weight_decay_mask=None, bnb_backend="cpu"))
    p = pack(params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for t in range(steps):
        updates, state = update(pack(grads[t]), state, p)
        p = optax.apply_updates(p, updates)
        theirs_all = (ref[f"c/p/{t + 1}/{i}"] for i in range(len(params)))
        for i, (ours, theirs) in enumerate(zip(unpack(p), theirs_all, strict=True)):
            diff = np.abs(ours - theirs)
            # Over 10 steps the two trajectories may drift by codes that rounded the other way
            # (each step from the same state is exact: test_each_step_from_the_same_state_...);
            # a moment one code apart changes a step by a fraction of lr.
            assert diff.max() <= lr, (t, i, diff.max() / lr)

    adam = state[0]  # the 8-bit Adam scaling's own state (optax's layout): per-layer leaves stacked
    ours = {i: (adam.mu["plain"][i], adam.mu_absmax["plain"][i], adam.nu["plain"][i],
                adam.nu_absmax["plain"][i]) for i in range(n_plain)}
    for j in range(layers):
        ours[n_plain + j] = (adam.mu["layers"]["w"][j], adam.mu_absmax["layers"]["w"][j],
                             adam.nu["layers"]["w"][j], adam.nu_absmax["layers"]["w"][j])
    quantized = 0
    for i, (mu, mu_absmax, nu, nu_absmax) in ours.items():
        if f"c/absmax1/{i}" not in ref:  # bitsandbytes kept this one in float32 (< min_8bit_size)
            assert mu.dtype == jnp.float32 and mu_absmax is None, i
            # float32 moments: equal up to rounding (an entry that nearly cancels has a large relative
            # error, so the absolute tolerance is relative to the tensor's largest entry).
            for ours_m, theirs in ((mu, ref[f"c/state1/{i}"]), (nu, ref[f"c/state2/{i}"])):
                np.testing.assert_allclose(np.asarray(ours_m), theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
            continue
        quantized += 1
        for codes, absmax, key in ((mu, mu_absmax, "1"), (nu, nu_absmax, "2")):
            theirs = ref[f"c/state{key}/{i}"]
            codes = np.asarray(codes)
            assert codes.dtype == np.uint8 and codes.shape == theirs.shape
            assert np.abs(codes.astype(int) - theirs.astype(int)).max() <= 1, (i, key)
            np.testing.assert_allclose(np.asarray(absmax), ref[f"c/absmax{key}/{i}"], rtol=1e-6)
    assert quantized == len(params) - 1  # everything but the (16, 100) leaf


def _least_squares(rng):
    x = jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)
    w_true = jnp.asarray(rng.normal(size=(64, 128)) / 8, jnp.float32)
    y = x @ w_true + 0.1 * jnp.asarray(rng.normal(size=(256, 128)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(64, 128)) * 0.01, jnp.float32), "b": jnp.zeros(128)}
    return params, lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def _train(tx, params, loss, steps):
    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            value, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), value

        (p, s), losses = jax.lax.scan(body, (p, tx.init(p)), None, length=steps)
        return p, s, losses

    return run(params)


@pytest.mark.parametrize("bnb_backend", ["cuda", "cpu"])
def test_adamw_8bit_tracks_float32_adamw(rng, bnb_backend):
    params, loss = _least_squares(rng)
    full, eight = optim.adamw(1e-2), optim.adamw_8bit(1e-2, bnb_backend=bnb_backend)
    w0 = params["w"]

    p32, _, _ = _train(full, params, loss, 20)
    p8, s8, _ = _train(eight, params, loss, 20)
    assert s8[0].mu["w"].dtype == jnp.uint8  # the 8192-value weight really is in 8 bits
    travelled = float(jnp.linalg.norm(p32["w"] - w0))
    assert float(jnp.linalg.norm(p8["w"] - p32["w"])) <= 0.08 * travelled

    _, _, l32 = _train(full, params, loss, 300)
    _, _, l8 = _train(eight, params, loss, 300)
    l32, l8 = np.asarray(l32), np.asarray(l8)
    assert l32[-1] < 0.02 * l32[0]  # it did train
    assert np.max(np.abs(l8 - l32) / l32) <= 0.10
    assert abs(l8[-1] - l32[-1]) <= 0.01 * l32[-1]


def test_paged_8bit_equals_unpaged_8bit(rng):
    """Offloading changes where the 8-bit state lives, not one bit of the result."""
    params = {"layers": {"a": jnp.asarray(rng.normal(size=(2, 64, 96)), jnp.float32)},
              "head": jnp.asarray(rng.normal(size=(96, 64)), jnp.float32)}
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(4)]
    results = []
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        tx = optim.make_optimizer(name, 1e-2, weight_decay=0.1, **({"placement": "layers"} if "paged" in name else {}))
        p, s = params, tx.init(params)
        update = jax.jit(tx.update)
        for g in grads:
            u, s = update(g, s, p)
            p = optax.apply_updates(p, u)
        results.append(p)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="betas"):
        optim.scale_by_adam_8bit(b1=1.0)
    with pytest.raises(ValueError, match="eps"):
        optim.scale_by_adam_8bit(eps=0.0)
    with pytest.raises(ValueError, match="bnb_backend"):
        optim.scale_by_adam_8bit(bnb_backend="gpu")
    with pytest.raises(TypeError, match="uint8"):
        qm.decode_moment(jnp.zeros(4, jnp.int8), jnp.zeros(1), signed=True)


def test_each_step_from_the_same_state_equals_bitsandbytes(rng, oracle):
    """Step by step: at every step t, bitsandbytes' AdamW8bit (CPU backend) starts from *our*
    parameters and 8-bit state after step t - 1 and takes step t with the same gradient, so that
    differences cannot compound and each one is explained by the arithmetic of that step alone."""
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    shapes = [(64, 128), (300, 37), (4096,)]  # full blocks, a tail block, the 8-bit edge
    params = [rng.normal(0, 0.1, size=s).astype(np.float32) for s in shapes]
    scales = [np.exp(rng.normal(-2.0, 1.0, size=p.shape)).astype(np.float32) for p in params]
    steps = 6
    grads = [[(rng.standard_normal(p.shape) * s).astype(np.float32) for p, s in zip(params, scales, strict=True)]
             for _ in range(steps)]
    tx = optim.adamw_8bit(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=wd, weight_decay_mask=None,
                          bnb_backend="cpu")
    p = [jnp.asarray(x) for x in params]
    state = tx.init(p)
    update = jax.jit(tx.update)
    arrays, cases, ours = {}, [], []
    for t in range(steps):
        adam = state[0]
        name = f"s{t + 1}"
        for i in range(len(shapes)):
            arrays.update({f"{name}/p/{i}": np.asarray(p[i]), f"{name}/g/{i}": grads[t][i],
                           f"{name}/state1/{i}": np.asarray(adam.mu[i]), f"{name}/state2/{i}": np.asarray(adam.nu[i]),
                           f"{name}/absmax1/{i}": np.asarray(adam.mu_absmax[i]),
                           f"{name}/absmax2/{i}": np.asarray(adam.nu_absmax[i])})
        cases.append({"name": name, "optimizer": "AdamW8bit_from_state", "lr": lr, "betas": list(betas), "eps": eps,
                      "weight_decay": wd, "num_params": len(shapes), "step": t + 1})
        updates, state = update([jnp.asarray(g) for g in grads[t]], state, p)
        p = optax.apply_updates(p, updates)
        ours.append((p, state[0]))
    ref = oracle.run("bnb_optim.py", arrays, {"cases": cases})
    table = {"1": DYNAMIC_MAP_SIGNED, "2": DYNAMIC_MAP_UNSIGNED}
    for t, (p_t, adam) in enumerate(ours):
        name = f"s{t + 1}"
        for i in range(len(shapes)):
            g = grads[t][i].astype(np.float64)
            previous = {key: arrays[f"{name}/state{key}/{i}"] for key in "12"}
            fresh = {}  # the new moments in float64, from the shared previous state
            for key, beta, value in (("1", betas[0], g), ("2", betas[1], g * g)):
                old = np.asarray(qm.decode_moment(jnp.asarray(previous[key]),
                                                  jnp.asarray(arrays[f"{name}/absmax{key}/{i}"]),
                                                  signed=key == "1")).astype(np.float64)
                fresh[key] = beta * old + (1 - beta) * value
            for codes, absmax, key in ((adam.mu[i], adam.mu_absmax[i], "1"), (adam.nu[i], adam.nu_absmax[i], "2")):
                codes, absmax = np.asarray(codes), np.asarray(absmax)
                theirs = ref[f"{name}/new/state{key}/{i}"]
                # absmax: the largest |moment| of a block, the same float32 sum up to its rounding.
                np.testing.assert_allclose(absmax, ref[f"{name}/new/absmax{key}/{i}"], rtol=2 * U32, atol=0)
                assert_codes_equal_but_for_rounding_ties(codes, theirs, fresh[key], absmax, table[key])
            # The parameter: p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps) in float32 on both sides, in
            # other orders. Each side rounds the decayed p and the sum (half an ulp each, of the
            # larger of p before and after), and the update's own ~8 roundings differ (16u of it).
            # The bias corrections may see beta as float32 (0.999 -> 0.99900001287) on one side and
            # as float64 on the other: sqrt(1 - b2^t) / (1 - b1^t) then differs by their first-order
            # terms, t b^(t-1) |b - float32(b)| / (1 - b^t) (halved under the square root).
            t1 = t + 1
            hyper = sum(scale * t1 * b ** (t1 - 1) * abs(b - float(np.float32(b))) / (1 - b**t1)
                        for b, scale in ((betas[0], 1.0), (betas[1], 0.5)))
            m_hat = fresh["1"] / (1 - betas[0] ** t1)
            v_hat = fresh["2"] / (1 - betas[1] ** t1)
            update = lr * np.abs(m_hat) / (np.sqrt(v_hat) + eps)
            magnitude = np.maximum(np.abs(arrays[f"{name}/p/{i}"]), np.abs(np.asarray(p_t[i])))
            bound = 2 * np.spacing(magnitude) + (16 * U32 + 2 * hyper) * update
            difference = np.abs(np.asarray(p_t[i]) - ref[f"{name}/new/p/{i}"])
            assert np.all(difference <= bound), (t, i, (difference / bound).max())


U32 = float(np.finfo(np.float32).eps) / 2
LUT_SIZE = 65536  # bitsandbytes' CPU quantize table: [-1, 1] in 65536 bins (csrc/cpu_ops.cpp)


def assert_codes_equal_but_for_rounding_ties(ours, theirs, value, absmax, table):
    """8-bit codes of one moment, ours against bitsandbytes' CPU backend: identical, except where
    the value sits on a boundary of bitsandbytes' lookup table, so that a float32 rounding in
    another order puts it in the neighbouring bin (the two codes are then that boundary's two).

    ``value``: the moment in float64 from the shared previous state; ``absmax``: ours, per block.
    The table's bin index is ``(x / absmax + 1) / 2 * (LUT_SIZE - 1) + 1/2``: the two sides' float32
    ``x`` differ by a few roundings (8u relative), which moves the index by 8u (LUT_SIZE - 1) / 2,
    and the index's own arithmetic adds a few roundings of LUT_SIZE: a tie is an index within
    DELTA of an integer.
    """
    delta = 8 * U32 * (LUT_SIZE - 1) / 2 + 8 * U32 * LUT_SIZE
    differ = np.flatnonzero(ours.reshape(-1) != theirs.reshape(-1))
    if differ.size == 0:
        return
    flat_absmax = np.repeat(absmax.astype(np.float64), 256)[: ours.size]
    unit = np.clip(value.reshape(-1)[differ] / flat_absmax[differ], -1, 1)
    index = (unit + 1) / 2 * (LUT_SIZE - 1) + 0.5
    boundary = np.rint(index)
    assert np.all(np.abs(index - boundary) <= delta), index[np.abs(index - boundary) > delta]
    lut = blockwise._cpu_lookup_table(np.asarray(table, np.float32))
    below, above = lut[boundary.astype(int) - 1], lut[np.minimum(boundary.astype(int), LUT_SIZE - 1)]
    pair = np.sort(np.stack([ours.reshape(-1)[differ], theirs.reshape(-1)[differ]]), axis=0)
    np.testing.assert_array_equal(pair, np.sort(np.stack([below, above]), axis=0))
