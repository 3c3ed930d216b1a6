"""Several processes, one run: ``jax.distributed`` on localhost with CPU collectives (gloo).

Each process is a real ``python -m experiments.finetune`` (or a short script) with its own
simulated CPU devices (``--xla_force_host_platform_device_count``) and the coordinator on a free
loopback port. Compared with one process holding the same devices:

* 2 processes x 2 devices train like 1 process x 4 (losses, adapters, PEFT export, files);
* a checkpoint resumes on another process count and mesh (1 -> 2, and 2 -> 1 after a kill);
* a killed process stops the other within the heartbeat timeout, the outputs not claiming success;
* a wrong --num_processes, a port in use, incomplete flags: clear errors;
* per-process rows assemble exactly the global batch (unit tests in this process and in 2).

Every process shares one persistent XLA compilation cache per module: they compile the same
programs, and on 2 cores compiling is most of their time (a cached executable is the compiled one).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from helpers import restore_targets, train_losses

from qlora_jax.data import BatchIterator, TokenizedExample, bucket_lengths, eval_batches
from qlora_jax.distributed import DistributedSetupError, initialize_distributed, make_mesh, process_rows, shard_batch
from qlora_jax.recipe import steps
from qlora_jax.recipe.config import FinetuneConfig
from qlora_jax.recipe.settings import ConfigError
from qlora_jax.training_state import TrainCheckpointer

REPO = pathlib.Path(__file__).resolve().parents[2]
PAD = 2
# Sized for three JAX processes compiling on 2 loaded cores (under make test's 3 workers): a process that misses
# heartbeats for this long is hung, not slow.
HEARTBEAT_SECONDS = 30
# The runs' settings: batch 8 (2 per data-parallel device x 4), 6 steps, a checkpoint every 2,
# dropout (its masks must not depend on the process layout), held-out answers and the
# multiple-choice evaluation (collectives of their own).
RUN_FLAGS = ("--max_train_samples=96", "--eval_dataset_size=16", "--per_device_train_batch_size=2",
             "--per_device_eval_batch_size=2", "--max_steps=6", "--eval_steps=3", "--save_steps=2",
             "--save_total_limit=5", "--learning_rate=3e-3", "--lora_r=8", "--lora_alpha=16", "--lora_dropout=0.1",
             "--source_max_len=32", "--target_max_len=32", "--num_sample_prompts=1", "--sample_max_new_tokens=3",
             "--data_workers=1", "--compute_dtype=float32", "--chat_template=chatml", "--mc_eval_file=chatterbot",
             "--mc_eval_steps=6", "--noprogress")
# Float reassociation bounds. The global batch, its order and every formula are the same on any
# layout; only the order of the cross-device sums differs (gloo's all-reduce across processes,
# XLA's within one), float32 rounding of ~1e-7 relative per sum. Losses are means over the batch:
# they agree to a few ulps compounded over 6 steps (1e-5 relative leaves a wide margin). Adam
# divides by sqrt(v): a rounding difference in a gradient moves an update by as much relatively,
# more only where a gradient is near zero, and an update is at most ~lr (3e-3); 1e-4 absolute
# on the adapters is 1/30 of one step's largest move (measured: ~2e-6).
LOSS_RTOL = 1e-5
ADAPTER_ATOL = 1e-4


def free_port() -> int:
    """A loopback port nothing listens on, outside the kernel's ephemeral range.

    Why outside: the coordinator binds the port itself, so it is free between this probe and that
    bind. The kernel hands out ephemeral ports (bind to port 0, outgoing connections) from
    ``ip_local_port_range`` only, so no other process, such as the other test worker's JAX
    coordinator or gRPC client, can be given this one in the meantime; only an explicit bind to it
    could, and nothing here makes one.
    """
    low, high = map(int, pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [port for port in range(10_000, 30_000) if not low <= port <= high] or list(range(1024, low))
    # Each test process starts its scan elsewhere (by its pid), so two workers rarely probe alike.
    start = os.getpid() * 7919 % len(candidates)
    for port in (candidates + candidates)[start:start + 500]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port outside the ephemeral range {low}-{high}")


def start(args: list[str], devices: int, log: pathlib.Path, cache: pathlib.Path | None) -> subprocess.Popen:
    """``python <args>`` in the repository with ``devices`` CPU devices, output to ``log``."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env)


