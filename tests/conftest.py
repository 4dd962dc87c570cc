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


@pytest.fixture
def fill_lora_up():
    # LoRA starts with up-projections (lora_B) = 0, i.e. the base model: tests that need the adapters to
    # change the outputs fill them with scale * N(0, 1), drawn in parameter order from one seeded generator.
    def fill(policy, scale, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(scale * torch.randn(p.shape, generator=g))
        return policy
    return fill
