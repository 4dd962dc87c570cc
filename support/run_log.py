# What a run writes for people: metrics.jsonl (one line per epoch), TensorBoard scalars and image grids, and
# optionally Weights & Biases. Rank 0 only. A restarted run drops what the epochs it redoes logged before, so
# every epoch appears once. Support code for train.py.
import dataclasses
import json
import os

import numpy as np
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from support.images import save_grid


def _logged_epoch(line):
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut short by a crash: dropped with the epochs to be redone


class Logger:
    def __init__(self, cfg, rank, start_epoch=0):
        self.active = rank == 0
        self.run_dir, self.max_images = cfg.run_dir, cfg.log_images
        self.tb = self.wandb = None
        if not self.active:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        # A restarted run repeats the epochs after its checkpoint: drop what they logged before (lines here,
        # events in TensorBoard via purge_step) so that every epoch appears once.
        path = os.path.join(cfg.run_dir, "metrics.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if _logged_epoch(line) < start_epoch]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.jsonl = open(path, "a")
        self.tb = SummaryWriter(os.path.join(cfg.run_dir, "tb"), purge_step=start_epoch)
        if cfg.wandb:
            try:
                import wandb  # optional dependency
            except ImportError as e:
                raise ImportError("config wandb: true needs `pip install wandb` (or set wandb: false)") from e
            self.wandb = wandb.init(project="carve3d", dir=cfg.run_dir, config=dataclasses.asdict(cfg))

    def log(self, epoch, metrics):
        if not self.active:
            return
        self.jsonl.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, epoch)
        if self.wandb:
            self.wandb.log(metrics, step=epoch)

    def image(self, epoch, name, grid_path):
        if not self.active:
            return
        img = np.asarray(Image.open(grid_path).convert("RGB"))
        self.tb.add_image(name, img, epoch, dataformats="HWC")
        if self.wandb:
            import wandb  # optional dependency
            self.wandb.log({name: wandb.Image(grid_path)}, step=epoch)

    def grid(self, epoch, name, views, captions):
        # a captioned grid of the first log_images objects -> images/{name}_epoch_NNNN.png and TensorBoard
        if not (self.active and self.max_images):
            return
        n = min(self.max_images, len(views))
        path = os.path.join(self.run_dir, "images", f"{name}_epoch_{epoch:04d}.png")
        save_grid(path, views[:n], captions[:n])
        self.image(epoch, f"{name}/samples", path)

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()