def launch(out: pathlib.Path, model: pathlib.Path, *, processes: int, devices: int, mesh: str, seed: int,
           cache: pathlib.Path, extra: tuple[str, ...] = (), tag: str = "first") -> list[subprocess.Popen]:
    """The finetune of RUN_FLAGS in ``out``, over ``processes`` processes of ``devices`` devices each
    (their output in ``<out>.<tag>.process<i>.log``)."""
    port = free_port()
    procs = []
    for i in range(processes):
        distributed = [] if processes == 1 else [
            "--coordinator_address", f"127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}",
            f"--heartbeat_timeout_seconds={HEARTBEAT_SECONDS}", "--shutdown_timeout_seconds=60",
            "--init_timeout_seconds=120"]
        args = ["-m", "experiments.finetune", f"--model={model}", f"--output_dir={out}", f"--mesh={mesh}",
                f"--seed={seed}", *RUN_FLAGS, *distributed, *extra]
        procs.append(start(args, devices, log_path(out, tag, i), cache))
    return procs


def log_path(out: pathlib.Path, tag: str, process: int) -> pathlib.Path:
    return out.parent / f"{out.name}.{tag}.process{process}.log"


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    """Every process's exit status (killing them all if one outlives ``timeout``)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def logs(out: pathlib.Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}"
                     for p in sorted(out.parent.glob(f"{out.name}.*.process*.log")))


def rows(out: pathlib.Path) -> list[dict]:
    return steps.MetricsLog.read(out / steps.METRICS)


def adapters(out: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_losses_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=LOSS_RTOL)


def assert_adapters_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ADAPTER_ATOL, err_msg=name)


def keep_checkpoints_through(source: pathlib.Path, copy: pathlib.Path, step: int) -> None:
    """``copy``: ``source`` as it was when its checkpoint ``step`` was the latest (a run stopped there)."""
    shutil.copytree(source, copy)
    for later in (copy / "checkpoints").iterdir():
        if later.name.isdigit() and int(later.name) > step:
            shutil.rmtree(later)
    for name in ("completed", "summary.json", "adapter", "loss_curve.png"):
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ============================================================================ end to end
@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def seed(module_rng) -> int:
    return int(module_rng.integers(1 << 20))


@pytest.fixture(scope="module")
def reference_runs(tiny_model, tmp_path_factory, xla_cache, seed) -> tuple[pathlib.Path, pathlib.Path]:
    """``(one, two)``: 1 process with 4 devices, and the same flags over 2 processes with 2 devices
    each; mesh data=2,fsdp=2 (in two, data across the processes, fsdp within). They run at the
    same time: two processes leave the cores idle while they wait for each other."""
    one, two = (tmp_path_factory.mktemp(name) / "run" for name in ("one_process", "two_processes"))
    single = launch(one, tiny_model, processes=1, devices=4, mesh="data=2,fsdp=2", seed=seed, cache=xla_cache)
    double = launch(two, tiny_model, processes=2, devices=2, mesh="data=2,fsdp=2", seed=seed, cache=xla_cache)
    assert finish(double) == [0, 0], logs(two)
    assert finish(single) == [0], logs(one)
    return one, two


@pytest.fixture(scope="module")
def one_process(reference_runs) -> pathlib.Path:
    return reference_runs[0]


@pytest.fixture(scope="module")
def two_processes(reference_runs) -> pathlib.Path:
    return reference_runs[1]


def written_files(out: pathlib.Path) -> list[str]:
    """The run's files outside Orbax's directories (whose per-process parts are Orbax's layout)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and p.relative_to(out).parts[0] not in ("checkpoints", "base"))


@pytest.mark.slow
def test_two_processes_train_like_one(one_process, two_processes, tiny_model):
    assert len(train_losses(one_process)) == 6
    assert_losses_close(train_losses(two_processes), train_losses(one_process))
    for kind, value in (("train", "grad_norm"), ("eval", "eval_loss"), ("mc_eval", "mc_answer_loss")):
        got = {r["step"]: r[value] for r in rows(two_processes) if r["kind"] == kind}
        want = {r["step"]: r[value] for r in rows(one_process) if r["kind"] == kind}
        assert got and sorted(got) == sorted(want), kind
        np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=LOSS_RTOL, err_msg=kind)
    # Process 0 alone wrote: each row once, the same files as a single process, one summary.
    got_rows = [(r["kind"], r["step"]) for r in rows(two_processes)]
    assert got_rows == [(r["kind"], r["step"]) for r in rows(one_process)] and len(set(got_rows)) == len(got_rows)
    assert written_files(two_processes) == written_files(one_process)
    assert (two_processes / "completed").read_text() == "step 6\n"
    summary = json.loads((two_processes / "summary.json").read_text())
    assert summary["final_step"] == 6
    np.testing.assert_allclose(summary["final_eval_loss"], json.loads(
        (one_process / "summary.json").read_text())["final_eval_loss"], rtol=LOSS_RTOL)
    process_logs = [log_path(two_processes, "first", i).read_text() for i in (0, 1)]
    assert "== summary ==" in process_logs[0] and "== summary ==" not in process_logs[1]
    # The PEFT export: the same tensors (to rounding) and the same config, from process 0's gather.
    assert_adapters_close(adapters(two_processes), adapters(one_process))
    for name in ("adapter_config.json",):
        assert (two_processes / "adapter" / name).read_text() == (one_process / "adapter" / name).read_text()
    # Greedy answers of models whose logits differ by rounding only.
    assert json.loads((two_processes / "samples.json").read_text()) == json.loads(
        (one_process / "samples.json").read_text())
    # Both processes' shards are in every checkpoint: it restores whole in this one process, as
    # the single process's checkpoint of the same step does.
    trainable, opt_state = restore_targets(tiny_model, two_processes)
    states = []
    for out in (two_processes, one_process):
        with TrainCheckpointer(out / "checkpoints") as checkpointer:
            assert checkpointer.all_steps() == [2, 4, 6]
            states.append(checkpointer.restore(trainable, opt_state, step=6))
    assert states[0].data_state == states[1].data_state
    for got, want in zip(jax.tree.leaves((states[0].trainable, states[0].opt_state)),
                         jax.tree.leaves((states[1].trainable, states[1].opt_state)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ADAPTER_ATOL)


@pytest.mark.slow
def test_a_run_moves_between_process_counts_and_survives_a_killed_process(two_processes, one_process, tiny_model,
                                                                           tmp_path, xla_cache, seed):
    """1 process -> 2 (resumed from the single process's checkpoint of step 2), one of them killed
    after its checkpoint of step 4, -> 1 process on another mesh: the uninterrupted run's losses."""
    out = tmp_path / "run"
    keep_checkpoints_through(one_process, out, step=2)
    # The two-process reference's mesh (its compiled programs are cached); no multiple-choice
    # evaluation (it may change on resume, and does not touch the training).
    procs = launch(out, tiny_model, processes=2, devices=2, mesh="data=2,fsdp=2", seed=seed, cache=xla_cache,
                   extra=("--resume", "--mc_eval_file=none"), tag="two")
    try:
        # Kill process 1 once the checkpoint of step 4 is committed (Orbax renames it into place).
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / "4" / "commit_success.txt").exists() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), logs(out)
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        # A hang guard, not a speed bound: process 0 must notice the missing heartbeats and stop.
        status = procs[0].wait(timeout=HEARTBEAT_SECONDS + 600)
    finally:
        finish(procs, timeout=30)
    text = log_path(out, "two", 0).read_text()
    assert status != 0, logs(out)
    assert "The following tasks are unhealthy (stopped sending heartbeats)" in text, text[-4000:]
    assert not (out / "completed").exists() and not (out / "summary.json").exists()
    # What it left: committed checkpoints only, each restorable and finite.
    with TrainCheckpointer(out / "checkpoints") as checkpointer:
        found = checkpointer.all_steps()
        assert found[:2] == [2, 4] and found[-1] < 6, found
        trainable, opt_state = restore_targets(tiny_model, out)
        for step in found:
            state = checkpointer.restore(trainable, opt_state, step=step)
            assert state.step == step and steps.tree_all_finite((state.trainable, state.opt_state))
    assert sorted(train_losses(out))[:4] == [1, 2, 3, 4]  # 1-2 from one process, 3-4 (and on) from two
    # Resumed in one process (the lock is stale: process 0 died holding it), on 2 devices with
    # twice the per-device batch: the same global batch.
    status = finish(launch(out, tiny_model, processes=1, devices=2, mesh="fsdp=2", seed=seed, cache=xla_cache,
                           extra=("--resume", "--force_unlock", "--per_device_train_batch_size=4",
                                  "--mc_eval_file=none"), tag="one"))
    assert status == [0], logs(out)
    assert_losses_close(train_losses(out), train_losses(one_process))
    assert_adapters_close(adapters(out), adapters(one_process))


