"""The paged optimizer's placements: numerics, where the state lives, the decision, overlap, composition.

Float64 numpy AdamW is the reference. On CPU every memory kind is the same RAM: these tests check
where jax says each leaf is, what the exported CUDA program moves and in which order, and the
numbers; not the savings (experiments/bench_optimizer.py on a GPU).
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from qlora_jax import optim
from qlora_jax.memory import plan_optimizer_state
from qlora_jax.optim import streaming

L, R, D = 4, 4, 16
LR, WD, WARMUP, B1, B2, EPS = 1e-2, 0.1, 2, 0.9, 0.999, 1e-8

PLACEMENTS = {
    "auto": "auto",
    "device": "device",
    "layers": "layers",
    "groups": optim.Placement("host", 2),
    "whole": "whole",
}


def adapters(rng: np.random.Generator) -> dict:
    """LoRA-shaped adapters stacked over L layers, a norm (no decay), and an unstacked head and bias."""
    def normal(*shape, scale=0.3):
        return jnp.asarray(rng.normal(0.0, scale, size=shape), jnp.float32)

    return {"layers": {"q_proj": {"lora_A": normal(L, R, D), "lora_B": normal(L, D, R)},
                       "input_layernorm": 1.0 + normal(L, D, scale=0.05)},
            "head": normal(D, 8), "head_bias": normal(8, scale=0.05)}


def gradients(rng, params, steps):
    return [jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 1.0, size=x.shape), jnp.float32), params)
            for _ in range(steps)]


def adamw_float64(params, grads_per_step):
    """AdamW in float64 numpy (PyTorch's decoupled weight decay, HF's linear warmup, no clipping)."""
    p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        lr = LR * min(1.0, (t - 1) / WARMUP)
        for k, g in _flat(grads).items():
            g = np.asarray(g, np.float64)
            m[k] = B1 * m[k] + (1 - B1) * g
            v[k] = B2 * v[k] + (1 - B2) * g * g
            direction = (m[k] / (1 - B1**t)) / (np.sqrt(v[k] / (1 - B2**t)) + EPS)
            decay = 0.0 if ("norm" in k or k.endswith("bias']")) else WD
            p[k] = p[k] - lr * (direction + decay * p[k])
    return p


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def paged_adamw(placement, **kwargs):
    return optim.make_optimizer("paged_adamw", LR, warmup_steps=WARMUP, weight_decay=WD, max_grad_norm=None,
                                placement=placement, **kwargs)


@functools.cache
def jitted_update(optimizer):
    """One compiled update per optimizer (a NamedTuple of functions, so hashable), reused across calls."""
    return jax.jit(lambda g, s, p: optimizer.update(g, s, p))


def run_steps(optimizer, params, grads_per_step, state=None):
    state = optimizer.init(params) if state is None else state
    step = jitted_update(optimizer)
    for grads in grads_per_step:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def kinds_by_role(state) -> dict[str, set[str]]:
    """Memory kinds of the Adam moments and of the step count of a make_optimizer state."""
    adam = optax.tree_utils.tree_get(state, "ScaleByAdamState")
    return {"moments": {x.sharding.memory_kind for x in jax.tree.leaves((adam.mu, adam.nu))},
            "count": {adam.count.sharding.memory_kind}}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_each_placement_equals_float64_adamw_and_keeps_the_state_where_it_said(rng, name, caplog):
    params = adapters(rng)
    grads = gradients(rng, params, 6)
    optimizer = paged_adamw(PLACEMENTS[name])
    with caplog.at_level(logging.INFO, logger="qlora_jax.optim.offload"):
        state = optimizer.init(params)
    (message,) = [r.getMessage() for r in caplog.records if "paged optimizer state" in r.getMessage()]
    on_host = name in ("layers", "groups", "whole")  # "auto": CPU has no separate device memory
    assert ("state in pinned host memory" in message) == on_host and ("state on the device" in message) != on_host
    assert re.search(r"per step [\d.]+ \w*B to the device and [\d.]+ \w*B to the host", message), message
    expected = {"moments": {"pinned_host" if on_host else "device"}, "count": {"device"}}
    assert kinds_by_role(state) == expected
    # The state is optax's own AdamW tree whatever the placement.
    reference_tree = optax.chain(optim.adamw(optim.warmup_constant_schedule(LR, WARMUP), weight_decay=WD)).init(params)
    assert jax.tree.structure(state[0]) == jax.tree.structure(reference_tree[0])

    final, state = run_steps(optimizer, params, grads)
    assert kinds_by_role(state) == expected
    reference = adamw_float64(params, grads)
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params), strict=True))
    assert moved > 0.02
    for key, x in _flat(final).items():
        np.testing.assert_allclose(np.asarray(x, np.float64), reference[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_8bit_in_chunks_of_layers_equals_unpaged_8bit(rng):
    """8-bit AdamW's blocks stay per layer when layers stream in chunks (one layer at a time:
    tests/optim/test_adam8bit.py, bit for bit)."""
    params = adapters(rng)
    grads = gradients(rng, params, 3)
    common = dict(weight_decay=WD, max_grad_norm=None, min_8bit_size=32)
    expected, _ = run_steps(optim.make_optimizer("adamw_8bit", LR, **common), params, grads)
    got, state = run_steps(optim.make_optimizer("paged_adamw_8bit", LR, placement=optim.Placement("host", 2),
                                                **common), params, grads)
    assert_close(got, expected)  # a chunk vmaps the per-layer update: XLA may fuse it differently (an ulp)
    adam = optax.tree_utils.tree_get(state, "ScaleByAdam8bitState")
    assert adam.mu["layers"]["q_proj"]["lora_A"].dtype == jnp.uint8
    assert adam.mu_absmax["layers"]["q_proj"]["lora_A"].shape == (L, 1)  # one block per layer's tensor
    assert adam.mu["layers"]["q_proj"]["lora_A"].sharding.memory_kind == "pinned_host"


def layout_of(params):
    inner = optim.adamw(LR, weight_decay=WD)
    return optim.state_layout(inner, params, optim.layer_stacked, streaming.DEFAULT_MAX_GROUP_SIZE)


def test_auto_decides_from_free_memory_and_the_planners_accounting(rng):
    """Each branch of "auto" (and "groups"), with the free memory injected."""
    params = {"layers": {"lora_A": jnp.zeros((16, R, D)), "lora_B": jnp.zeros((16, D, R))}}
    layout = layout_of(params)
    state = 2 * 4 * 16 * 2 * R * D  # float32 m and v of 16 layers
    per_layer = state // 16
    count = 4  # the int32 step count, global
    assert optim.offload.state_plan(layout, params, optim.Placement("device")).device_bytes == state + count

    def choose(free, policy="auto"):
        return optim.choose_placement(layout, params, policy, free_device_bytes=free, reserve_device_bytes=1000)

    assert choose(1000 + state + count).where == "device"
    # One byte short: streamed, in groups of 16 // MIN_CHUNKS = 2 layers (3 chunks in flight + count).
    short = choose(1000 + state + count - 1)
    assert short.on_host and short.layers_per_chunk == 2
    assert choose(1000 + 3 * 2 * per_layer + count).layers_per_chunk == 2
    assert choose(1000 + 3 * 2 * per_layer + count - 1).layers_per_chunk == 1
    one = choose(1000 + 3 * per_layer + count - 1)  # not even one layer fits: one layer, and a warning
    assert one.on_host and one.layers_per_chunk == 1 and "exceeds" in one.reason
    # A backend without separate device memory (CPU): "auto" keeps the state on the device; "groups"
    # has no figure to size by and takes the largest groups.
    assert choose(None).where == "device" and "no separate device memory" in choose(None).reason
    assert choose(None, "groups").layers_per_chunk == 2
    # Measured: this CPU backend reports no memory statistics.
    assert optim.measure_free_device_bytes(jax.devices()[:1]) is None
    # The default reserve keeps room for gradients, the update and activations.
    generous = optim.choose_placement(layout, params, "auto", free_device_bytes=100 * state)
    assert generous.where == "device"
    tight = optim.choose_placement(layout, params, "auto", free_device_bytes=state + count)
    assert tight.where == "host"
    with pytest.raises(ValueError, match="unknown placement 'paged'"):
        optim.choose_placement(layout, params, "paged")


def test_the_plan_counts_the_bytes_each_way():
    """plan_optimizer_state: the streamed loop moves the state twice, plus one re-read chunk."""
    plan = plan_optimizer_state(800, on_host=True, layer_state_bytes=640, num_layers=8, layers_per_chunk=2,
                                max_group_bytes=150, global_bytes=4)
    assert plan.host_bytes == 800 and plan.device_bytes == 0
    assert plan.to_host_bytes_per_step == 800 and plan.to_device_bytes_per_step == 800 + 160
    assert plan.device_transient_bytes == max(3 * 160 + 4, 2 * 150 + 4)
    whole = plan_optimizer_state(800, on_host=True, layer_state_bytes=640, num_layers=8, layers_per_chunk=None)
    assert whole.to_device_bytes_per_step == 800 and whole.device_transient_bytes == 2 * 640
    assert plan_optimizer_state(800, on_host=False) == optim.offload.OptimizerStatePlan(800, 0, 0, 0, 0)


def _ssa_graph(body: str) -> tuple[dict, dict, list[str]]:
    """(definitions: name -> line, uses: name -> lines using it, lines) of an MLIR region's text."""
    lines = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
    defs, uses = {}, {}
    for line in lines:
        head = re.match(r"(%[\w#:]+?)(?::\d+)? = ", line)
        if head:
            defs[head.group(1)] = line
        for name in re.findall(r"%[\w]+", line.split(" = ", 1)[-1] if head else line):
            uses.setdefault(name, []).append(line)
    return defs, uses, lines


