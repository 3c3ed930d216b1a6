"""Host-offloaded optimizer state: placement, streaming, numerics against optax, sharding, donation.

On CPU every memory kind is the same RAM, so these tests check where jax says the state is, what
the compiled step moves and when, and that the numbers equal optax's; not the memory savings
(experiments/bench_optimizer.py measures those on a GPU).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax import optim
from qlora_jax.optim import streaming

REPO = pathlib.Path(__file__).resolve().parents[2]
L, R, D, F, OUT = 3, 4, 32, 48, 16
LR, WD, WARMUP, CLIP = 1e-2, 0.1, 3, 0.3
SHARDED_EPS = 1e-3


def lora_params(rng: np.random.Generator) -> dict:
    """LoRA-shaped adapters stacked over L layers (models.llama layout), plus unstacked head and bias."""
    def normal(*shape, scale=0.2):
        return jnp.asarray(rng.normal(0.0, scale, size=shape), jnp.float32)

    return {
        "layers": {
            "self_attn": {"q_proj": {"lora_A": normal(L, R, D), "lora_B": normal(L, D, R)}},
            "mlp": {"up_proj": {"lora_A": normal(L, R, D), "lora_B": normal(L, F, R)},
                    "down_proj": {"lora_A": normal(L, R, F), "lora_B": normal(L, D, R)}},
            "input_layernorm": 1.0 + normal(L, D, scale=0.05),
        },
        "head": normal(D, OUT),
        "head_bias": normal(OUT, scale=0.05),
    }


def loss_fn(params, x, y):
    """A small residual network that uses every leaf, so every gradient is non-zero."""
    layers = params["layers"]
    h = x
    for i in range(L):
        q = layers["self_attn"]["q_proj"]
        up, down = layers["mlp"]["up_proj"], layers["mlp"]["down_proj"]
        hn = h * layers["input_layernorm"][i]
        h = h + jnp.tanh(hn @ q["lora_A"][i].T @ q["lora_B"][i].T)
        u = jax.nn.gelu(hn @ up["lora_A"][i].T @ up["lora_B"][i].T)
        h = h + u @ down["lora_A"][i].T @ down["lora_B"][i].T
    out = h @ params["head"] + params["head_bias"]
    return jnp.mean((out - y) ** 2)


def reference_mask(params):
    """Written out by hand: the LoRA matrices and the head decay; norm and bias do not."""
    mask = jax.tree.map(lambda _: True, params)
    mask["layers"]["input_layernorm"] = False
    mask["head_bias"] = False
    return mask


def reference_optimizer(eps: float = 1e-8):
    """optax's own AdamW with clipping and Hugging Face's constant-with-warmup schedule."""
    schedule = lambda count: LR * jnp.minimum(1.0, count / WARMUP)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(CLIP),
                       optax.adamw(schedule, b1=0.9, b2=0.999, eps=eps, weight_decay=WD, mask=reference_mask))


def data(rng):
    x = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, OUT)), jnp.float32)
    return x, y


def make_step(optimizer):
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def leaf_kinds(tree) -> set[str]:
    return set(jax.tree.leaves(optim.tree_memory_kinds(tree)))


def assert_offloaded(state) -> None:
    """Offloaded: the moments (leaves with an axis) in pinned host memory, the step counts on the device."""
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state) if x.ndim >= 1} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state) if x.ndim == 0} == {"device"}


def assert_trees_close(actual, expected, rtol, atol):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def paged(name_or_stream):
    """The offloaded optimizers under test: the factory's, and offload_state's two modes."""
    core = optim.adamw(optim.warmup_constant_schedule(LR, WARMUP), weight_decay=WD)
    if name_or_stream == "stream":
        return optax.chain(optax.clip_by_global_norm(CLIP),
                           optim.offload_state(core, placement="layers", elementwise=True, max_group_size=64))
    if name_or_stream == "whole":
        return optax.chain(optax.clip_by_global_norm(CLIP), optim.offload_state(core, placement="whole"))
    return optim.make_optimizer(name_or_stream, LR, warmup_steps=WARMUP, weight_decay=WD, max_grad_norm=CLIP,
                                placement="layers")


@pytest.mark.parametrize("variant", ["paged_adamw", "stream", "whole"])
def test_offloaded_adamw_matches_optax_over_20_steps(rng, variant):
    params, (x, y) = lora_params(rng), data(rng)
    initial = jax.tree.map(np.asarray, params)
    optimizer = paged(variant)
    state = optimizer.init(params)
    assert_offloaded(state)
    train_step = optim.jit_train_step(make_step(optimizer), state, donate_argnums=(0, 1))

    reference = reference_optimizer()
    ref_params = jax.tree.map(jnp.asarray, initial)  # own buffers: the step donates `params`
    ref_state = reference.init(ref_params)
    ref_step = jax.jit(make_step(reference))
    for _ in range(20):
        params, state = train_step(params, state, x, y)
        ref_params, ref_state = ref_step(ref_params, ref_state, x, y)
        # Between steps every state leaf lives in pinned host memory, and jax's abstract value
        # agrees (a stale "device" aval would make the next step skip the copy to the device).
        assert_offloaded(state)
        assert all(jax.typeof(s).memory_space == jax.memory.Space.Host for s in jax.tree.leaves(state) if s.ndim)
    # The trajectory moved well beyond float32 rounding, and matches optax to it.
    moved = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(params),
                                                                           jax.tree.leaves(initial), strict=True))
    assert moved > 0.05
    assert_trees_close(params, ref_params, rtol=2e-5, atol=2e-6)
    assert len(train_step._compiled) == 1  # one compilation: the state came back where it was expected


def test_per_layer_without_offload_matches_optax(rng):
    params, (x, y) = lora_params(rng), data(rng)
    optimizer = optax.chain(optax.clip_by_global_norm(CLIP),
                            optim.per_layer(optim.adamw(optim.warmup_constant_schedule(LR, WARMUP), weight_decay=WD)))
    reference = reference_optimizer()
    state, ref_state, ref_params = optimizer.init(params), reference.init(params), params
    assert leaf_kinds(state) == {"device"}
    step, ref_step = jax.jit(make_step(optimizer)), jax.jit(make_step(reference))
    for _ in range(10):
        params, state = step(params, state, x, y)
        ref_params, ref_state = ref_step(ref_params, ref_state, x, y)
    assert_trees_close(params, ref_params, rtol=2e-5, atol=2e-6)


def _device_puts(jaxpr, inside_scan=False, found=None):
    """(inside a scan?, shapes) of every device_put to device memory in a jaxpr, recursively."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "device_put":
            targets = eqn.params["devices"]
            if any(t == jax.memory.Space.Device for t in targets):
                found.append((inside_scan, tuple(tuple(v.aval.shape) for v in eqn.invars)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _device_puts(sub, inside_scan or eqn.primitive.name == "scan", found)
    return found


def test_state_reaches_the_device_one_piece_at_a_time(rng):
    """The compiled update moves one layer's state (the loop's prefetch) or one group at a time."""
    params = lora_params(rng)
    max_group = D * OUT  # head alone fills a group; head_bias gets its own
    optimizer = optim.offload_state(optax.adam(1e-3), placement="layers", elementwise=True, max_group_size=max_group)
    state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    jaxpr = jax.make_jaxpr(lambda g, s, p: optimizer.update(g, s, p))(grads, state, params).jaxpr
    puts = _device_puts(jaxpr)
    assert puts, "the offloaded update never copies state to the device"

    stacked = {tuple(x.shape) for x in jax.tree.leaves(params["layers"])}
    one_layer = {(1, *s[1:]) for s in stacked}
    for inside_scan, shapes in puts:
        for shape in shapes:
            assert shape not in stacked, f"a whole layer-stacked state leaf {shape} is copied at once"
            if inside_scan:  # the next layer's state, prefetched
                assert shape in one_layer, shape
            else:  # the first layer's, the groups, the step count
                assert shape in one_layer or int(np.prod(shape)) <= max_group, shape
    assert any(inside for inside, _ in puts) and any(not inside for inside, _ in puts)
    plan = streaming.plan_pieces(params, streaming.layer_stacked, max_group)
    assert plan.num_layers == L and len(plan.groups) == 2


def test_streamed_pieces_see_layer_slices_with_full_paths(rng):
    """Inside the stream a piece is a tree of the params' structure: masks by path keep working."""
    seen = []

    def record(updates, state, params=None):
        del params
        seen.append(jax.tree_util.tree_map_with_path(lambda p, x: (jax.tree_util.keystr(p), x.shape), updates))
        return updates, state

    probe = optax.GradientTransformation(lambda p: optax.EmptyState(), record)
    params = lora_params(rng)
    optimizer = optim.offload_state(probe)
    optimizer.update(params, optimizer.init(params), params)
    layer_piece = seen[0]
    assert layer_piece["layers"]["self_attn"]["q_proj"]["lora_A"] == ("['layers']['self_attn']['q_proj']['lora_A']",
                                                                       (R, D))
    assert layer_piece["head"] is None
    assert {leaf[1] for leaf in jax.tree.leaves(seen[1:], is_leaf=lambda x: isinstance(x, tuple))} == {
        (D, OUT), (OUT,)}


def test_sharded_state_stays_sharded_and_pinned(rng):
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 host devices"
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {
        "layers": {
            "self_attn": {"q_proj": {"lora_A": P(None, None, "model"), "lora_B": P(None, "model", None)}},
            "mlp": {"up_proj": {"lora_A": P(None, None, "model"), "lora_B": P(None, "model", None)},
                    "down_proj": {"lora_A": P(None, None, "data"), "lora_B": P(None, "model", None)}},
            "input_layernorm": P(None, "model"),
        },
        "head": P("data", "model"),
        "head_bias": P(),
    }
    host_params = lora_params(rng)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(host_params, shardings)
    x, y = data(rng)
    final = {}
    for name in ("paged_adamw", "paged_adamw_8bit"):
        # eps=1e-3: Adam divides by sqrt(v), so a near-zero gradient turns the float32 noise of a
        # different (sharded) reduction order into a full-size update; a larger eps damps exactly those.
        optimizer = optim.make_optimizer(name, LR, warmup_steps=WARMUP, weight_decay=WD, min_8bit_size=64,
                                         eps=SHARDED_EPS, placement="layers")
        state = optimizer.init(params)
        train_step = optim.jit_train_step(make_step(optimizer), state, donate_argnums=(1,))
        p = params
        for _ in range(3):
            p, state = train_step(p, state, x, y)
        final[name] = p
        adam = state[1][0]  # chain(clip, offloaded AdamW chain): the Adam scaling's own state
        assert_offloaded(state)
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.mesh == mesh
        # Each moment keeps its parameter's partitioning: only the memory kind changed.
        for moment in (adam.mu, adam.nu):
            for (path, m), spec in zip(jax.tree_util.tree_flatten_with_path(moment["layers"])[0],
                                       jax.tree.leaves(specs["layers"]), strict=True):
                assert m.sharding.spec == spec, (name, jax.tree_util.keystr(path), m.sharding.spec, spec)
        assert adam.count.sharding.spec == P() and adam.count.shape == ()
        assert adam.mu["head"].sharding.spec == P("data", "model")
        if name.endswith("8bit"):
            assert adam.mu["head"].dtype == jnp.uint8 and adam.mu_absmax["head"].sharding.spec == P()
        for leaf, spec in zip(jax.tree.leaves(p), jax.tree.leaves(specs), strict=True):
            assert leaf.sharding.spec == spec and leaf.sharding.memory_kind == "device"

    # Sharding changes nothing numerically: the same steps on one device with optax's AdamW.
    reference = reference_optimizer(eps=SHARDED_EPS)
    plain, plain_state, plain_step = host_params, reference.init(host_params), jax.jit(make_step(reference))
    for _ in range(3):
        plain, plain_state = plain_step(plain, plain_state, x, y)
    assert_trees_close(final["paged_adamw"], plain, rtol=2e-5, atol=2e-6)


DONATION_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, optax
    from qlora_jax import optim

    params = {"layers": {"lora_A": jnp.full((2, 8, 64), 0.1), "lora_B": jnp.full((2, 64, 8), 0.2)},
              "head": jnp.full((64, 16), 0.3), "bias": jnp.full((16,), 0.05)}
    grads = jax.tree.map(lambda p: 0.5 * p + 0.01, params)

    def build(config):
        name = "paged_adamw_8bit" if "8bit" in config else "paged_adamw"
        placement = "auto" if "auto" in config else "layers"
        optimizer = optim.make_optimizer(name, 1e-2, min_8bit_size=256, placement=placement)
        state = optimizer.init(params)

        def step(p, s, g):
            updates, s = optimizer.update(g, s, p)
            return optax.apply_updates(p, updates), s, {"norm": optax.global_norm(updates)}

        donate = (1,) if "d1" in config else (0, 1)
        if config.startswith("helper"):
            return optim.jit_train_step(step, state, donate_argnums=donate), state
        return jax.jit(step, donate_argnums=donate), state

    for config in sys.argv[1:]:
        f, state = build(config)
        p = jax.tree.map(jnp.copy, params)
        try:
            optim.check_donation(f, p, state, grads)
            print(config, "CHECK ok", flush=True)
        except optim.DonationError as e:
            print(config, "CHECK DonationError:", e, flush=True)
        for i in range(3):
            old = state
            p, state, metrics = f(p, state, grads)
            assert all(x.is_deleted() for x in jax.tree.leaves(old)), "the state was not donated"
            kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state) if x.ndim}
            assert kinds == ({"device"} if "auto" in config else {"pinned_host"}), kinds
        print(config, "RAN", float(metrics["norm"]), flush=True)
