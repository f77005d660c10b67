r"""Train a small U-Net score model on scikit-learn's 8×8 digits (CPU), sample, and measure the samples.

Usage::

    OMP_NUM_THREADS=2 python examples/digits.py --threads 2 --out outputs/digits  # the full run (~27 min, 2 shared cores)
    python examples/digits.py --fast --out /tmp/digits                        # a smoke run (seconds)
    python examples/digits.py --plot-only --out outputs/digits                    # redraw the figure of a finished run

The defaults (400 training steps, 256 samples, 100 sampler steps) are sized for 20-30 minutes on
two shared CPU cores; more steps (e.g. ``--steps 3000``) give cleaner samples where time allows.

Outputs in ``--out``: ``digits_samples.png`` (an 8×8 grid of samples next to 8×8 real held-out digits),
``metrics.json`` and the training checkpoints (``ckpt/``, resumable: rerunning continues training).

Evaluation, against the same figures for real held-out digits:

- a fixed classifier (multinomial logistic regression on the training split, fit once here) gives
  each image a predicted class and a confidence $\max_k p(k\mid x)$: we report the mean confidence,
  the share of images classified with confidence above 0.9, and class coverage (how many of the 10
  classes receive at least half of their fair share $n/10$ of predictions, and the effective number
  of classes $\exp H$ of the predicted-class histogram);
- a two-sample distance to the held-out digits: unbiased Gaussian-kernel MMD² (bandwidth: the median
  pairwise distance of the held-out set), for samples, for real training digits (the floor), and for
  a per-pixel independent Gaussian fit to the training digits (a weak baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import sdegen
from sdegen.data import digits, median_bandwidth, mmd2
from sdegen.nn import UNet


# Said in the metrics and the figure of a default run, so that nobody takes its samples for a converged model's.
_SHORT_RUN_NOTE = ("short run, defaults lowered to fit ~20 min on 2 shared CPU cores: training steps 3000 -> 400, "
                   "sampler steps 500 -> 100, samples 400 -> 256")


def _classifier(x_train, y_train):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=5000, C=0.5)
    clf.fit(x_train.reshape(len(x_train), -1).double().numpy(), y_train.numpy())
    return clf


def _class_figures(clf, x) -> dict:
    probs = torch.as_tensor(clf.predict_proba(x.reshape(len(x), -1).double().numpy()))
    conf, pred = probs.max(1)
    hist = torch.bincount(pred, minlength=10).double() / len(x)
    nz = hist[hist > 0]
    return {"confidence": float(conf.mean()), "confident_share": float((conf > 0.9).double().mean()),
            "classes_covered": int((hist >= 0.05).sum()), "effective_classes": float(torch.exp(-(nz * nz.log()).sum())),
            "class_histogram": [round(float(h), 4) for h in hist], "pred": pred}


def _mosaic(imgs, ncol: int, gap_value: float = -0.6):
    """Tile images ``(k, 1, h, w)`` row by row into one 2-D array with a 1-pixel gap of ``gap_value``
    between tiles and around the border (the digits' own margins are background, so without the gap
    neighbouring tiles run into each other)."""
    k, _, h, w = imgs.shape
    nrow = math.ceil(k / ncol)
    tiles = torch.full((nrow * ncol, h + 1, w + 1), gap_value)
    tiles[:k, :h, :w] = imgs[:, 0].clamp(-1, 1)  # each tile carries its right and bottom gap
    canvas = tiles.reshape(nrow, ncol, h + 1, w + 1).permute(0, 2, 1, 3).reshape(nrow * (h + 1), ncol * (w + 1))
    return torch.nn.functional.pad(canvas, (1, 0, 1, 0), value=gap_value)  # top and left border


def _grid(ax, imgs, title, ncol: int = 8):
    """Draw ``imgs`` as a mosaic: ink dark on white (``gray_r`` on [-1, 1]), square pixels, light-grey gaps."""
    ax.imshow(_mosaic(imgs, ncol).numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def _figure(path, samples, real, metrics: dict, max_side: int = 8) -> None:
    """Write the side-by-side square grids (at most ``max_side**2`` tiles) of samples and real held-out digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(max_side * max_side, len(samples), len(real))
    ncol = math.ceil(math.sqrt(k))
    m = metrics
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.9))
    _grid(axes[0], samples[:k], f"samples ({m['sample_method']}, {m['sample_nfe']} NFE)", ncol)
    _grid(axes[1], real[:k], "real held-out digits", ncol)
    fig.suptitle(f"U-Net on sklearn 8x8 digits: {m['train_steps']} training steps, {m['train_time_s'] / 60:.1f} min "
                 f"on {m['train_device']} ({m['torch_threads']} threads)\nclassifier confidence "
                 f"{m['samples']['confidence']:.2f} (real {m['real_heldout']['confidence']:.2f}), "
                 f"MMD² to held-out {m['mmd2_samples_vs_heldout']:.4f} (real train "
                 f"{m['mmd2_real_train_vs_heldout']:.4f}, pixel Gaussian {m['mmd2_pixel_gaussian_vs_heldout']:.4f})"
                 + (f"\n{m['note'].split(': ')[0]}" if m.get("note") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/digits", help="output folder")
    p.add_argument("--fast", action="store_true", help="a few steps and samples, for a smoke test")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400, --fast 30)")
    p.add_argument("--samples", type=int, default=None, help="samples to draw (default 256, --fast 36)")
    p.add_argument("--method", default="euler_maruyama", help="sdegen.sample method")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default 100, --fast 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--plot-only", action="store_true",
                   help="only redraw digits_samples.png from the metrics.json and samples.safetensors in --out")
    args = p.parse_args(argv)
    steps = args.steps or (30 if args.fast else 400)
    n = args.samples or (36 if args.fast else 256)
    sample_steps = args.sample_steps or (20 if args.fast else 100)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    if args.plot_only:
        from safetensors.torch import load_file

        metrics = json.loads((out / "metrics.json").read_text())
        _figure(out / "digits_samples.png", load_file(str(out / "samples.safetensors"))["samples"], x_test, metrics)
        return metrics
    torch.manual_seed(args.seed)
    net = UNet(1, channels=32, channel_mults=(1, 2), num_res_blocks=2, attention_levels=(1,))
    model = sdegen.ScoreModel(net, sdegen.VPSDE(), "eps").to(args.device)
    t0 = time.perf_counter()
    res = sdegen.train(model, x_train, steps=steps, batch_size=128, lr=1e-3, warmup=min(200, steps // 5),
                       ema=0.999, seed=args.seed, checkpoint_dir=out / "ckpt", checkpoint_every=1000,
                       log_file=out / "train_log.jsonl", progress=not args.quiet)
    train_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    with torch.no_grad():
        samp = sdegen.sample(res.model.sde, res.model, (n, 1, 8, 8), method=args.method, steps=sample_steps,
                             generator=gen, device=args.device)
    sample_time = time.perf_counter() - t0
    samples = samp.samples.float().cpu().clamp(-1, 1)
    from safetensors.torch import save_file

    save_file({"samples": samples.contiguous()}, str(out / "samples.safetensors"))  # re-plot without re-sampling

    clf = _classifier(x_train, y_train)
    real = _class_figures(clf, x_test)
    real["accuracy"] = float((real.pop("pred") == y_test).double().mean())
    fake = _class_figures(clf, samples)
    fake.pop("pred")
    h = median_bandwidth(x_test)
    gen_ref = torch.Generator().manual_seed(args.seed + 2)
    ref_train = x_train[torch.randperm(len(x_train), generator=gen_ref)[:n]]
    mean, std = x_train.mean(0), x_train.std(0)
    pixel_gauss = (mean + std * torch.randn((n, *mean.shape), generator=gen_ref)).clamp(-1, 1)
    metrics = {
        "note": None if args.fast or args.steps else _SHORT_RUN_NOTE,
        "train_steps": steps, "train_time_s": round(train_time, 1), "train_device": args.device,
        "torch_threads": torch.get_num_threads(), "sample_method": args.method, "sample_steps": sample_steps,
        "sample_nfe": samp.nfe, "n_samples": n, "sample_time_s": round(sample_time, 1),
        "final_loss_mean_last100": sum(res.history[-100:]) / len(res.history[-100:]),
        "samples_in_range_share": float((samp.samples.abs() <= 1.05).float().mean()),
        "classifier_test_accuracy": real["accuracy"],
        "real_heldout": real, "samples": fake,
        "pixel_gaussian": {k: v for k, v in _class_figures(clf, pixel_gauss).items() if k != "pred"},
        "mmd2_bandwidth": h,
        "mmd2_samples_vs_heldout": mmd2(samples, x_test, bandwidth=h),
        "mmd2_real_train_vs_heldout": mmd2(ref_train, x_test, bandwidth=h),
        "mmd2_pixel_gaussian_vs_heldout": mmd2(pixel_gauss, x_test, bandwidth=h),
        # A narrower kernel (h/2) weighs local structure (strokes) more than global intensity statistics.
        "mmd2_half_bandwidth": {name: mmd2(v, x_test, bandwidth=h / 2) for name, v in
                                (("samples", samples), ("real_train", ref_train), ("pixel_gaussian", pixel_gauss))},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    _figure(out / "digits_samples.png", samples, x_test, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=1))
    print("samples:", {k: v for k, v in fake.items() if k != "class_histogram"})
    print("real:   ", {k: v for k, v in real.items() if k != "class_histogram"})
    return metrics


if __name__ == "__main__":
    main()