# ============================================================================ setup errors
def test_too_few_processes_stop_after_the_init_timeout(tmp_path):
    proc = start(["-m", "experiments.finetune", f"--output_dir={tmp_path / 'run'}", "--mesh=fsdp=-1",
                  f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2", "--process_id=0",
                  "--init_timeout_seconds=3"], 1, tmp_path / "log", None)
    status = finish([proc], timeout=120)
    text = (tmp_path / "log").read_text()
    assert status == [1], text[-3000:]
    assert "not all 2 processes (--num_processes) reached the coordinator" in text and "within 3 s" in text, text
    assert not (tmp_path / "run").exists()


def test_a_port_in_use_is_refused_by_the_launcher(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = start(["-m", "experiments.finetune", f"--output_dir={tmp_path / 'run'}", "--mesh=fsdp=-1",
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0"],
                     1, tmp_path / "log", None)
        status = finish([proc], timeout=120)
    text = (tmp_path / "log").read_text()
    assert status == [1] and f"port {port} is already in use" in text, text[-3000:]


@pytest.mark.parametrize(("args", "message"), [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=None), "together"),
    (dict(coordinator_address=None, num_processes=2, process_id=1), "together"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), "--process_id=2: must be in 0..1"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "expected host:port"),
    (dict(coordinator_address="127.0.0.1:99999", num_processes=2, process_id=0), "expected host:port"),
])
def test_inconsistent_distributed_flags_are_refused(args, message):
    with pytest.raises(DistributedSetupError, match=message):
        initialize_distributed(**args)


