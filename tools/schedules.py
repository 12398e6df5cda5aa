"""
What 'inverted' means, as a figure: each schedule abar(u), and the density of the log-SNR that
training draws under uniform u (paper §3.4, Fig. 3). It draws docs/schedules.png:

    python tools/schedules.py docs/schedules.png
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
import diffusion as D  # noqa: E402


def plot_schedules(path="schedules.png", n=200_000):
    """A figure of what 'inverted' means: the density of logsnr under uniform u, per schedule."""
    plt = common.pyplot()
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    grid = torch.linspace(0, 1, 500)
    for name in ["linear", "cosine", "sigmoid", "inverted", "inverted+cosine"]:
        fn = D.get_schedule(name)
        axes[0].plot(grid, torch.sigmoid(fn(grid)), label=name)
        axes[1].hist(fn(u).numpy(), bins=120, range=(D.LOGSNR_MIN, D.LOGSNR_MAX), density=True,
                     histtype="step", label=name)
    axes[0].set(xlabel="u", ylabel="abar(u)", title="schedules")
    axes[1].set(xlabel="log-SNR", ylabel="density", title="noise levels seen in training (u ~ U[0,1])")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def path_problem(path):
    """What stops the figure from being written to path ('' if nothing): an image file name that
    matplotlib writes, in an existing directory this process can write into."""
    import tempfile
    from matplotlib.backend_bases import FigureCanvasBase
    kinds = FigureCanvasBase.get_supported_filetypes()
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        return f"{path!r} is a directory: name the figure's file, e.g. {os.path.join(path, 'schedules.png')!r}"
    if os.path.splitext(path)[1][1:].lower() not in kinds:
        return f"{path!r}: the figure's file name must end in one of {', '.join('.' + k for k in sorted(kinds))}"
    if not os.path.isdir(folder):
        return f"{path!r}: no directory {folder!r} to write it in"
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError as e:
        return f"{path!r}: {folder!r} cannot be written ({e.strerror})"
    return ""


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit(f"error: expected at most one argument (the figure's path), got {len(sys.argv) - 1}")
    path = sys.argv[1] if len(sys.argv) > 1 else "schedules.png"
    why = path_problem(path)
    if why:
        sys.exit(f"error: {why}")
    print(plot_schedules(path))