def _depends_on(name: str, defs: dict) -> set[str]:
    """Every SSA value ``name`` is computed from inside the region ``defs`` describes (itself included)."""
    frontier, seen = {name}, set()
    while frontier:
        value = frontier.pop()
        if value in seen:
            continue
        seen.add(value)
        if value in defs:
            frontier |= set(re.findall(r"%\w+", defs[value].split(" = ", 1)[1]))
    return seen


def _while_body(text: str) -> str:
    start = text.index("} do {")
    depth, i = 1, start + len("} do {")
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start + len("} do {"):i - 1]


def test_exported_cuda_update_prefetches_the_next_layer_during_the_current_one(rng):
    """The streamed update lowered for CUDA (jax.export, no GPU): the double-buffered loop.

    In StableHLO a copy between memories is an ``annotate_device_placement`` custom call; XLA's GPU
    host-offload pass turns each into an asynchronous copy-start/copy-done pair, and the scheduler
    can overlap it with any compute that does not depend on it. The loop body must (1) copy the
    *next* layer's state to the device (index ``min(i + 1, L - 1)``) and hand it to the next
    iteration only, (2) update the *current* layer from the copy the previous iteration made, and
    (3) copy the new state back to host memory. Before the loop, the first layer's copy depends on
    no gradient, so it can overlap the backward pass.
    """
    params = adapters(rng)
    optimizer = paged_adamw("layers")
    state = optimizer.init(params)
    exported = export.export(jax.jit(lambda g, s, p: optimizer.update(g, s, p)), platforms=["cuda"])(
        params, state, params)
    text = exported.mlir_module()
    layer_state = [x for x in jax.tree.leaves(optax.tree_utils.tree_get(state, "ScaleByAdamState"))
                   if x.ndim == 3 or (x.ndim == 2 and x.shape[0] == L)]
    n_leaves = len(layer_state)  # m and v of every layer-stacked leaf
    assert n_leaves == 6

    body = _while_body(text)
    defs, uses, lines = _ssa_graph(body)
    to_device = [line for line in lines if "_xla_buffer_placement = \"device\"" in line]
    to_host = [line for line in lines if "_xla_buffer_placement = \"pinned_host\"" in line]
    assert len(to_device) == n_leaves and len(to_host) == n_leaves
    (returned,) = [line for line in lines if line.startswith("stablehlo.return")]
    for line in to_device:
        name = re.match(r"(%\w+) = ", line).group(1)
        assert uses[name] == [returned], f"the prefetched copy {name} is used in this iteration: {uses[name]}"
        # It copies a dynamic slice of the host state at the next index (clamped to the last layer).
        source = re.search(r"annotate_device_placement\((%\w+)\)", line).group(1)
        assert "dynamic_slice" in defs[source], defs[source]
    assert any("stablehlo.minimum" in line for line in lines)
    # The update of this iteration reads the state carried in from the previous iteration: what each
    # write-back copies depends on loop-carried values and on none of this iteration's prefetches.
    prefetched = {re.match(r"(%\w+) = ", line).group(1) for line in to_device}
    for line in to_host:
        closure = _depends_on(re.search(r"annotate_device_placement\((%\w+)\)", line).group(1), defs)
        assert not closure & prefetched, f"the write-back waits for the prefetch: {line}"
        assert any(name.startswith("%iterArg") for name in closure), line
        assert any(re.search(r"stablehlo\.(multiply|add) ", defs[name]) for name in closure if name in defs), line

    # Before the loop: the first layer's copies, which depend on no gradient (arguments 0.. of g).
    prologue = text[text.index("func.func public @main"):text.index("stablehlo.while")]
    first = [line for line in prologue.splitlines() if "_xla_buffer_placement = \"device\"" in line]
    assert len(first) == n_leaves
    grads_args = {f"%arg{i}" for i in range(len(jax.tree.leaves(params)))}
    p_defs, _, _ = _ssa_graph(prologue)
    for line in first:
        closure = _depends_on(re.search(r"annotate_device_placement\((%\w+)\)", line).group(1), p_defs)
        assert not closure & grads_args, f"the first layer's copy depends on the gradients: {line}"

    # What the program moves per step equals the planner's accounting (float32 moments).
    per_layer = sum(x.size // L * x.dtype.itemsize for x in layer_state)
    plan = optim.offload.state_plan(layout_of(params), params, optim.Placement("host", 1))
    groups = plan.host_bytes - L * per_layer
    assert plan.to_device_bytes_per_step == (L + 1) * per_layer + groups  # L in the loop + the first, groups
    assert plan.to_host_bytes_per_step == L * per_layer + groups


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_multisteps_and_inject_hyperparams_inside_and_outside(rng):
    params = adapters(rng)
    grads = gradients(rng, params, 4)
    paged = optim.offload_state(optim.adamw(LR, weight_decay=WD), placement="layers", elementwise=True)

    # optax.MultiSteps around the paged transform: every 2 micro-steps, as around optax's own.
    got, state = run_steps(optax.MultiSteps(paged, every_k_schedule=2), params, grads)
    want, _ = run_steps(optax.MultiSteps(optim.adamw(LR, weight_decay=WD), every_k_schedule=2), params, grads)
    assert_close(got, want)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.inner_opt_state[0].mu)} == {"pinned_host"}

    # inject_hyperparams inside: one learning rate in the state, tree_get/tree_set work.
    inside = optim.offload_state(optax.inject_hyperparams(optax.adamw)(learning_rate=LR, weight_decay=WD),
                                 placement="layers", elementwise=True)
    reference = optax.inject_hyperparams(optax.adamw)(learning_rate=LR, weight_decay=WD)
    outside = optax.inject_hyperparams(
        lambda learning_rate: optim.offload_state(optax.adamw(learning_rate, weight_decay=WD), placement="layers",
                                                  elementwise=True))(learning_rate=LR)
    want, want_state = run_steps(reference, params, grads[:2])
    want, _ = run_steps(reference, want, grads[2:], optax.tree_utils.tree_set(want_state, learning_rate=LR / 4))
    for transform in (inside, outside):
        got, state = run_steps(transform, params, grads[:2])
        assert float(optax.tree_utils.tree_get(state, "learning_rate")) == pytest.approx(LR)
        state = optax.tree_utils.tree_set(state, learning_rate=jnp.float32(LR / 4))
        assert float(optax.tree_utils.tree_get(state, "learning_rate")) == pytest.approx(LR / 4)
        got, state = run_steps(transform, got, grads[2:], state)
        assert_close(got, want)
        moments = optax.tree_utils.tree_get(state, "ScaleByAdamState")
        assert {x.sharding.memory_kind for x in jax.tree.leaves(moments.mu)} == {"pinned_host"}