def test_a_port_in_use_is_refused_before_connecting():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(DistributedSetupError, match=f"port {port} is already in use"):
            initialize_distributed(f"127.0.0.1:{port}", 2, 0)


# ============================================================================ per-process rows
def random_examples(rng, count: int, max_length: int = 60) -> list[TokenizedExample]:
    lengths = rng.integers(2, max_length + 1, count)
    return [TokenizedExample(rng.integers(3, 1000, n).astype(np.int32), rng.integers(0, 2, n).astype(np.int32))
            for n in lengths]


def _split_rows(rng, batch_size: int, parts: int) -> list[np.ndarray]:
    """``0..batch_size-1`` cut into ``parts`` ascending runs of random sizes (a process's rows)."""
    cuts = np.sort(rng.choice(np.arange(1, batch_size), parts - 1, replace=False))
    return np.split(np.arange(batch_size), cuts)


def test_readers_of_parts_of_the_rows_assemble_the_global_batches(rng):
    examples, buckets = random_examples(rng, 50), bucket_lengths(64)
    options = dict(batch_size=8, pad_id=PAD, buckets=buckets, seed=int(rng.integers(1 << 20)),
                   group_by_length=bool(rng.integers(2)))
    whole = BatchIterator(examples, **options)
    parts = _split_rows(rng, 8, 3)
    readers = [BatchIterator(examples, **options, rows=part) for part in parts]
    for _ in range(8):  # past an epoch (6 batches)
        accum = int(rng.integers(1, 4))
        want = whole.next_batches(accum)
        got = [reader.next_batches(accum) for reader in readers]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got], axis=1), want[key])
        assert all(reader.state == whole.state for reader in readers)  # the cursor is the global one
    # A reader of some rows resumes from the whole reader's state, and the other way round.
    resumed = BatchIterator(examples, **options, rows=parts[1], state=json.loads(json.dumps(whole.state)))
    np.testing.assert_array_equal(resumed.next_batches(1)["input_ids"], whole.next_batches(1)["input_ids"][:, parts[1]])
    with pytest.raises(ValueError, match="ascending positions"):
        BatchIterator(examples, **options, rows=[3, 1])
    with pytest.raises(ValueError, match="ascending positions"):
        BatchIterator(examples, **options, rows=[0, 8])


