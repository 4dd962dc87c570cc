# Pictures of a run: captioned grids of sample views (PIL: an image grid, not a chart) and line charts (matplotlib,
# Agg backend: files only, no display). Support code for train.py, toy/sft.py, evaluate.py and support/run_log.py.
import os

import matplotlib

matplotlib.use("Agg")  # no display: every figure goes to a file

import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

CAPTION_FONT_SIZE = 11   # PIL's bundled font (FreeType); a caption line is CAPTION_LINE_PX high
CAPTION_PAD = 2          # pixels around a caption's text (left, above, below)


def _caption_font():
    return ImageFont.load_default(size=CAPTION_FONT_SIZE)


def caption_line_px(font=None):
    ascent, descent = (font or _caption_font()).getmetrics()
    return ascent + descent + 1


def caption_lines(caption, width, font=None):
    """A caption "prompt | score" -> the lines that fit `width` pixels: the prompt wrapped at word boundaries onto
    as many lines as it needs, the part after " | " (the score) whole, at the end of the last line if it fits there
    or on a line of its own. A single word wider than the line stays whole on its own line (it is cut off by the
    picture's edge, never split)."""
    font = font or _caption_font()
    fits = lambda text: font.getlength(text) <= width  # noqa: E731
    prompt, sep, score = str(caption).partition(" | ")
    lines = []
    for word in prompt.split():
        if lines and fits(lines[-1] + " " + word):
            lines[-1] += " " + word
        else:
            lines.append(word)
    if sep:
        tail = "| " + score.strip()
        if lines and fits(lines[-1] + " " + tail):
            lines[-1] += " " + tail
        else:
            lines.append(tail)
    return lines or [""]


def save_grid(path, views, captions):
    """Rows of 4 views (B, V, 3, H, W) in [0, 1], each row under its caption (e.g. "prompt | MRC 0.123"): the picture
    that train.py, toy/sft.py and evaluate.py write of a batch of samples. Every caption strip is as tall as the
    longest wrapped caption (caption_lines), so all rows have the same height: row i's views start at
    i * (H + strip) + strip, strip = image height / B - H."""
    views = (views.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
    n, v, h, w, _ = views.shape
    font = _caption_font()
    wrapped = [caption_lines(captions[i], v * w - 2 * CAPTION_PAD, font) for i in range(n)]
    line = caption_line_px(font)
    cap = max((len(lines) for lines in wrapped), default=1) * line + 2 * CAPTION_PAD
    canvas = Image.new("RGB", (v * w, n * (h + cap)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        top = i * (h + cap)
        if i:
            draw.line([(0, top), (v * w - 1, top)], fill=(200, 200, 200))  # a rule between rows
        for j in range(v):
            canvas.paste(Image.fromarray(views[i, j]), (j * w, top + cap))
        for k, text in enumerate(wrapped[i]):
            draw.text((CAPTION_PAD, top + CAPTION_PAD + k * line), text, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)
    return path


def draw_lines(ax, xs, series, xlabel, ylabel, title=None, legend=True, colors=None):
    """Draw line series with markers on a matplotlib Axes. A series is a list of y (at xs) or a dict {x: y} (its own
    x values, e.g. checkpoints at different epochs); its name is its legend label, colors[name] its colour if
    given (the same run in the same colour on every panel)."""
    all_x = list(xs or [])
    for name, values in series.items():
        points = sorted(values.items()) if isinstance(values, dict) else list(zip(xs, values))
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=4, linewidth=1.5,
                label=str(name), **({"color": colors[name]} if colors else {}))
        all_x += [x for x, _ in points]
    if all_x and all(float(x).is_integer() for x in all_x):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs, levels: no 0.5 ticks
    ax.ticklabel_format(axis="y", useOffset=False)              # plain tick labels, no "+0.09" offset
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize="small")
    return ax


def new_figure(width_px, height_px):
    """A matplotlib Figure of this size in pixels (100 dpi) on an Agg canvas, laid out by constrained_layout. It
    belongs to no pyplot state: nothing to close, garbage-collected with its last reference."""
    fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def line_plot(path, xs, series, xlabel, ylabel, size=(640, 420), title=None):
    """A line chart of `series` ({name: list of y at xs, or {x: y}}) written to `path` (PNG, `size` pixels at 100 dpi).
    Returns the matplotlib Figure (its axes' lines are the series, labelled by name)."""
    fig = new_figure(*size)
    draw_lines(fig.add_subplot(), xs, series, xlabel, ylabel, title or f"{ylabel} by {xlabel}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    return fig
