import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tests use tiny models. With 2 OpenMP threads on a 2-core machine that is also running anything else,
    # spin-waiting made them ~10x slower (measured 120 s vs 14 s for test_mvdream.py); results do not depend on
    # the thread count. Subprocesses started by tests set OMP_NUM_THREADS=1 themselves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
