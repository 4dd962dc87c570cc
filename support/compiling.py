# torch.compile for train.py and bench/epoch.py: which modules are compiled, how long compiling took, and a
# portable cache of the compiled code (Inductor's artifacts) in the run directory, so that a resume on another
# machine with the same GPU type and torch version skips most of the warm-up.
# Support code: nothing here changes what is computed (tests/test_compile.py: log-probs equal eager's).
import json
import os

import torch

# Regional compilation (PyTorch's recipe, tutorials/recipes/regional_compilation): compile each repeated block
# once instead of whole networks. Blocks of the same class and shapes share one compiled graph, so the warm-up
# grows with the number of distinct block shapes, not with depth. These are the repeated blocks of diffusers'
# UNet and VAE decoder (ResnetBlock2D, BasicTransformerBlock) and of reconstruct.py's LGM (ResnetBlock, MVAttention).
REGIONS = ("ResnetBlock2D", "BasicTransformerBlock", "ResnetBlock", "MVAttention")
CACHE_FILE, CACHE_INFO = "compile_cache.bin", "compile_cache.json"


def compile_models(policy, reward_fn, mode=None, regional=False):
    """torch.compile where an epoch spends its FLOPs: the UNet (sampling, reference, update; `mode` is a bench
    experiment), the VAE decoder and LGM's U-Net (the reward). Static shapes: every call of an epoch has the
    micro-batch's shape, so each compiles once. regional: each repeated block instead of the whole network."""
    nets = (policy.unet, policy.vae.decoder, reward_fn.lgm.unet)
    if not regional:
        policy.unet.compile(dynamic=False, mode=mode)
        policy.vae.decoder.compile(dynamic=False)
        reward_fn.lgm.unet.compile(dynamic=False)
        return
    # one block class (one forward) meets many shapes: channels, resolutions, and the batch of sampling (CFG) vs
    # the update; Dynamo's default of 8 graphs per function would silently leave the rest eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    for net in nets:
        for module in net.modules():
            if type(module).__name__ in REGIONS:
                module.compile(dynamic=False, mode=mode)


def compile_seconds():
    """Seconds this process has spent compiling so far (Dynamo's own timers: tracing, AOTAutograd and Inductor of
    every forward graph, plus each backward graph, which compiles at its first backward)."""
    from torch._dynamo.utils import compilation_time_metrics as times
    return sum(sum(times.get(k, ())) for k in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler"))


def breakdown(digits=1):
    """Where this process's compile seconds went (Dynamo's timers, nested: tracing, Inductor and the wait for
    Triton's kernel compiles are parts of the total; largest_timers: every phase Dynamo times, largest first) and
    how many graphs Dynamo and Inductor compiled (Inductor's include the backward ones)."""
    from torch._dynamo.utils import compilation_time_metrics as times, counters
    sec = {k: round(sum(times.get(k, ())), digits) for k in ("bytecode_tracing", "fx_codegen_and_compile",
                                                         "async_compile.wait", "compile_fx.<locals>.bw_compiler")}
    top = sorted(((round(sum(v), digits), k) for k in list(times) if (v := times[k])), reverse=True)[:12]
    return {"dynamo_graphs": counters["stats"]["unique_graphs"],
            "inductor_graphs": len(times.get("fx_codegen_and_compile", ())), "seconds": sec,
            "largest_timers": {k: t for t, k in top}}


def cache_key(device):
    # compiled kernels are specific to the torch version and the GPU type they were compiled for
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "device": name}


def load_cache(run_dir, device):
    """Before the first compiled call: load the artifacts a previous run saved in run_dir, if it ran on the same torch
    version and device type. Returns a line for the log (None if run_dir has no cache)."""
    info_path = os.path.join(run_dir, CACHE_INFO)
    if not os.path.isfile(info_path):
        return None
    try:
        with open(info_path) as f:
            info = json.load(f)
        with open(os.path.join(run_dir, CACHE_FILE), "rb") as f:
            blob = f.read()
    except (OSError, ValueError) as e:
        return f"compile cache in {run_dir} skipped: unreadable ({e}); compiling from scratch (it is rewritten)"
    now = cache_key(device)
    if {k: info.get(k) for k in now} != now:
        return (f"compile cache in {run_dir} skipped: saved with torch {info.get('torch')} on {info.get('device')}, "
                f"this run has torch {now['torch']} on {now['device']}; compiling from scratch (it is rewritten)")
    if len(blob) != info.get("bytes"):
        return f"compile cache in {run_dir} skipped: {CACHE_FILE} has {len(blob)} bytes, {CACHE_INFO} says " \
               f"{info.get('bytes')} (an interrupted copy?); compiling from scratch (it is rewritten)"
    torch.compiler.load_cache_artifacts(blob)
    return f"compile cache loaded from {run_dir}: {info['artifacts']} artifacts (torch {now['torch']}, {now['device']})"


def save_cache(run_dir, device):
    """Write every compiled artifact of this process to run_dir if that is more than run_dir holds for this torch
    and device (checkpoint.save_checkpoint calls it each epoch: it writes after the epochs that compiled); atomic.
    Returns the number of artifacts written (0: none)."""
    got = torch.compiler.save_cache_artifacts()
    if got is None:
        return 0
    blob, info = got
    count = sum(len(v) for v in info.artifacts.values())
    key = cache_key(device)
    try:
        with open(os.path.join(run_dir, CACHE_INFO)) as f:
            held = json.load(f)
    except (OSError, ValueError):
        held = {}
    if count == 0 or ({k: held.get(k) for k in key} == key and held.get("artifacts", 0) >= count):
        return 0
    os.makedirs(run_dir, exist_ok=True)
    for name, data, mode in ((CACHE_FILE, blob, "wb"),
                             (CACHE_INFO, json.dumps({**key, "artifacts": count, "bytes": len(blob)}), "w")):
        path = os.path.join(run_dir, name)  # CACHE_INFO last: its byte count tells a torn write from a whole one
        with open(path + ".tmp", mode) as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return count


def active(cfg, device):
    # train.py compiles on CUDA only (cfg.compile); on the CPU it runs eager
    return cfg.compile and device.type == "cuda"


def for_training(cfg, policy, reward_fn, device, rank):
    """train.py: compile (if active) and load the run directory's compile cache, which checkpoint.save_checkpoint
    keeps up to date (save_cache)."""
    if not active(cfg, device):
        return
    compile_models(policy, reward_fn, regional=cfg.compile_regional)
    line = load_cache(cfg.run_dir, device)
    if line and rank == 0:
        print(line)