def test_eval_batches_of_parts_of_the_rows_assemble_the_whole(rng):
    examples, buckets = random_examples(rng, 21), bucket_lengths(64)  # 3 batches, the last of 5
    want = eval_batches(examples, batch_size=8, pad_id=PAD, buckets=buckets)
    parts = _split_rows(rng, 8, 2)
    got = [eval_batches(examples, batch_size=8, pad_id=PAD, buckets=buckets, rows=part) for part in parts]
    assert len(want) == 3 and all(len(g) == 3 for g in got)
    for i, batch in enumerate(want):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([g[i][key] for g in got], axis=0), batch[key])


def test_shard_batch_places_each_devices_rows(rng):
    mesh = make_mesh("data=2,fsdp=2,tensor=2")  # 8 devices of this one process
    np.testing.assert_array_equal(process_rows(mesh, 8), np.arange(8))  # one process holds every row
    np.testing.assert_array_equal(process_rows(None, 5), np.arange(5))
    with pytest.raises(ValueError, match="does not split over the data axes"):
        process_rows(mesh, 6)
    batch = BatchIterator(random_examples(rng, 16), batch_size=8, pad_id=PAD, buckets=bucket_lengths(64),
                          seed=0).next_batches(2)
    placed = shard_batch(batch, mesh, rows=np.arange(8), batch_size=8)
    for key, value in batch.items():
        np.testing.assert_array_equal(np.asarray(placed[key]), value)
        for shard in placed[key].addressable_shards:  # each device its 2 rows, whole along T
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
            assert shard.data.shape == (2, 2, value.shape[2])
    with pytest.raises(ValueError, match="row indices"):
        shard_batch({k: v[:, :4] for k, v in batch.items()}, mesh, rows=np.arange(8), batch_size=8)
    with pytest.raises(ValueError, match="needs rows"):  # this process's devices hold all 8 rows
        shard_batch({k: v[:, :4] for k, v in batch.items()}, mesh, rows=np.arange(4), batch_size=8)


# Two processes of 2 devices: process_rows, shard_batch of each process's rows, the agreement helpers.
ROWS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from qlora_jax.distributed import initialize_distributed, make_mesh, multiprocess, process_rows, shard_batch
    from qlora_jax.data import BatchIterator, TokenizedExample, bucket_lengths
    port, pid, examples_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    initialize_distributed(f"127.0.0.1:{port}", 2, pid, init_timeout_seconds=120, heartbeat_timeout_seconds=10)
    examples = [TokenizedExample(np.asarray(i, np.int32), np.asarray(m, np.int32))
                for i, m in json.load(open(examples_file))]
    report = {}
    for spec in ("data=2,fsdp=2", "fsdp=4", "data=2,tensor=2"):
        mesh = make_mesh(spec)
        size = 8
        rows = process_rows(mesh, size)
        reader = BatchIterator(examples, batch_size=size, pad_id=2, buckets=bucket_lengths(64), seed=3, rows=rows)
        local = reader.next_batches(2)
        placed = shard_batch(local, mesh, rows=rows, batch_size=size)
        report[spec] = {"rows": rows.tolist(), "batch": {k: multiprocess.gather_to_host(v).tolist()
                                                         for k, v in placed.items()}}
    report["primary_value"] = multiprocess.primary_value(f"from {pid}", "a value")
    report["from_primary"] = multiprocess.from_primary(lambda: {"read by": pid}, "a reading")
    from qlora_jax.recipe import steps
    from qlora_jax.recipe.config import FinetuneConfig
    try:
        steps.setup_mesh(FinetuneConfig(mesh=None))
    except Exception as err:
        report["no_mesh"] = f"{type(err).__name__}: {err}"
    report["agree_all"] = multiprocess.all_processes_agree(True)
    report["agree_one"] = multiprocess.all_processes_agree(pid == 0)
    def fail():
        raise OSError("disk full")
    try:
        multiprocess.on_primary(fail, "a failing write")
    except Exception as err:
        report["on_primary"] = f"{type(err).__name__}: {err}"
    print("REPORT " + json.dumps(report))