def test_optax_contrib_wrappers(rng):
    """reduce_on_plateau chained after the paged AdamW, and schedule_free around a paged Adam."""
    params = adapters(rng)
    grads = gradients(rng, params, 4)

    def paged(inner):
        return optim.offload_state(inner, placement="layers", elementwise=True)

    plateau = optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
    cases = [
        (optax.chain(paged(optax.adamw(LR)), plateau), optax.chain(optax.adamw(LR), plateau)),
        (optax.contrib.schedule_free(paged(optax.scale_by_adam()), LR),
         optax.contrib.schedule_free(optax.scale_by_adam(), LR)),
    ]
    for ours, theirs in cases:
        results, states = [], []
        for transform in (ours, theirs):
            p, state = params, transform.init(params)
            step = jax.jit(lambda g, s, p, v, t=transform: t.update(g, s, p, value=v))
            for i, g in enumerate(grads):
                # A loss that does not improve, so that reduce_on_plateau cuts the rate.
                updates, state = step(g, state, p, jnp.float32(1.0 + 0.01 * i))
                p = optax.apply_updates(p, updates)
            results.append(p)
            states.append(state)
        assert_close(*results)
        if ours is cases[0][0]:
            assert float(optax.tree_utils.tree_get(states[0], "scale")) < 1.0  # the plateau cut the rate
        moments = optax.tree_utils.tree_get(states[0], "ScaleByAdamState")
        assert {x.sharding.memory_kind for x in jax.tree.leaves(moments.mu)} == {"pinned_host"}


