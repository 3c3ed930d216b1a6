"""qlora_jax.training_state: a kill -9 in the middle of deleting a checkpoint never leaves a step
that looks committed but cannot be read.

Orbax's local delete removes a step's files one by one; a process killed in the middle left the
step directory in place with some OCDBT data files gone, and the next restore of that "committed"
step failed with a truncated Zstd stream (found by the kill -9 recipe test, whose kill could land
while a confirmed checkpoint beyond ``save_total_limit`` was being deleted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qlora_jax.training_state import DELETING_SUBDIR, TrainCheckpointer

pytestmark = pytest.mark.faults

# Saves steps 1 and 2 (max_to_keep=1), then confirms step 2, which deletes step 1; the process
# kills itself with SIGKILL after removing `kill_after` files, whoever removes them (Orbax's
# deleter or ours), so the kill lands mid-delete with or without the atomic rename.
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    from qlora_jax.training_state import TrainCheckpointer
    directory, kill_after, arrays = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    checkpointer = TrainCheckpointer(directory, max_to_keep=1)
    for step in (1, 2):
        trainable = {"lora_A": np.asarray(arrays[str(step)]["lora_A"], np.float32)}
        opt_state = {"mu": np.asarray(arrays[str(step)]["mu"], np.float32)}
        checkpointer.save(step, trainable, opt_state, data_state={"position": step}, rng_key=__import__(
            "jax").random.key(step), flags={})
        checkpointer.wait()
    removed = [0]
    def removing(original):
        def remove(*args, **kwargs):
            original(*args, **kwargs)
            removed[0] += 1
            if removed[0] >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        return remove
    os.unlink, os.remove = removing(os.unlink), removing(os.remove)
    checkpointer.confirm(2)  # deletes step 1
    os.kill(os.getpid(), signal.SIGKILL)  # fewer files than kill_after: killed after the delete
""")


@pytest.mark.parametrize("kill_after", [1, 6, 12, 18, 1000])
def test_kill_while_deleting_leaves_only_restorable_steps(tmp_path, rng, kill_after):
    arrays = {str(step): {"lora_A": rng.standard_normal((4, 8)).tolist(), "mu": rng.standard_normal(16).tolist()}
              for step in (1, 2)}
    directory = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(directory), str(kill_after), json.dumps(arrays)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    likes = ({"lora_A": np.zeros((4, 8), np.float32)}, {"mu": np.zeros(16, np.float32)})
    with TrainCheckpointer(directory, max_to_keep=1) as checkpointer:
        # Whatever the kill interrupted was finished by opening the directory again.
        assert not (directory / DELETING_SUBDIR).exists()
        found = checkpointer.all_steps()
        assert 2 in found and set(found) <= {1, 2}, found
        for step in found:  # every listed step restores in full, with the values saved
            state = checkpointer.restore(*likes, step=step)
            np.testing.assert_array_equal(state.trainable["lora_A"], np.float32(arrays[str(step)]["lora_A"]))
            np.testing.assert_array_equal(state.opt_state["mu"], np.float32(arrays[str(step)]["mu"]))
            assert state.data_state == {"position": step}
    if kill_after == 1000:  # the delete completed before the kill
        assert found == [2]
