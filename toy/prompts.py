# Where train.py, evaluate.py and the toy's SFT get their prompts: the toy grammar's splits (toy:train, toy:test;
# toy/world.py) or, for the paper setup, a file (support/prompts.py: a text file or a JSON prompt library).
from support.prompts import FILES, read_prompts, spread
from toy import world

SOURCES = f"toy:train, toy:test, {FILES}"


def load_prompts(source, limit=0):
    """The prompts of a source (see SOURCES); limit N > 0 keeps N of them evenly spaced (support/prompts.spread)."""
    if source.startswith("toy:"):
        split = source.split(":", 1)[1]
        if split not in ("train", "test"):
            raise ValueError(f"prompt source {source!r}: use toy:train or toy:test")
        prompts = world.train_prompts() if split == "train" else world.test_prompts()
    else:
        prompts = read_prompts(source)
    return spread(prompts, limit)
