"""How a report writes a figure: laid out, as PNG, atomically, and closed (pyplot keeps every
open figure alive otherwise)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from dosewise.checkpoint import write_figure_atomic


def save_png(fig, out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    write_figure_atomic(fig, path)
    plt.close(fig)
    return path
