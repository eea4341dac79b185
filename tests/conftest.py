"""Session-wide test settings and the fixtures the test files share (plain helper functions: helpers.py)."""

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread for the whole suite: the test tensors are tiny, several tests start their own
# processes (DDP, memory, CLI), and on a busy 2-core machine OpenMP worker threads that spin-wait and
# get descheduled made each op ~100x slower (measured: a 5-step CG 5 s vs 0.03 s).
torch.set_num_threads(1)

# The shared Omniglot copy beside the checkout, unless .ci/run or the user points elsewhere.
os.environ.setdefault(
    "IMAML_OMNIGLOT_ROOT", str((Path(__file__).resolve().parents[1] / ".." / "shared" / "omniglot").resolve())
)


@pytest.fixture
def ridge():
    """``helpers.ridge_task(seed=0)``: (theta, support_loss, query_loss, phi_star) in float64."""
    from helpers import ridge_task

    return ridge_task(seed=0)


@pytest.fixture
def tiny():
    """(TinyCNN in float64 seeded 0, its parameters, a 4-task float64 batch of ``helpers.tiny_batch``)."""
    from helpers import TinyCNN, params_of, tiny_batch

    torch.manual_seed(0)
    model = TinyCNN().double()
    return model, params_of(model), tiny_batch()


@pytest.fixture(scope="session")
def omniglot():
    """A 4-task Omniglot 5-way 1-shot training meta-batch (float32), skipping when the data is missing."""
    from helpers import omniglot_batch

    batch = omniglot_batch()
    if batch is None:
        pytest.skip("Omniglot not found under $IMAML_OMNIGLOT_ROOT")
    return batch
