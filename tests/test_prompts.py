# Prompt sources (toy/prompts.py, support/prompts.py): toy splits, text files, JSON prompt libraries in threestudio's format.
import json

import pytest

from toy import world
from toy.prompts import load_prompts


def test_toy_sources_and_evenly_spread_subsets():
    assert load_prompts("toy:test") == world.test_prompts()
    sub = load_prompts("toy:train", 8)
    step = len(world.train_prompts()) // 8
    assert sub == world.train_prompts()[::step][:8] and len(set(p.split()[1] for p in sub)) > 1  # not all red
    with pytest.raises(ValueError, match="toy:train or toy:test"):
        load_prompts("toy:val")


def test_text_file_source(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\na red chair\n\n  a blue lamp  \n")
    assert load_prompts(str(path)) == ["a red chair", "a blue lamp"]
    assert load_prompts(str(path), 1) == ["a red chair"]
    with pytest.raises(FileNotFoundError, match="prompt_library.json:dreamfusion"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_json_prompt_library_source(tmp_path):
    # threestudio's load/prompt_library.json: {"<key>": [prompt, ...], ...}; our own small file of that format
    path = tmp_path / "prompt_library.json"
    path.write_text(json.dumps({"dreamfusion": ["a wooden chair", "a glass  vase", "a metal bird"],
                                "other": ["x"]}))
    assert load_prompts(f"{path}:dreamfusion") == ["a wooden chair", "a glass vase", "a metal bird"]
    assert load_prompts(f"{path}:dreamfusion", 2) == ["a wooden chair", "a glass vase"]
    with pytest.raises(KeyError, match=r"no key 'dreamfusin'.*\['dreamfusion', 'other'\]"):
        load_prompts(f"{path}:dreamfusin")
    with pytest.raises(FileNotFoundError, match="threestudio"):
        load_prompts(f"{tmp_path / 'nope.json'}:dreamfusion")
    path.write_text(json.dumps({"dreamfusion": [1, 2]}))
    with pytest.raises(ValueError, match="list of prompt strings"):
        load_prompts(f"{path}:dreamfusion")
