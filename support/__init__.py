"""Support code: everything a reader of the method can skip.

  mvdream_weights.py  MVDream checkpoints: LDM -> diffusers conversion, hub and local loading, tokenizers, LoRA files
  lgm_weights.py      LGM checkpoints: finding, reading, writing, strict checks
  rasterizer.py       the Gaussian rasterizer (Inria's 3DGS forward pass in PyTorch) behind reconstruct.render_gaussians
  lpips_weights.py    LPIPS-AlexNet with its real ImageNet weights, offline
  config.py           YAML -> train.Config, with checks that name the key
  batch_plan.py       the batch arithmetic of an epoch (pure on-policy or multi-update)
  devices.py          torchrun / DDP, collectives, autocast, syncs
  seeding.py          every generator derived from (seed, purpose, epoch, rank)
  prompts.py          prompt sources and each rank's prompts per epoch
  checkpoint.py       atomic checkpoints and exact resume
  run_log.py          metrics.jsonl, TensorBoard, image grids
  images.py           captioned sample grids and line charts
  ply.py              3D Gaussian splatting .ply files (Inria's layout) for view3d.py
  flops.py            FLOP counting, measured peak, MFU
  cli.py              command-line options shared by evaluate.py and view3d.py
"""