""")


def _run_donation(*configs: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", DONATION_SCRIPT, *configs], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)


def test_donation_under_plain_jit_and_the_helper():
    """Donation on, in subprocesses: an abort there fails this test instead of killing pytest.

    With "auto" (the state on the device: CPU has no separate device memory) the user's own
    ``jax.jit(step, donate_argnums=(1,))`` donates the state and runs, 32- and 8-bit. With the state
    in host memory the helper-built step donates it and runs, and so does a plain jit donating
    parameters and state together; the plain ``donate_argnums=(1,)`` really aborts the process
    (jax 0.11), and check_donation flags it (and only it) beforehand.
    """
    safe = _run_donation("auto_raw_d1", "auto_raw_d1_8bit", "helper_d1", "helper_d01_8bit", "raw_d01")
    assert safe.returncode == 0, safe.stdout + safe.stderr[-3000:]
    lines = safe.stdout.splitlines()
    for config in ("auto_raw_d1", "auto_raw_d1_8bit", "helper_d1", "helper_d01_8bit", "raw_d01"):
        assert f"{config} CHECK ok" in lines, (config, safe.stdout)
        assert any(line.startswith(f"{config} RAN") for line in lines), (config, safe.stdout)

    risky = _run_donation("raw_d1")
    assert risky.returncode != 0 and "RAN" not in risky.stdout
    assert "memory kind" in risky.stderr, risky.stderr[-3000:]
    assert "raw_d1 CHECK DonationError" in risky.stdout and "argument 1" in risky.stdout, risky.stdout


def test_step_rejects_state_in_the_wrong_memory(rng):
    params, (x, y) = lora_params(rng), data(rng)
    optimizer = optim.make_optimizer("paged_adamw", LR, placement="layers")
    state = optimizer.init(params)
    train_step = optim.jit_train_step(make_step(optimizer), state)
    on_device = jax.device_put(state, jax.memory.Space.Device)
    expected = r"optimizer state leaf \[1\]\[0\]\.mu.* placed as .*memory_kind=device.* expects .*pinned_host"
    with pytest.raises(ValueError, match=expected):
        train_step(params, on_device, x, y)


def test_state_for_another_tree_is_rejected(rng):
    params = lora_params(rng)
    optimizer = optim.offload_state(optax.adam(1e-3), placement="layers")
    state = optimizer.init({"head": params["head"]})
    with pytest.raises(ValueError, match="does not fit these gradients"):
        optimizer.update(params, state, params)


def test_inconsistent_layer_axes_are_rejected(rng):
    params = lora_params(rng)
    params["layers"]["extra"] = jnp.ones((L + 1, 4))
    with pytest.raises(ValueError, match=r"share their leading \(layer\) axis.*extra"):
        optim.offload_state(optax.adam(1e-3)).init(params)


def test_memory_kinds_and_unpinned_host():
    kinds = optim.memory_kinds()
    assert "device" in kinds and "pinned_host" in kinds
    assert optim.supports_memory_kind("pinned_host")
    assert not optim.supports_memory_kind("no_such_memory")
    with pytest.raises(ValueError, match="pinned_host"):
        optim.offload_state(optax.adam(1e-3), memory_kind="unpinned_host")


def test_offloaded_state_survives_an_orbax_round_trip(rng, tmp_path):
    """Resume: the restored state is pinned_host again and the step takes it without recompiling."""
    import orbax.checkpoint as ocp

    params, (x, y) = lora_params(rng), data(rng)
    optimizer = optim.make_optimizer("paged_adamw_8bit", LR, min_8bit_size=64, placement="layers")
    state = optimizer.init(params)
    train_step = optim.jit_train_step(make_step(optimizer), state, donate_argnums=())
    params, state = train_step(params, state, x, y)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored = checkpointer.restore(tmp_path / "state", target)
    assert_offloaded(restored)
    # Orbax's arrays are in host memory but jax's abstract values say device; the step re-tags
    # them, so that the state it traces is host-resident and gets copied to the device.
    refreshed = optim.refresh_host_avals(restored)
    assert all(jax.typeof(x).memory_space == jax.memory.Space.Host for x in jax.tree.leaves(refreshed) if x.ndim)
    traced = train_step.jitted(params, refreshed, x, y).trace(params, refreshed, x, y)
    assert all(a.memory_space == jax.memory.Space.Host for a in jax.tree.leaves(traced.in_avals[0][1]) if a.ndim)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    expected, _ = train_step(params, state, x, y)
    resumed, _ = train_step(params, restored, x, y)
    assert_trees_close(resumed, expected, rtol=0, atol=0)
    assert len(train_step._compiled) == 1


def test_custom_stacked_predicate_streams_other_layouts_per_layer(rng):
    """offload_state(stacked=...): arrays stacked under another key ("blocks") stream one layer slice at a time
    with the predicate, as a whole group without it; both match plain optax.adam step for step."""
    blocks, d = 3, 8
    params = {"blocks": {"w": jnp.asarray(rng.normal(size=(blocks, d, d)), jnp.float32),
                         "b": jnp.asarray(rng.normal(size=(blocks, d)), jnp.float32)},
              "head": jnp.asarray(rng.normal(size=(d, 2)), jnp.float32)}
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params) for _ in range(3)]

    def by_blocks(path, leaf):
        return any(getattr(k, "key", None) == "blocks" for k in path)

    def shapes_seen(stacked):
        seen = []

        def record(updates, state, params=None):
            del params
            seen.append(sorted(tuple(x.shape) for x in jax.tree.leaves(updates)))
            return updates, state

        probe = optax.GradientTransformation(lambda p: optax.EmptyState(), record)
        optimizer = optim.offload_state(probe, stacked=stacked, placement="layers")
        optimizer.update(params, optimizer.init(params), params)
        return seen

    # With the predicate: the layer pieces are one block's slices; without it, whole arrays in groups.
    assert [(d,), (d, d)] in shapes_seen(by_blocks)
    assert all((blocks, d, d) not in shapes for shapes in shapes_seen(by_blocks))
    assert any((blocks, d, d) in shapes for shapes in shapes_seen(streaming.layer_stacked))
    reference = optax.adam(1e-2)
    for stacked in (by_blocks, streaming.layer_stacked):
        optimizer = optim.offload_state(optax.adam(1e-2), stacked=stacked, placement="layers", elementwise=True)
        p, state = params, optimizer.init(params)
        q, ref_state = params, reference.init(params)
        for g in grads:
            updates, state = optimizer.update(g, state, p)
            p = optax.apply_updates(p, updates)
            ref_updates, ref_state = reference.update(g, ref_state, q)
            q = optax.apply_updates(q, ref_updates)
        # Adam is elementwise: the same float32 operations on each value, in any split.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                     p, q)
