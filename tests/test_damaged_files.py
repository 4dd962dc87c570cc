# Damaged files get a named error (the file, what it should hold, the fix), and a damaged newest checkpoint does not
# stop a resume: train.py continues from the newest intact one and then matches an uninterrupted run. Real files of
# the real classes (the shipped toy checkpoints; tiny train.py runs with tests/test_train.py's config), damaged the
# way a partial copy or a full disk leaves them: cut short, a garbled header, a flipped bit inside a tensor.
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_train import TOY_YAML, assert_same, ckpt, load_ckpt, overrides, read_metrics, run_train

import reconstruct
import train
from mvdream import MVDreamPolicy
from support import checkpoint
from support.files import MANIFEST, DamagedFileError, MissingFileError
from support.mvdream_weights import read_vae
from support.prompts import read_prompts
from toy import world

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "toy"
LORA = MVDreamPolicy.LORA_FILE


def cut(path, keep=5000):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:keep if keep < len(data) else len(data) // 2])


def garble(path, offset=0, data=b"\xff" * 8):
    raw = bytearray(Path(path).read_bytes())
    raw[offset:offset + len(data)] = data
    Path(path).write_bytes(bytes(raw))


def flip_bit(path, offset=-3):
    raw = bytearray(Path(path).read_bytes())
    raw[offset] ^= 0x10
    Path(path).write_bytes(bytes(raw))


def named(excinfo, path, *words):
    text = str(excinfo.value)
    assert text.startswith(f"cannot read {path}: expected ") and "Fix: " in text, text
    for w in words:
        assert w in text, (w, text)
    return text


# ----------------------------------------------------------------------------------------------
# 1. Every kind of file: a named error, not the library's message alone.

@pytest.mark.parametrize("damage", [cut, garble])
def test_damaged_lora_file_is_named(tmp_path, damage):
    shutil.copy(CKPT / "rl-cpu" / LORA, tmp_path / LORA)
    damage(tmp_path / LORA)
    with pytest.raises(DamagedFileError) as e:
        MVDreamPolicy.tiny(world.VOCAB).load_lora(tmp_path)  # evaluate.py --lora DIR
    named(e, tmp_path / LORA, "LoRA weights", "SafetensorError", "copy it again")
    with pytest.raises(MissingFileError) as e:  # (also a FileNotFoundError)
        MVDreamPolicy.tiny(world.VOCAB).load_lora(tmp_path / "nothing.safetensors")
    named(e, tmp_path / "nothing.safetensors", "does not exist")


def test_damaged_saved_policy_folder_is_named(tmp_path):
    folder = tmp_path / "sft-base"
    shutil.copytree(CKPT / "sft-base", folder)
    cut(folder / "model.safetensors")
    with pytest.raises(DamagedFileError) as e:
        MVDreamPolicy.from_pretrained(str(folder))
    named(e, folder / "model.safetensors", "saved MVDream policy", "git checkout -- checkpoints/toy")
    shutil.copy(CKPT / "sft-base" / "model.safetensors", folder / "model.safetensors")
    cut(folder / "mvdream_config.json", 100)
    with pytest.raises(DamagedFileError) as e:
        MVDreamPolicy.from_pretrained(str(folder))
    named(e, folder / "mvdream_config.json", "JSONDecodeError")


@pytest.mark.parametrize("damage", [cut, garble])
def test_damaged_lgm_file_is_named(tmp_path, damage):
    file = tmp_path / "lgm.safetensors"
    shutil.copy(CKPT / "lgm-tiny-v3.safetensors", file)
    damage(file)
    with pytest.raises(DamagedFileError) as e:
        reconstruct.LGM.from_pretrained(str(file), config="tiny")
    named(e, file, "LGM weights", "SafetensorError", "hf download ashawkey/LGM")