def test_nnx_optimizer(rng):
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lora_A = nnx.LoRAParam(jax.random.normal(rngs.params(), (D, R)) * 0.3)
            self.lora_B = nnx.LoRAParam(jax.random.normal(rngs.params(), (R, D)) * 0.3)

        def __call__(self, x):
            return x + jnp.tanh((x @ self.lora_A[...]) @ self.lora_B[...])

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=L)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.layers = make(rngs)
            self.head = nnx.LoRAParam(jax.random.normal(rngs.params(), (D, 3)) * 0.3)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(h, layer):
                return layer(h)

            return body(x, self.layers) @ self.head[...]

    x = jnp.asarray(rng.normal(size=(8, D)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    seed = int(rng.integers(1 << 30))
    results = {}
    for name, tx in (("optax", optax.adamw(LR)),
                     ("paged", optim.offload_state(optax.adamw(LR), placement="layers", elementwise=True))):
        model = Model(nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

        @nnx.jit
        def step(model, optimizer):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                             argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
            optimizer.update(model, grads)
            return loss

        for _ in range(3):
            step(model, optimizer)
        results[name] = nnx.state(model, nnx.LoRAParam)
        if name == "paged":
            kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
                     if leaf.ndim >= 1}
            assert kinds == {"pinned_host"}
    assert_close(results["paged"], results["optax"])


# --- exact resume through TrainCheckpointer, on 1 and 8 devices ----------------------------------

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
RESUME_PLACEMENTS = {"device": "device", "layers": "layers", "groups": optim.Placement("host", 2), "whole": "whole"}


def tiny_training(rng, devices: int):
    """A 4-layer LoRA model on a random float32 base, four batches, sharded over ``devices`` (fsdp).

    The frozen base is plain float32 (made with numpy, nothing to compile): the optimizer state is
    what these tests are about.
    """
    from qlora_jax.distributed import make_mesh, param_shardings, shard_batch, shard_tree
    from qlora_jax.lora import LoraConfig
    from qlora_jax.model import init_lora_params
    from qlora_jax.models import layout
    from qlora_jax.models.config import LlamaConfig
    from qlora_jax.models.spec import ModelSpec

    config = LlamaConfig(**TINY)
    lora_config = LoraConfig(r=2, target_modules=("q_proj", "v_proj", "down_proj"), dtype="float32")
    spec = ModelSpec(config, lora_config, compute_dtype="float32", remat=False)
    layers, d = config.num_hidden_layers, config.hidden_size
    def f32(x):
        return jnp.asarray(x, jnp.float32)

    base = {"embed_tokens": f32(rng.normal(0, 0.5, (config.vocab_size, d))), "norm": f32(np.ones(d)),
            "layers": {"input_layernorm": f32(np.ones((layers, d))),
                       "post_attention_layernorm": f32(np.ones((layers, d))), "self_attn": {}, "mlp": {}}}
    for name, (out_features, in_features) in config.linear_shapes().items():
        weight = f32(rng.normal(0, in_features**-0.5, (layers, out_features, in_features)))
        base["layers"][layout.module_group(name)][name] = {"weight": weight}
    assert set(config.linear_shapes()) == set(layout.LINEAR_LAYERS)
    lora = init_lora_params(jax.random.key(int(rng.integers(1 << 30))), spec)
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype), lora)
    batches = [{"input_ids": rng.integers(0, config.vocab_size, (1, 8, 8)).astype(np.int32),
                "attention_mask": np.ones((1, 8, 8), np.int32), "loss_mask": np.ones((1, 8, 8), np.int32)}
               for _ in range(4)]
    if devices == 1:
        batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    else:
        mesh = make_mesh(f"fsdp={devices}", devices=jax.devices()[:devices])
        base = shard_tree(base, param_shardings(base, mesh))
        lora = shard_tree(lora, param_shardings(lora, mesh))
        batches = [shard_batch(b, mesh) for b in batches]
    return spec, base, lora, batches


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("name", list(RESUME_PLACEMENTS))
def test_exact_resume_through_the_checkpointer(rng, tmp_path, name, devices):
    """Two steps, save, restore into a fresh optimizer's state, two more: the same bits as four steps.

    The resumed steps run the step compiled before the save: it takes the restored state only if
    every leaf is back in the memory kind and sharding it was compiled for (no recompilation).
    """
    from qlora_jax.train import make_train_step
    from qlora_jax.training_state import TrainCheckpointer

    assert jax.device_count() >= devices
    spec, base, lora, batches = tiny_training(rng, devices)

    def build():
        return optim.make_optimizer("paged_adamw", 1e-2, warmup_steps=1, placement=RESUME_PLACEMENTS[name])

    optimizer = build()
    state = optimizer.init(lora)
    step = optim.jit_train_step(make_train_step(spec, optimizer), state, donate_argnums=())
    checkpointer = TrainCheckpointer(tmp_path / "ckpt")
    params, losses = lora, []
    for i, batch in enumerate(batches):
        params, state, metrics = step(params, state, base, batch, None)
        losses.append(float(metrics["loss"]))
        if i == 1:
            checkpointer.save(2, params, state, data_state={"index": 2}, rng_key=jax.random.key(0), flags={})
    checkpointer.close()

    fresh = build()
    target = fresh.init(lora)
    restored = TrainCheckpointer(tmp_path / "ckpt").restore(lora, target)
    assert restored.step == 2
    for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(target), strict=True):
        assert a.sharding.memory_kind == b.sharding.memory_kind and a.sharding.is_equivalent_to(b.sharding, a.ndim)
    p, s = restored.trainable, restored.opt_state
    for i, batch in enumerate(batches[2:], start=2):
        p, s, metrics = step(p, s, base, batch, None)
        assert float(metrics["loss"]) == losses[i], (i, float(metrics["loss"]), losses[i])
    assert len(step._compiled) == 1
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((params, state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.isfinite(losses)) and len(set(losses)) == 4
    assert not np.array_equal(np.asarray(jax.tree.leaves(p)[0]), np.asarray(jax.tree.leaves(lora)[0]))
    if devices == 8:
        moments = optax.tree_utils.tree_get(s, "ScaleByAdamState").mu
        assert any(x.addressable_shards[0].data.size < x.size for x in jax.tree.leaves(moments))

    if name == "layers" and devices == 1:
        # The checkpoint holds optax's own state tree: a chain built from optax's pieces alone (no
        # qlora_jax transform) restores it, and so does the device placement.
        schedule = optim.warmup_constant_schedule(1e-2, 1)
        plain = optax.chain(optax.clip_by_global_norm(0.3), optax.chain(
            optax.scale_by_adam(), optax.add_decayed_weights(0.0, optim.decay_mask),
            optax.scale_by_learning_rate(schedule), optax.identity()))
        on_device = optim.make_optimizer("paged_adamw", 1e-2, warmup_steps=1, placement="device")
        for like in (plain.init(lora), on_device.init(lora)):
            again = TrainCheckpointer(tmp_path / "ckpt").restore(lora, like)
            assert jax.tree.structure(again.opt_state) == jax.tree.structure(restored.opt_state)
            for a, b in zip(jax.tree.leaves(again.opt_state), jax.tree.leaves(restored.opt_state), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
