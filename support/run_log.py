# What a run writes for people: metrics.jsonl (one line per epoch), TensorBoard scalars and image grids, and
# optionally Weights & Biases. Rank 0 only. A restarted run drops what the epochs it redoes logged before, so
# every epoch appears once. Support code for train.py. Also the curves of runs and of evaluated checkpoints, one
# matplotlib figure of panels (python -m support.run_log, below).
import dataclasses
import json
import math
import os

import numpy as np
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from support import files
from support.images import draw_lines, new_figure, save_grid


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


def read_metrics(run_dir):
    # metrics.jsonl of a run -> list of per-epoch dicts (a line cut short by a crash is skipped)
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir!r} a train.py run_dir?)")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def validation_figure(run_dirs, keys=("val_mrc", "val_fidelity", "val_kl")):
    # One panel per key (validation epochs on x), one line per run: docs/RESULTS.md's RL curves, so that a lower MRC
    # bought with fidelity or KL is visible next to it. -> matplotlib Figure
    def curves(key):
        series = {}
        for run in run_dirs:
            rows = [r for r in read_metrics(run) if key in r]
            if not rows:
                raise KeyError(f"{run}/metrics.jsonl has no {key!r} (val_fidelity: toy world only)")
            series[os.path.basename(os.path.normpath(run))] = {r["epoch"]: r[key] for r in rows}
        return series
    return panels_figure({key: curves(key) for key in keys}, "")


def plot_validation(run_dirs, out, keys=("val_mrc", "val_fidelity", "val_kl")):
    # validation_figure -> the PNG `out`; returns its path
    return _save(validation_figure(run_dirs, keys), out)


def read_checkpoint_curve(eval_dir, key):
    # evaluate.py --table rows named SETTING@EPOCH/SEED (one setting's checkpoints along training, per seed)
    # -> {setting: {epoch: mean over seeds of the row's key}}
    curves = {}
    for name in sorted(os.listdir(eval_dir)):
        setting, sep, epoch = name.rpartition("@")
        if not sep or not epoch.isdigit():
            continue
        values = []
        for seed in sorted(os.listdir(os.path.join(eval_dir, name))):
            values.append(files.read_json(os.path.join(eval_dir, name, seed, "metrics.json"), "evaluate.py's metrics "
                                          "(JSON)", "run that evaluate.py row again")[key])
        curves.setdefault(setting, {})[int(epoch)] = float(np.mean(values))
    if not curves:
        raise FileNotFoundError(f"{eval_dir}: no rows named SETTING@EPOCH/SEED (evaluate.py --table kl@8/1=...)")
    return curves


def checkpoint_curve_figure(eval_dir, keys=("mrc_mean", "fidelity_mean", "diversity")):
    # Test-set metrics of checkpoints along training (mean over seeds), one panel per metric, one line per
    # setting: reward hacking shows as MRC falling while fidelity and diversity fall with it (Carve3D Sec. 4.2).
    # -> matplotlib Figure
    return panels_figure({key: read_checkpoint_curve(eval_dir, key) for key in keys}, "test ")


def plot_checkpoint_curve(eval_dir, out, keys=("mrc_mean", "fidelity_mean", "diversity")):
    # checkpoint_curve_figure -> the PNG `out`; returns its path
    return _save(checkpoint_curve_figure(eval_dir, keys), out)


PANEL_PX = (420, 300)  # one panel's share of the figure, in pixels (100 dpi)


def panels_figure(curves, prefix):
    """{key: {name: {epoch: value}}} -> one matplotlib Figure, one subplot per key (titled prefix + key; x: epoch,
    shared), one line per name in one colour on every panel, one legend for all: a row of up to 3 panels, two
    rows beyond."""
    keys = list(curves)
    names = list(dict.fromkeys(name for key in keys for name in curves[key]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    ncols = len(keys) if len(keys) <= 3 else math.ceil(len(keys) / 2)
    nrows = math.ceil(len(keys) / ncols)
    fig = new_figure(ncols * PANEL_PX[0], nrows * PANEL_PX[1])
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        draw_lines(ax, [], curves[key], "epoch", "", title=prefix + key, legend=False, colors=colors)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    for ax in axes[:len(keys)]:
        ax.xaxis.set_tick_params(labelbottom=True)   # sharex hides the upper row's tick labels: keep them
    handles = {}
    for ax in axes[:len(keys)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend([handles[n] for n in names], names, loc="outside lower center", ncols=min(len(names), 6),
               fontsize="small")
    return fig


def _save(fig, out):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


if __name__ == "__main__":
    # python -m support.run_log runs/toy [runs/nokl ...] --out docs/toy_rl_curve.png     (val curves of runs)
    # python -m support.run_log --eval outputs/eval/gpu --out outputs/curves.png      (test curves of checkpoints)
    import argparse
    p = argparse.ArgumentParser(description="plot val MRC, fidelity and KL of train.py runs, or (--eval) the test "
                                "metrics of evaluate.py --table rows named SETTING@EPOCH/SEED")
    p.add_argument("runs", nargs="*", help="run_dir(s) with a metrics.jsonl")
    p.add_argument("--eval", help="an evaluate.py --table output directory with rows named SETTING@EPOCH/SEED")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--keys", help="comma-separated metrics, one panel each (default: val_mrc,val_fidelity,val_kl; "
                   "with --eval: mrc_mean,fidelity_mean,diversity)")
    a = p.parse_args()
    if bool(a.eval) == bool(a.runs):
        p.error("give run_dir(s) or --eval DIR, not both")
    if a.eval:
        print(plot_checkpoint_curve(a.eval, a.out, *([a.keys.split(",")] if a.keys else [])))
    else:
        print(plot_validation(a.runs, a.out, *([a.keys.split(",")] if a.keys else [])))
