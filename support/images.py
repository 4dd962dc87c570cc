# Pictures of a run: captioned grids of sample views, and a small line chart (PIL only: no plotting
# dependency for a handful of figures). Support code for train.py, toy/sft.py and evaluate.py.
import os

import torch
from PIL import Image, ImageDraw


def save_grid(path, views, captions):
    # Rows of 4 views (B, V, 3, H, W) in [0, 1], each row captioned (e.g. "prompt | reward"): the picture
    # that train.py, toy/sft.py and evaluate.py write of a batch of samples.
    views = (views.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
    n, v, h, w, _ = views.shape
    cap = 12
    canvas = Image.new("RGB", (v * w, n * (h + cap)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        for j in range(v):
            canvas.paste(Image.fromarray(views[i, j]), (j * w, i * (h + cap) + cap))
        draw.text((2, i * (h + cap)), str(captions[i])[: max(8, v * w // 6)], fill=(0, 0, 0))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)
    return path


def line_plot(path, xs, series, xlabel, ylabel, size=(560, 380)):
    """A small line chart with PIL (no plotting dependency for one figure). A series is a list of y (at xs) or a
    dict {x: y} (its own x values, e.g. checkpoints at different epochs)."""
    W, H = size
    left, right, top, bottom = 60, 130, 20, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    series = {k: sorted(v.items()) if isinstance(v, dict) else list(zip(xs, v)) for k, v in series.items()}
    ys = [y for v in series.values() for _, y in v]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1e-6

    def px(x, y):
        return (left + (x - xs[0]) / max(1e-9, xs[-1] - xs[0]) * (W - left - right),
                H - bottom - (y - lo) / (hi - lo) * (H - top - bottom))
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        d.text((4, px(xs[0], y)[1] - 6), f"{y:.4f}" if hi - lo < 0.01 else f"{y:.3f}", fill=(0, 0, 0))  # distinct ticks
    for x in xs:
        d.text((px(x, lo)[0] - 3, H - bottom + 4), str(x), fill=(0, 0, 0))
    d.text(((W - right) // 2 - 30, H - 18), xlabel, fill=(0, 0, 0))
    d.text((4, 4), ylabel, fill=(0, 0, 0))
    colors = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
              (127, 127, 127), (23, 190, 207)]
    for n, (name, v) in enumerate(series.items()):
        c = colors[n % len(colors)]
        pts = [px(x, y) for x, y in v]
        d.line(pts, fill=c, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
        d.text((W - right + 10, top + 16 * n), name, fill=c)
    img.save(path)
