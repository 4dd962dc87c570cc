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
    p.add_argument("--lgm", default="checkpoints/toy/lgm-tiny-v2.safetensors", help="LGM file/dir or hub id")
    p.add_argument("--lgm-config", default="tiny", help="LGM config (tiny or big)")
    p.add_argument("--elevation", type=float, default=15.0, help="camera elevation, MVDream convention (toy: 15)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
