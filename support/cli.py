# Command-line options shared by evaluate.py and view3d.py: how samples are drawn (fixed noise, so two models
# are compared on identical noise) and which reconstructor scores them. Support code.
import torch


def add_sampling_args(p):
    p.add_argument("--num-steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1 = the RL policy's sampler)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the fixed noise")
    p.add_argument("--bf16", action="store_true", help="CPU: sample under bf16 autocast as CUDA does (toy, 2-core "
                   "CPU with AVX512-BF16: 1.45x faster, same metrics within noise; slower on CPUs without bf16)")


def add_reward_args(p):
    p.add_argument("--lgm", default="checkpoints/toy/lgm-tiny-v3.safetensors", help="LGM file/dir or hub id")
    p.add_argument("--lgm-config", default="tiny", help="LGM config (tiny or big)")
    p.add_argument("--elevation", type=float, default=15.0, help="camera elevation, MVDream convention (toy: 15)")
    p.add_argument("--mrc-fg-threshold", type=float, default=0.8, help="MRC's object box: pixels with a channel "
                   "below this (toy.yaml: 0.8; Carve3D and config.yaml: 0.95)")
    p.add_argument("--mrc-object-size", type=float, default=0.6, help="views zoomed alike to this object size "
                   "before MRC (reward.zoom_to_size; toy.yaml: 0.6; 0 = off, as Carve3D and config.yaml)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
