"""
What 'inverted' means, as a figure: each schedule abar(u), and the density of the log-SNR that
training draws under uniform u (paper §3.4, Fig. 3). The README's docs/schedules.png:

    python tools/schedules.py docs/schedules.png
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import diffusion as D  # noqa: E402


def plot_schedules(path="schedules.png", n=200_000):
    """A figure of what 'inverted' means: the density of logsnr under uniform u, per schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


if __name__ == "__main__":
    print(plot_schedules(*sys.argv[1:2]))
