"""Plot dCor(X, Z_t) and dCor(Y, Z_t) over the iterations of ``leakaudit decorrelate`` runs, as a PNG.

    python benchmarks/plot_burnin.py OUT.png LABEL=DIR [LABEL=DIR ...]

Each DIR holds a ``decorrelate.json``. One panel per run: dCor(X, Z) in red, dCor(Y, Z) in
blue, on a shared 0–1 axis. Drawn with PIL alone (matplotlib is not a dependency).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

W, H, PAD = 360, 260, 40  # one panel, and its margin for the axes' labels
COLOURS = {"dcor_x": (200, 40, 40), "dcor_y": (40, 80, 200)}


def panel(draw: ImageDraw.ImageDraw, left: int, title: str, history: list[dict]) -> None:
    x0, y0, x1, y1 = left + PAD, PAD, left + W - 10, H - PAD
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    last = max(h["iteration"] for h in history) or 1

    def at(t: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * t / last, y1 - (y1 - y0) * v

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = at(0, v)
        draw.line((x0 - 4, y, x0, y), fill=(0, 0, 0))
        draw.text((left + 6, y - 6), f"{v:.2f}", fill=(0, 0, 0))
    for t in range(0, last + 1, max(1, last // 5)):
        x, _ = at(t, 0)
        draw.line((x, y1, x, y1 + 4), fill=(0, 0, 0))
        draw.text((x - 4, y1 + 6), str(t), fill=(0, 0, 0))
    draw.text((x0, 12), title, fill=(0, 0, 0))
    draw.text(((x0 + x1) // 2 - 20, y1 + 20), "iteration", fill=(0, 0, 0))
    for key, colour in COLOURS.items():
        points = [at(h["iteration"], h[key]) for h in history]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)


def main(out: str, runs: list[str]) -> None:
    image = Image.new("RGB", (W * len(runs), H + 20), "white")
    draw = ImageDraw.Draw(image)
    for i, run in enumerate(runs):
        label, folder = run.split("=", 1)
        history = json.loads((Path(folder) / "decorrelate.json").read_text())["history"]
        panel(draw, i * W, label, history)
    draw.text((10, H + 2), "red: dCor(X, Z)   blue: dCor(Y, Z)", fill=(0, 0, 0))
    image.save(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
