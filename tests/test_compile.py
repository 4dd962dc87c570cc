# support/compiling.py: the compiled paths compute what eager computes, and the run directory's compile cache is
# written, picked up, or skipped with a line that says why. Inductor on the CPU, a smaller UNet than the toy's
# (the real classes) so that each path compiles in seconds; train.py compiles only on CUDA.
import json
import os
import subprocess
import sys

import pytest
import torch
import torch._functorch.config
import torch._inductor.config

from mvdream import TINY_VAE_CONFIG, MVDreamPolicy, tiny_text_config
from reconstruct import LGM
from sample import ddim_step_with_logprob, sample_trajectories
from support import compiling
from support.mvdream_weights import WordTokenizer
from toy.world import VOCAB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=64,
                  attention_head_dim=[2, 4], use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
                  norm_num_groups=8, act_fn="silu", class_embed_type="projection",
                  projection_class_embeddings_input_dim=16)


def small_policy(fill_lora_up):
    tokenizer = WordTokenizer(VOCAB, 16)  # as MVDreamPolicy.tiny builds the toy's, with a smaller UNet and VAE
    vae = dict(TINY_VAE_CONFIG, block_out_channels=(8, 8, 8), norm_num_groups=4)
    config = {"unet": SMALL_UNET, "text_encoder": tiny_text_config(tokenizer.vocab_size, 16),
              "tokenizer": {"type": "word", "vocab": tokenizer.vocab, "max_length": 16}, "vae": vae,
              "image_size": 64, "elevation": 15.0}
    policy = MVDreamPolicy.from_config(config, seed=0)
    policy.add_lora(4, 4)
    return fill_lora_up(policy, 0.1, 4)  # adapters that change the output: the reference pass differs


class Reward:  # what compile_models reads of MRCReward: the LGM (compiled, not called here)
    lgm = LGM("tiny")


def replayed_log_probs(policy, traj):
    # the update's view of the samples: each stored transition re-scored by the policy (ppo.py does this)
    out = []
    with torch.no_grad():
        for j in range(traj["timesteps"].shape[1]):
            t, x = traj["timesteps"][:, j], traj["latents"][:, j]
            eps = policy(x, t, traj["prompt_embeds"], 5.0)
            out.append(ddim_step_with_logprob(policy.scheduler, eps, t, x, 1.0, prev_sample=traj["next_latents"][:, j])[1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_compiled_unet_gives_the_eager_log_probs_in_fp32(regional, fill_lora_up, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compiled here, not read from an earlier run
    torch._dynamo.reset()
    policy = small_policy(fill_lora_up)
    with torch.no_grad():
        traj = sample_trajectories(policy, ["a red cube"], num_steps=2, guidance_scale=5.0,
                                   generator=torch.Generator().manual_seed(0))
    eager = replayed_log_probs(policy, traj)
    torch.testing.assert_close(eager, traj["log_probs"], rtol=0, atol=1e-6)
    before = compiling.compile_seconds()
    compiling.compile_models(policy, Reward(), regional=regional)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):  # scalar C++ code: compiles ~25% sooner
        compiled = replayed_log_probs(policy, traj)
    assert compiling.compile_seconds() > before
    assert (policy.unet._compiled_call_impl is None) == regional   # regional: the blocks, not the network
    assert not regional or all(m._compiled_call_impl is not None for m in policy.unet.modules()
                               if type(m).__name__ in compiling.REGIONS)
    # per-dimension mean log-densities (|value| ~ 1-3): the PPO ratio exp(new - old) is off by at most 1e-5
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    torch._dynamo.reset()


CHILD = """
import sys, torch
from support import compiling
print(compiling.load_cache(sys.argv[1], torch.device("cpu")))
f = torch.compile(lambda x: (x.sin() * 3).cos().sum(1), dynamic=False)
f(torch.ones(4, 8))
from torch._dynamo.utils import counters
print("hits", counters["inductor"]["fxgraph_cache_hit"])
"""


def test_compile_cache_is_saved_picked_up_on_resume_and_skipped_when_it_cannot_serve(tmp_path, monkeypatch):
    # this process compiles and saves; a fresh process with an empty Inductor cache (a new machine) loads the cache
    # before compiling and compiles from it; a cache of another torch version or device, or torn, is skipped, said so
    run, cpu = tmp_path / "run", torch.device("cpu")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache-a"))
    assert compiling.load_cache(str(run), cpu) is None  # nothing in run/ yet
    torch.compile(lambda x: (x.sin() * 3).cos().sum(1), dynamic=False)(torch.ones(4, 8))
    written = compiling.save_cache(str(run), cpu)
    assert written > 0 and compiling.save_cache(str(run), cpu) == 0  # the second save has nothing new to write
    info = json.loads((run / compiling.CACHE_INFO).read_text())
    assert info == {"torch": torch.__version__, "device": "cpu", "artifacts": written,
                    "bytes": (run / compiling.CACHE_FILE).stat().st_size}

    proc = subprocess.run([sys.executable, "-c", CHILD, str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
                                                TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache-b")))  # empty
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded, hits = proc.stdout.splitlines()[:2]
    assert loaded == f"compile cache loaded from {run}: {written} artifacts (torch {torch.__version__}, cpu)"
    assert hits != "hits 0"                  # compiled from the loaded artifacts

    (run / compiling.CACHE_INFO).write_text(json.dumps(dict(info, torch="0.0.1")))
    assert compiling.load_cache(str(run), cpu).startswith(
        f"compile cache in {run} skipped: saved with torch 0.0.1 on cpu, this run has torch {torch.__version__} on cpu")
    (run / compiling.CACHE_INFO).write_text(json.dumps(dict(info, device="NVIDIA H100 80GB HBM3")))
    assert "skipped: saved with torch" in compiling.load_cache(str(run), cpu)
    (run / compiling.CACHE_INFO).write_text(json.dumps(dict(info, bytes=info["bytes"] + 1)))
    assert "interrupted copy" in compiling.load_cache(str(run), cpu)
    (run / compiling.CACHE_INFO).write_text("{not json")
    assert "unreadable" in compiling.load_cache(str(run), cpu)
    assert compiling.load_cache(str(tmp_path / "nothing"), cpu) is None


def test_breakdown_counts_the_graphs_compiled_and_their_seconds(monkeypatch):
    # bench/epoch.py's "where the compiling went": one function with a backward is one Dynamo graph and two
    # Inductor graphs (forward, backward), each with time spent; calling it again compiles nothing
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # Inductor compiles (a cache hit would not)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    before = compiling.breakdown(digits=9)
    f = torch.compile(lambda x: (x.sin() * 3).cos().sum(), dynamic=False)
    x = torch.ones(5, 7, requires_grad=True)
    f(x).backward()
    after = compiling.breakdown(digits=9)
    assert after["dynamo_graphs"] - before["dynamo_graphs"] == 1
    assert after["inductor_graphs"] - before["inductor_graphs"] == 2
    grew = {k: after["seconds"][k] - before["seconds"][k] for k in after["seconds"]}
    assert grew["fx_codegen_and_compile"] > 0 and grew["compile_fx.<locals>.bw_compiler"] > 0
    f(x).backward()
    again = compiling.breakdown(digits=9)
    assert {k: again[k] for k in ("dynamo_graphs", "inductor_graphs", "seconds")} == \
        {k: after[k] for k in ("dynamo_graphs", "inductor_graphs", "seconds")}
    assert after["largest_timers"]["_compile.compile_inner"] >= after["seconds"]["bytecode_tracing"]
