"""Support code: plumbing a reader of the method can skip. It imports nothing from the method or the toy world.

  mvdream_weights.py  MVDream checkpoints: LDM -> diffusers conversion, hub and local loading, tokenizers, LoRA files
  lgm_weights.py      LGM checkpoints: finding, reading, writing, strict checks
  rasterizer.py       the Gaussian rasterizer (Inria's 3DGS forward pass in PyTorch) behind reconstruct.render_gaussians
  lpips_weights.py    LPIPS-AlexNet with its real ImageNet weights, offline
  lora_kernel.py      an extension (config fused_lora): each LoRA layer as one GEMM with a hand-written backward
  config.py           YAML -> train.Config, with checks that name the key
  batch_plan.py       the batch arithmetic of an epoch (pure on-policy or multi-update)
  devices.py          torchrun / DDP, collectives, autocast, syncs, compilation
  seeding.py          every generator derived from (seed, purpose, epoch, rank)
  prompts.py          prompt files and each rank's prompts per epoch
  diversity.py        per-prompt LPIPS diversity of samples (validation and evaluate.py)
  stats.py            paired bootstrap over prompts, percentile intervals, linear interpolation (evaluate.py)
  checkpoint.py       atomic checkpoints, exact resume (past damaged checkpoints), best/
  files.py            damaged or missing files as one named error; checkpoint manifests (sizes, sha256)
  run_log.py          metrics.jsonl, TensorBoard, image grids, curves of runs
  images.py           captioned sample grids and line charts
  ply.py              3D Gaussian splatting .ply files (Inria's layout) for view3d.py
  flops.py            FLOP counting, measured peak, MFU
  cli.py              command-line options shared by evaluate.py and view3d.py
"""