def test_damaged_vae_folder_is_named(tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(CKPT / "vae-tiny", folder)
    cut(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DamagedFileError) as e:
        read_vae(folder)  # evaluate.py --through-vae, toy/sft.py mvdream --vae
    named(e, folder, "AutoencoderKL folder", "diffusion_pytorch_model.safetensors", "python -m toy.sft vae")
    shutil.copy(CKPT / "vae-tiny" / "diffusion_pytorch_model.safetensors", folder)
    garble(folder / "config.json", 0, b"#")
    with pytest.raises(DamagedFileError) as e:
        read_vae(folder)
    named(e, folder, "config.json")
    with pytest.raises(FileNotFoundError) as e:
        read_vae(tmp_path / "no-vae")
    named(e, tmp_path / "no-vae", "no such folder")


def test_damaged_config_and_prompt_files_are_named(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("num_epochs: 3\nseed: [1, 2\n")
    with pytest.raises(DamagedFileError) as e:
        train.load_config(str(yaml_file))
    named(e, yaml_file, "YAML mapping of train.py config keys", "line 3", "toy.yaml")
    yaml_file.write_bytes(b"num_epochs: 3\nseed: \xff\xfe\n")
    with pytest.raises(DamagedFileError) as e:
        train.load_config(str(yaml_file))
    named(e, yaml_file, "YAML")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red cube\n\xff\xfe\x00a blue ball\n")
    with pytest.raises(DamagedFileError) as e:
        read_prompts(str(prompts))
    named(e, prompts, "one prompt per line", "UnicodeDecodeError")
    library = tmp_path / "prompt_library.json"
    library.write_text(json.dumps({"dreamfusion": ["a red cube", "a blue ball"]}))
    cut(library, 20)
    with pytest.raises(DamagedFileError) as e:
        read_prompts(f"{library}:dreamfusion")
    named(e, library, "JSON prompt library", "JSONDecodeError", "threestudio")


# ----------------------------------------------------------------------------------------------
# 2. Checkpoints: the manifest catches what the parsers cannot; without one (older runs) the parsers still name
#    the file. B: a 3-epoch run (checkpoints epoch_0000..2; validations at epochs 0 and 2).

@pytest.fixture(scope="module")
def run_b(tmp_path_factory, one_thread):
    run_dir = tmp_path_factory.mktemp("run_b")
    run_train(run_dir, num_epochs=3)
    return run_dir


def copy_run(run_b, tmp_path):
    shutil.copytree(run_b, tmp_path / "run")
    return tmp_path / "run"


def strip_manifest(path):
    # a checkpoint as train.py wrote it before manifests
    os.remove(os.path.join(path, MANIFEST))
    state = json.loads(Path(path, checkpoint.STATE_FILE).read_text())
    del state["manifest"]
    Path(path, checkpoint.STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("name, old_format_error", [("optimizer.pt", "failed finding central directory"),
                                                    ("rng_states.pt", "failed finding central directory"),
                                                    (checkpoint.STATE_FILE, "JSONDecodeError"),
                                                    (LORA, "SafetensorError")])
def test_cut_checkpoint_file_is_named_with_and_without_manifest(run_b, tmp_path, name, old_format_error):
    path = shutil.copytree(ckpt(run_b, 1), tmp_path / "epoch_0001")
    manifest = json.loads(Path(path, MANIFEST).read_text())["files"]
    assert sorted(manifest) == sorted(["optimizer.pt", "rng_states.pt", checkpoint.STATE_FILE, LORA])
    cut(Path(path, name), 300)
    with pytest.raises(DamagedFileError) as e:
        checkpoint.read_checkpoint(path)
    named(e, Path(path, name), f"{manifest[name]['bytes']:,} bytes as manifest.json lists", "has 300 bytes", "resume:")
    if name == checkpoint.STATE_FILE:  # the state is the marker of a complete checkpoint: cut it without manifest
        os.remove(Path(path, MANIFEST))
    else:
        strip_manifest(path)
    with pytest.raises(DamagedFileError) as e:
        checkpoint.read_checkpoint(path)
    named(e, Path(path, name), old_format_error)


def test_flipped_bit_in_a_tensor_is_caught_by_the_manifest(run_b, tmp_path):
    path = shutil.copytree(ckpt(run_b, 1), tmp_path / "epoch_0001")
    flip_bit(Path(path, LORA))
    load_file(Path(path, LORA))  # safetensors itself sees nothing wrong
    with pytest.raises(DamagedFileError) as e:
        checkpoint.read_checkpoint(path)
    named(e, Path(path, LORA), "sha256 differs")
    with pytest.raises(DamagedFileError):  # evaluate.py --lora on a checkpoint directory checks it too
        MVDreamPolicy.tiny(world.VOCAB).load_lora(path)
    os.remove(Path(path, MANIFEST))  # a checkpoint that says it has a manifest but lost it
    with pytest.raises(MissingFileError) as e:
        checkpoint.read_checkpoint(path)
    named(e, Path(path, MANIFEST), "it is missing")
    strip_manifest(shutil.copytree(ckpt(run_b, 1), tmp_path / "old"))
    assert checkpoint.read_checkpoint(tmp_path / "old")["state"]["epoch"] == 1  # older checkpoints load as before


# ----------------------------------------------------------------------------------------------
# 3. Resume past a damaged newest checkpoint. B's epoch_0002 loses the end of optimizer.pt; B then continues to 4
#    epochs (as `train.py toy.yaml num_epochs=21` after the main job) and must match A, 4 epochs uninterrupted:
#    the LoRA, optimizer, trackers, counters (best/ bookkeeping included), the log and best/.

def test_damaged_newest_checkpoint_resumes_from_the_one_before_and_matches_uninterrupted(run_b, tmp_path, capsys):
    dir_b = copy_run(run_b, tmp_path)
    # B's val MRC fell from epoch 0 to 2: its best/ is epoch 2's, from an epoch that the resume runs again
    assert json.loads((dir_b / "checkpoints" / "best" / "best.json").read_text())["epoch"] == 2
    cut(Path(ckpt(dir_b, 2), "optimizer.pt"))
    capsys.readouterr()
    run_train(dir_b, num_epochs=4)
    out = capsys.readouterr().out
    assert f"resume: skipping damaged checkpoint {ckpt(dir_b, 2)} ({ckpt(dir_b, 2)}/optimizer.pt: it has " in out
    assert f"resumed from {ckpt(dir_b, 1)} (next epoch 2)" in out
    assert f"moved best/ (epoch 2, after the resumed epoch 1) to {dir_b}/checkpoints/best.stale_epoch_0002" in out
    dir_a = tmp_path / "run_a"
    run_train(dir_a, num_epochs=4)
    for epoch in (2, 3):
        a, b = load_ckpt(ckpt(dir_a, epoch)), load_ckpt(ckpt(dir_b, epoch))
        assert_same(a["lora"], b["lora"], f"lora {epoch}")
        assert_same(a["optimizer"], b["optimizer"], f"optimizer {epoch}")
        for key in ("epoch", "counters", "trackers"):
            assert_same(a["state"][key], b["state"][key], f"{key} {epoch}")
    ma, mb = read_metrics(dir_a), read_metrics(dir_b)
    assert [r["epoch"] for r in mb] == [0, 1, 2, 3]  # epoch 2 once, without B's first validation of it
    assert [("val_mrc" in r) for r in mb] == [("val_mrc" in r) for r in ma] == [True, False, False, True]
    assert [r["loss"] for r in ma[1:]] == [r["loss"] for r in mb[1:]] and ma[3]["val_mrc"] == mb[3]["val_mrc"]
    # best/ is the one A chose (A never validated epoch 2): B's epoch-2 best/ was moved aside, not kept
    best_a, best_b = (json.loads((d / "checkpoints" / "best" / "best.json").read_text()) for d in (dir_a, dir_b))
    assert best_a["epoch"] == best_b["epoch"]
    assert_same(load_file(dir_a / "checkpoints" / "best" / LORA), load_file(dir_b / "checkpoints" / "best" / LORA))
    assert json.loads((dir_b / "checkpoints" / "best.stale_epoch_0002" / "best.json").read_text())["epoch"] == 2


def test_best_from_a_redone_epoch_without_a_checkpoint_to_restore_is_re_decided(run_b, tmp_path, capsys):
    # The resumed counters hold epoch 0 as the best, but epoch_0000 is gone: best/ (epoch 2) goes aside and the
    # rule writes best/ again when the redone epoch 2's validation beats epoch 0's val MRC.
    run_dir = copy_run(run_b, tmp_path)
    shutil.rmtree(ckpt(run_dir, 0))
    cut(Path(ckpt(run_dir, 2), "optimizer.pt"))
    capsys.readouterr()
    run_train(run_dir, num_epochs=3)
    assert "the best epoch so far, 0, has no intact checkpoint" in capsys.readouterr().out
    assert json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())["epoch"] == 2
    assert_same(load_file(run_dir / "checkpoints" / "best" / LORA), load_file(run_b / "checkpoints" / "best" / LORA))
    assert os.path.isdir(run_dir / "checkpoints" / "best.stale_epoch_0002")


def test_no_intact_checkpoint_stops_listing_each(run_b, tmp_path):
    run_dir = copy_run(run_b, tmp_path)
    cut(Path(ckpt(run_dir, 2), LORA))
    flip_bit(Path(ckpt(run_dir, 1), "rng_states.pt"), 200)
    strip_manifest(ckpt(run_dir, 0))  # an older checkpoint without manifest: its parser names the damage
    cut(Path(ckpt(run_dir, 0), "optimizer.pt"))
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(DamagedFileError) as e:
        run_train(run_dir, num_epochs=4)
    text = named(e, run_dir / "checkpoints", "none of its 3 complete checkpoints is intact", "resume: never")
    lines = text.split("\n")[1:]
    assert [ln.split(": ")[0] for ln in lines] == [f"  {ckpt(run_dir, 2)}/{LORA}",
                                                   f"  {ckpt(run_dir, 1)}/rng_states.pt",
                                                   f"  {ckpt(run_dir, 0)}/optimizer.pt"]
    assert "sha256 differs" in lines[1] and "failed finding central directory" in lines[2]
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # stopped before touching the run's log


def test_explicit_damaged_resume_path_stops_without_falling_back(run_b, tmp_path):
    run_dir = copy_run(run_b, tmp_path)
    cut(Path(ckpt(run_dir, 1), "rng_states.pt"))
    with pytest.raises(DamagedFileError) as e:
        run_train(run_dir, num_epochs=4, resume=ckpt(run_dir, 1))
    named(e, f"{ckpt(run_dir, 1)}/rng_states.pt", "per-rank RNG states", "set resume: to another")
    cfg = train.load_config(TOY_YAML, overrides(run_dir, resume=ckpt(run_dir, 2)))
    assert checkpoint.choose_checkpoint(cfg, 0)[0] == ckpt(run_dir, 2)  # an intact explicit path still loads


# ----------------------------------------------------------------------------------------------
# 4. Every rank takes the same decision, or all stop together (none is left waiting in a collective).

def _choose_on_rank(rank, world, init_file, cases, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for run_dirs in cases:
            try:
                results.append(checkpoint.choose_checkpoint(train.load_config(TOY_YAML, overrides(run_dirs[rank])),
                                                            rank)[0])
            except RuntimeError as e:
                results.append(str(e))
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_resume_from_the_same_checkpoint_or_all_stop(run_b, tmp_path):
    damaged, intact = copy_run(run_b, tmp_path), shutil.copytree(run_b, tmp_path / "intact")
    cut(Path(ckpt(damaged, 2), "optimizer.pt"))
    cases = [(str(damaged), str(damaged)), (str(damaged), str(intact))]  # the second: ranks see different files
    mp.spawn(_choose_on_rank, args=(2, str(tmp_path / "init"), cases, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0[0] == r1[0] == ckpt(damaged, 1)
    assert "the ranks found different checkpoints intact" in r0[1]
    assert r0[1].split("; every")[0] == r1[1].split("; every")[0]  # (each names its own run_dir after that)
