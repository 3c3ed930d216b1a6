"""Sharding over 8 simulated CPU devices (conftest sets --xla_force_host_platform_device_count=8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_quantized_base

from qlora_jax.distributed import make_mesh, param_shardings, parse_mesh_spec, shard_batch, shard_tree
from qlora_jax.lora import LoraConfig
from qlora_jax.model import init_lora_params
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.spec import ModelSpec
from qlora_jax.optim import jit_train_step, make_optimizer
from qlora_jax.train import make_train_step
from qlora_jax.training_state import TrainCheckpointer

CONFIG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def setup(module_rng):
    rng = module_rng
    base = random_quantized_base(CONFIG, rng)
    base["lm_head"] = jnp.asarray(rng.normal(size=(512, 256)) * 0.05, jnp.bfloat16)
    lora_config = LoraConfig(r=8, dtype="float32")
    lora = init_lora_params(jax.random.key(1), ModelSpec(CONFIG, lora_config))
    lora = jax.tree.map(lambda x: x + 0.01 * jnp.asarray(rng.normal(size=x.shape), x.dtype), lora)
    batch = {"input_ids": rng.integers(0, 512, (2, 8, 64)).astype(np.int32),
             "attention_mask": np.ones((2, 8, 64), np.int32), "loss_mask": np.ones((2, 8, 64), np.int32)}
    return base, lora, lora_config, batch


@pytest.mark.parametrize("mesh_spec", ["fsdp=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2", "data=8"])
def test_sharded_step_matches_single_device(setup, mesh_spec):
    base, lora, lora_config, batch = setup
    spec = ModelSpec(CONFIG, lora_config, compute_dtype="float32")
    # SGD is linear in the gradients, so the update compares the gradients; a large rate keeps the
    # update far above the float32 rounding of the parameters it is added to.
    sgd = optax.sgd(1000.0)
    step = jax.jit(make_train_step(spec, sgd))
    ref_lora, _, ref = step(lora, sgd.init(lora), base, {k: jnp.asarray(v) for k, v in batch.items()}, None)

    mesh = make_mesh(mesh_spec)
    sharded_base = shard_tree(base, param_shardings(base, mesh))
    sharded_lora = shard_tree(lora, param_shardings(lora, mesh))
    new_lora, _, metrics = step(sharded_lora, sgd.init(sharded_lora), sharded_base, shard_batch(batch, mesh), None)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref["loss"]), rtol=1e-5)
    for old, a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(new_lora), jax.tree.leaves(ref_lora), strict=True):
        got, want = np.asarray(a) - np.asarray(old), np.asarray(b) - np.asarray(old)
        # Reduction order differs across shardings: compare per leaf in norm (float32 noise ~1e-6).
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want) + 1e-12
    if mesh_spec != "data=8":
        leaf = jax.tree.leaves(new_lora)[0]
        assert leaf.sharding.spec != jax.sharding.PartitionSpec()  # the adapters stay sharded


def test_each_device_holds_its_share_of_packed_weights(setup):
    base, *_ = setup
    mesh = make_mesh("fsdp=8")
    sharded = shard_tree(base, param_shardings(base, mesh))
    qt = sharded["layers"]["mlp"]["gate_proj"]["weight"]  # [L=2, out=512, in=256] packed to [2, 512, 128]
    assert qt.codes.shape == (2, 512, 128)
    rows = set()
    for shard in qt.codes.addressable_shards:
        assert shard.data.shape == (2, 64, 128)
        rows.add(shard.index[1].start)
    assert rows == set(range(0, 512, 64))  # eight distinct row blocks: 1/8 of the weights each
    assert {s.data.shape for s in qt.scales.addressable_shards} == {(2, 64, 4)}
    # 64 rows x 4 scales = 256 per device: exactly one nested block, so the nested scales split too.
    assert {s.data.shape for s in qt.nested_scales.addressable_shards} == {(2, 1)}
    np.testing.assert_array_equal(np.asarray(qt.codes), np.asarray(base["layers"]["mlp"]["gate_proj"]["weight"].codes))


@pytest.mark.parametrize("restore_on", [1, 4])
def test_checkpoint_saved_on_8_devices_restores_on_fewer(setup, tmp_path, restore_on):
    _, lora, _, _ = setup
    mesh8 = make_mesh("fsdp=8")
    sharded = shard_tree(lora, param_shardings(lora, mesh8))
    optimizer = optax.adam(1e-3)
    opt_state = jax.jit(optimizer.init)(sharded)
    checkpointer = TrainCheckpointer(tmp_path / "ckpt")
    checkpointer.save(5, sharded, opt_state, data_state={"index": 3}, rng_key=jax.random.key(2), flags={})
    checkpointer.close()

    mesh = make_mesh(f"fsdp={restore_on}", devices=jax.devices()[:restore_on])
    target = shard_tree(jax.tree.map(jnp.zeros_like, lora), param_shardings(lora, mesh))
    target_state = jax.jit(optimizer.init)(target)
    restored = TrainCheckpointer(tmp_path / "ckpt").restore(target, target_state)
    assert restored.step == 5 and restored.data_state == {"index": 3}
    for a, b in zip(jax.tree.leaves(restored.trainable), jax.tree.leaves(lora), strict=True):
        assert len(a.sharding.device_set) == restore_on
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_offloaded_state_stays_sharded_and_on_host(setup):
    base, lora, lora_config, batch = setup
    mesh = make_mesh("fsdp=8")
    sharded_lora = shard_tree(lora, param_shardings(lora, mesh))
    sharded_base = shard_tree(base, param_shardings(base, mesh))
    optimizer = make_optimizer("paged_adamw_32bit", learning_rate=1e-3, placement="layers")
    opt_state = optimizer.init(sharded_lora)
    step = jit_train_step(make_train_step(ModelSpec(CONFIG, lora_config), optimizer), opt_state)
    new_lora, new_state, metrics = step(sharded_lora, opt_state, sharded_base, shard_batch(batch, mesh), None)
    assert np.isfinite(float(metrics["loss"]))
    # The moments in pinned host memory; the step counts (0-d) stay on the device.
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(new_state) if x.ndim >= 1}
    assert kinds == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(new_state) if x.ndim == 0} == {"device"}
    moments = [x for x in jax.tree.leaves(new_state) if x.ndim >= 2]
    assert moments and all(len(x.sharding.device_set) == 8 for x in moments)
    assert any(x.addressable_shards[0].data.size < x.size for x in moments)


def test_mesh_spec_errors():
    assert parse_mesh_spec("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    with pytest.raises(ValueError, match="unknown mesh axis"):
        parse_mesh_spec("model=8", 8)
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        parse_mesh_spec("fsdp=4", 8)
    with pytest.raises(ValueError, match="does not split"):
        shard_batch({"input_ids": np.zeros((1, 3, 4), np.int32)}, make_mesh("data=8"))
