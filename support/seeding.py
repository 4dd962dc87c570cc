# Explicit randomness: every generator of a run is derived from (seed, purpose, epoch, rank, ...), so there is
# no hidden RNG state to save or drift, a resumed run draws exactly what an uninterrupted one would, and two
# checkpoints are compared on identical noise. Support code for train.py, toy/sft.py and evaluate.py.
import torch


def derive_seed(*parts):
    """A stable 63-bit seed from any parts (FNV-1a over their text): no Python hash randomisation."""
    h = 1469598103934665603
    for p in parts:
        for b in str(p).encode():
            h = ((h ^ b) * 1099511628211) % (1 << 64)
    return h % (1 << 63)


def make_generator(device, *parts):
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
