# The batch plan from totals (support/batch_plan.py): the same algorithm on any number of GPUs, errors that name
# the keys, and `train.py CONFIG --plan N`.
import os
import re
import subprocess
import sys

import pytest

import train
from support.batch_plan import BatchPlan
from support.config import batch_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("world", [1, 2, 8, 48])
def test_paper_config_runs_the_same_algorithm_on_any_number_of_gpus(world):
    cfg = train.load_config(os.path.join(ROOT, "config.yaml"))
    p = batch_plan(cfg, world, num_prompts=30).validate()
    # the totals are Carve3D's whatever the GPU count: 768 samples, all of them in one optimizer step
    assert p.samples_per_rank * world == p.samples_per_epoch == 768
    assert p.train_batch_total == 768 and p.updates_per_epoch == 1 and p.on_policy
    assert p.accumulation_steps * p.micro_batch_size * world == 768
    assert p.sampling_batches * p.micro_batch_size == p.samples_per_rank
    # trackers sized from samples per prompt per epoch, as Carve3D's 75 / 25
    assert (p.buffer_size, p.min_count) == (75, 25)


def test_plan_arithmetic_by_hand():
    p = BatchPlan(world_size=2, samples_per_epoch=64, updates_per_epoch=2, micro_batch_size=4, num_steps=20,
                  timestep_fraction=0.5, num_inner_epochs=1, num_prompts=8).validate()
    assert (p.samples_per_rank, p.sampling_batches, p.train_batch_total, p.accumulation_steps) == (32, 8, 32, 4)
    assert p.num_train_timesteps == 10 and not p.on_policy and p.samples_per_prompt == 8
    assert (p.min_count, p.buffer_size) == (8, 24)
    assert not BatchPlan(1, 8, 1, 8, 10, num_inner_epochs=2).validate().on_policy  # 2 passes: not on-policy


@pytest.mark.parametrize("kw, words", [
    (dict(samples_per_epoch=30, updates_per_epoch=4), ["samples_per_epoch", "updates_per_epoch"]),
    (dict(samples_per_epoch=48, world_size=7), ["7 ranks", "micro_batch_size", "multiple of"]),
    (dict(samples_per_epoch=32, micro_batch_size=3), ["micro_batch_size 3"]),
    (dict(timestep_fraction=0.0), ["timestep_fraction"]),
    (dict(num_prompts=20, stat_min_count=2), ["warm-up", "num_train_prompts", "stat_min_count"]),
    (dict(stat_min_count=5, stat_buffer_size=4), ["stat_min_count", "stat_buffer_size"]),
])
def test_plan_errors_name_the_keys(kw, words):
    args = dict(world_size=1, samples_per_epoch=32, updates_per_epoch=1, micro_batch_size=4, num_steps=10)
    with pytest.raises(ValueError) as e:
        BatchPlan(**dict(args, **kw)).validate()
    for w in words:
        assert w in str(e.value)


def test_warm_up_covers_every_prompt_min_count_times():
    cfg = train.load_config(os.path.join(ROOT, "toy.yaml"), ["samples_per_epoch=40", "micro_batch_size=4", "num_train_prompts=8"])
    prompts = train.load_prompts(cfg.train_prompts, cfg.num_train_prompts)
    plan = batch_plan(cfg, 2, len(prompts)).validate()
    from support.prompts import epoch_prompts
    warm = [p for r in range(2) for p in epoch_prompts(cfg, prompts, 0, r, 2, plan)]
    assert len(warm) == 40 and plan.min_count == 5
    assert all(warm.count(p) >= plan.min_count for p in prompts)


def plan_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)


def test_plan_cli_prints_the_totals_and_refuses_a_bad_plan(capsys):
    # the command line once each way (a process costs ~8 s of imports); the other plans through train.main
    ok, bad = plan_cli("config.yaml", "--plan", "8"), plan_cli("config.yaml", "--plan", "7")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert int(re.search(r"samples per epoch\s+(\d+)", ok.stdout).group(1)) == 768
    assert "96 = 3 micro-batches x 32 prompts" in ok.stdout
    assert bad.returncode != 0 and "7 ranks" in bad.stderr and "models" not in bad.stdout
    config = os.path.join(ROOT, "config.yaml")
    for n in (1, 48):
        assert train.main([config, "--plan", str(n)]).samples_per_epoch == 768
    assert "16 = 1 micro-batches x 16 prompts" in capsys.readouterr().out  # micro_batch_size 32 is at most 32: 16
    with pytest.raises(ValueError, match="warm-up"):              # 30 x 26 > 768: warm-up coverage
        train.main([config, "--plan", "1", "stat_min_count=26"])
    with pytest.raises(KeyError, match="samples_per_epoch"):         # a key of an earlier version: its successors
        train.main([config, "--plan", "1", "train_batch_size=4"])


@pytest.mark.parametrize("world", [1, 2])
def test_toy_gpu_config_loads_and_plans_carve3ds_batch_on_one_and_two_gpus(world):
    cfg = train.load_config(os.path.join(ROOT, "toy-gpu.yaml"))
    prompts = train.load_prompts(cfg.train_prompts, cfg.num_train_prompts)
    p = batch_plan(cfg, world, len(prompts)).validate()
    assert p.samples_per_rank * world == p.samples_per_epoch == p.train_batch_total == 768 and p.on_policy
    assert p.accumulation_steps * p.micro_batch_size * world == 768
    assert p.num_train_timesteps == cfg.num_steps == 20            # every timestep of every trajectory
    assert (p.buffer_size, p.min_count) == (72, 24)               # 3 epochs / 1 epoch of 24 samples per prompt
    assert cfg.mixed_precision == "bf16" and cfg.compile and cfg.num_val_samples >= 2 and cfg.best_min_diversity > 0
    for path in (cfg.policy, cfg.lgm):                             # the shipped checkpoints it starts from
        assert os.path.exists(os.path.join(ROOT, path)), path
