"""
The z-usage instrument: how much of the image the decoder takes from z. The decoder's x0-MSE with z
against z masked (the unconditional model) on a fixed log-SNR grid; the table and the plot of it.
train.py's evaluation, probe.py's zusage task and the studies in docs/ read it.
"""
import torch

import common
from diffusion import q_sample, x0_from_eps

ZUSAGE_LOGSNRS = (-8.0, -6.0, -4.0, -3.0, -2.0, 0.0, 2.0, 4.0)


@torch.no_grad()
def z_usage(model, x_0, logsnrs=ZUSAGE_LOGSNRS, x_src=None, seed=0, batch=256, rays_src=None, rays_tgt=None):
    """x0-MSE of the decoder with z against z masked (all sections off: the unconditional model),
    on a fixed log-SNR grid, with one fixed noise per image shared by every level. x_0: the images
    to denoise (B, 3, H, W) in [-1, 1]; x_src: the view z is encoded from (default x_0 itself:
    "how much of this image does z carry"). x0_hat = (x_t - sigma eps_hat) / alpha, clipped to
    [-1, 1] as the samplers do. Where the decoder ignores z both curves coincide (0% removed); where
    z carries the image the curve with z falls towards 0 at every noise level. Two reference lines:
    a grey image (x0_hat = 0) and each image's own mean colour. Call under the training
    autocast; the x0 math is fp32. -> dict of lists (one entry per level) and summaries."""
    dev = x_0.device
    x_0 = x_0.float()
    x_src = x_0 if x_src is None else x_src
    eps = torch.randn(x_0.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(dev)
    sums = torch.zeros(len(logsnrs), 2, dtype=torch.float64)
    for i in range(0, len(x_0), batch):
        sl = slice(i, i + batch)
        rs = None if rays_src is None else rays_src[sl]
        rt = None if rays_tgt is None else rays_tgt[sl]
        z = model.encode(x_src[sl], rs)
        B = len(z)
        on = torch.ones(B, model.n_sections, device=dev)
        for j, l in enumerate(logsnrs):
            logsnr = torch.full((B,), float(l), device=dev)
            abar = torch.sigmoid(logsnr)[:, None, None, None]
            x_t = q_sample(x_0[sl], logsnr, eps[sl])
            for k, z_on in enumerate((on, torch.zeros_like(on))):
                eps_hat = model.denoise(x_t, logsnr, z, z_on, rt).float()
                x0_hat = x0_from_eps(x_t, abar, eps_hat).clamp(-1, 1)
                sums[j, k] += (x0_hat - x_0[sl]).pow(2).mean(dim=(1, 2, 3)).double().sum().cpu()
    mse = (sums / len(x_0)).tolist()
    res = {"logsnr": [float(l) for l in logsnrs], "mse_z": [m[0] for m in mse], "mse_masked": [m[1] for m in mse],
           "grey": x_0.pow(2).mean().item(),
           "mean_colour": (x_0 - x_0.mean(dim=(2, 3), keepdim=True)).pow(2).mean().item()}
    res["removed"] = [100.0 * (1 - a / b) if b > 0 else 0.0 for a, b in zip(res["mse_z"], res["mse_masked"])]
    at = dict(zip(res["logsnr"], res["removed"]))
    mid = [r for l, r in at.items() if -6 <= l <= 2]
    res["removed_at_-3"] = at.get(-3.0)
    res["removed_mean"] = sum(mid) / len(mid) if mid else None  # mean over log-SNR -6..+2
    res["worse_than_grey"] = [l for l, m in zip(res["logsnr"], res["mse_z"]) if m > res["grey"]]
    return res


# -----------------------------------------------------------------------------
# the table and the plot

def z_usage_table(res):
    """The z-usage dict as a small text table (one column per log-SNR)."""
    row = lambda name, vals, fmt: f"{name:<16}" + "".join(f"{v:>8{fmt}}" for v in vals)
    return "\n".join([row("log-SNR", res["logsnr"], ".0f"), row("x0-MSE with z", res["mse_z"], ".3f"),
                      row("x0-MSE z masked", res["mse_masked"], ".3f"), row("removed by z %", res["removed"], ".1f"),
                      f"grey image {res['grey']:.3f}, per-image mean colour {res['mean_colour']:.3f}; "
                      f"z removes {res['removed_at_-3']:.1f}% at log-SNR -3, {res['removed_mean']:.1f}% on average "
                      "over -6..+2"])


def plot_z_usage(res, path, title="z usage"):
    """Both x0-MSE curves against log-SNR, with the grey-image and mean-colour lines."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(res["logsnr"], res["mse_masked"], "o-", label="z masked (unconditional)")
    ax.plot(res["logsnr"], res["mse_z"], "o-", label="with z")
    ax.axhline(res["grey"], ls="--", c="grey", label="grey image")
    ax.axhline(res["mean_colour"], ls=":", c="k", label="each image's mean colour")
    for l, m, r in zip(res["logsnr"], res["mse_z"], res["removed"]):
        ax.annotate(f"{r:.0f}%", (l, m), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    ax.set(xlabel="log-SNR (noisier to the left)", ylabel="x0-MSE", yscale="log",
           title=f"{title}: z removes {res['removed_at_-3']:.0f}% at -3, {res['removed_mean']:.0f}% over -6..+2")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