""")


def test_two_processes_hold_their_rows_of_the_global_batch(rng, tmp_path):
    examples = random_examples(rng, 24)
    (tmp_path / "examples.json").write_text(json.dumps([[e.input_ids.tolist(), e.loss_mask.tolist()]
                                                        for e in examples]))
    port = free_port()
    procs = [start(["-c", ROWS_SCRIPT, str(port), str(i), str(tmp_path / "examples.json")], 2,
                   tmp_path / f"process{i}.log", None) for i in (0, 1)]
    status = finish(procs, timeout=300)
    texts = [(tmp_path / f"process{i}.log").read_text() for i in (0, 1)]
    assert status == [0, 0], "\n".join(t[-3000:] for t in texts)
    reports = [json.loads(next(line for line in t.splitlines() if line.startswith("REPORT "))[7:]) for t in texts]
    want = BatchIterator(examples, batch_size=8, pad_id=PAD, buckets=bucket_lengths(64), seed=3).next_batches(2)
    expected_rows = {"data=2,fsdp=2": ([0, 1, 2, 3], [4, 5, 6, 7]), "fsdp=4": ([0, 1, 2, 3], [4, 5, 6, 7]),
                     "data=2,tensor=2": ([0, 1, 2, 3], [4, 5, 6, 7])}
    for spec, (rows0, rows1) in expected_rows.items():
        assert reports[0][spec]["rows"] == rows0 and reports[1][spec]["rows"] == rows1, spec
        for report in reports:  # the global batch, assembled from both processes' rows
            for key, value in want.items():
                np.testing.assert_array_equal(np.asarray(report[spec]["batch"][key]), value, err_msg=spec)
    assert [r["primary_value"] for r in reports] == ["from 0", "from 0"]
    assert [r["from_primary"] for r in reports] == [{"read by": 0}, {"read by": 0}]
    assert all(r["no_mesh"].startswith("ConfigError: mesh=None: a run over 2 processes needs a mesh") for r in reports)
    assert [r["agree_all"] for r in reports] == [True, True] and [r["agree_one"] for r in reports] == [False, False]
    assert reports[0]["on_primary"] == "OSError: disk full"
    assert reports[1]["on_primary"] == "PrimaryProcessError: process 0 failed (a failing write): OSError: disk full"


# ============================================================================ resume with another layout
def test_a_resume_may_change_the_mesh_but_not_the_global_batch(tiny_model, tmp_path):
    saved = {"batch_size": 8}
    where = "somewhere/checkpoints"

    def cfg(**overrides) -> FinetuneConfig:
        return FinetuneConfig(model=str(tiny_model), output_dir=str(tmp_path), **overrides)

    for same in (dict(mesh="fsdp=8", per_device_train_batch_size=1), dict(mesh="data=2,fsdp=2,tensor=2",
                 per_device_train_batch_size=2), dict(mesh=None, per_device_train_batch_size=8),
                 dict(mesh="data=2", per_device_train_batch_size=4)):
        steps.check_resume_batch(saved, cfg(**same), where)
    steps.check_resume_batch(None, cfg(mesh="fsdp=8", per_device_train_batch_size=3), where)  # nothing saved yet
    with pytest.raises(ConfigError, match=r"^per_device_train_batch_size=2: .* global batch is 16 sequences, but "
                                          r".* trained with 8\. .* pass per_device_train_batch_size=1"):
        steps.check_resume_batch(saved, cfg(mesh="fsdp=8", per_device_train_batch_size=2), where)
    with pytest.raises(ConfigError, match="global batch is 4 sequences"):
        steps.check_resume_batch(saved, cfg(mesh="data=2,tensor=4", per_device_train_batch_size=2), where)
