"""bench_grad.py: per-sample gradients as grad_collect.py computes them against the source project's method
(a Python loop over samples, one backward each, gradients copied out), on the same 784-512-10 MLP and the
same MNIST samples, in one process. Also torch.func's vmap(grad) for scale.

    python benchmarks/bench_grad.py --data-dir ../shared/data

Prints, on --loop-samples samples: seconds per sample and the speed ratio to the loop of
  - layer factors: the exact per-sample gradients as (a_i, b_i) per layer, what grad_collect.py works from,
  - projected: those factors projected to K dims (whole model), what the analysis projects (Epoch.project),
  - materialized: full per-sample gradient tensors [S, *param.shape], what the loop produces,
  - vmap(grad): torch.func over all parameters;
the largest difference to the loop's gradients; and then all 60,000 training samples' gradients projected to
K=1024 from their factors (kept in memory): time, MB and the peak RSS.
Targets: factors >= 20x the loop; all 60,000 projected to K=1024 in <= 60 s with peak RSS <= 4 GB.
First (issue 16), grad_collect's factor store: exact factor collection of --factor-samples (54,000, the
default training split's size) written to .npy (time, MB, peak RSS; targets <= 10 s, <= 1 GB), then the TracIn-style
scores of one test image against all of them from the factors (Epoch.dot) and from materialized per-sample
gradients (a batched loop over the same stored run), with the ratio (target >= 100x).
"""

import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rundir  # noqa: E402
import grad_collect as gc  # noqa: E402
from train_mlp import MLP  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def loop_grads(model, x, y) -> dict:
    """The source's method: for each sample, forward, backward, copy every parameter's gradient out."""
    out = {name: torch.empty(len(y), *p.shape) for name, p in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            out[name][i] = p.grad
    return out


def vmap_grads(model, x, y, chunk: int = 32) -> dict:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))
    out = {name: torch.empty(len(y), *p.shape) for name, p in params.items()}
    for s in range(0, len(y), chunk):
        g = per(params, x[s:s + chunk], y[s:s + chunk])
        for name in out:
            out[name][s:s + chunk] = g[name]
    return out


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@app.command()
def main(data_dir: common.DataDir = Path("./data"), k: Annotated[int, typer.Option(help="Projection dimension.")] = 1024,
         loop_samples: Annotated[int, typer.Option(help="Samples for the loop comparison.")] = 256,
         batch_size: Annotated[int, typer.Option(help="Samples per batch for grad_collect.")] = 1000,
         n: Annotated[int, typer.Option(help="Training samples for the full projected run (at most 60,000).")] = 60000,
         vmap: Annotated[bool, typer.Option(help="Also time torch.func vmap(grad).")] = True,
         factor_samples: Annotated[int, typer.Option(help="Training samples for the factor collection and scores.")] = 54000,
         chunk: Annotated[int, typer.Option(help="Rows per batch of the materialized-gradient scores.")] = 256,
         seed: common.Seed = 0):
    images, labels = common.read_mnist(data_dir, train=True)
    images, labels = images[:n], labels[:n]
    torch.manual_seed(seed)
    model = MLP([512], 10).eval()
    names = gc.param_names(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} "
          f"(cpus: {os.cpu_count()}) | model 784-512-10, {common.count_parameters(model):,} parameters | "
          f"peak RSS so far {peak_rss_mb():.0f} MB")

    # 0. the default --store factors: exact a_i, b_i of every sample, then one test image's scores against all.
    with tempfile.TemporaryDirectory(prefix="bench_grad_") as tmp:
        edir = Path(tmp) / "gradients" / "epoch_1"
        plan = gc.plan_arrays(model, names)
        m = min(factor_samples, len(labels))
        seconds, _ = timed(lambda: gc.collect(model, images[:m], labels[:m], edir, plan, "float32", batch_size))
        written = sum(f.stat().st_size for f in edir.iterdir())
        rss = peak_rss_mb()
        print(f"exact factors of {m:,} samples written to .npy: {seconds:.1f} s ({written / 1e6:.0f} MB) | peak RSS {rss:.0f} MB "
              f"| targets <= 10 s, <= 1024 MB")
        rundir.write_json(edir / "metadata.json", gc.base_meta(model, plan, m, "float32", 1.0))
        ep = gc.Epoch(tmp)
        test_x, test_y = common.read_mnist(data_dir, train=False)
        a, b, _, _ = gc.layer_factors(model, test_x[:1], test_y[:1])  # the stored pixels: the model normalizes them
        t_fac, s_fac = timed(lambda: ep.dot((a, b), None)[0], repeat=3)
        g_test = torch.cat([g.flatten(1) for g in gc.per_sample_grads(model, test_x[:1], test_y[:1]).values()], 1)[0]

        def materialized():
            return torch.cat([ep.flat(range(s, min(s + chunk, m))) @ g_test for s in range(0, m, chunk)])

        t_mat, s_mat = timed(materialized)
        err = ((s_mat - s_fac).abs().max() / s_mat.abs().max()).item()
    print(f"scores of 1 test image against {m:,} training samples: from factors {t_fac:.3f} s, from materialized "
          f"gradients ({chunk} rows at a time) {t_mat:.1f} s -> {t_mat / t_fac:.0f}x (target >= 100x); "
          f"max relative difference {err:.1e}\n")

    # 1. every training sample's whole-model gradient projected to K from its layer factors, batch by batch (what
    # Epoch.project does for the analysis; the projections are kept in memory: N x K floats).
    factors, where = gc.projection_factors(model, k, seed, "cpu"), gc.factor_of(model)

    def project_all():
        return torch.cat([gc.project(*gc.layer_factors(model, images[i:i + batch_size], labels[i:i + batch_size])[:2],
                                     where, names, factors) for i in range(0, len(labels), batch_size)])

    seconds, projected = timed(project_all)
    full_rss = peak_rss_mb()
    print(f"all {len(labels):,} samples, whole-model gradients projected to K={k} from their factors: {seconds:.1f} s "
          f"({projected.numel() * 4 / 1e6:.0f} MB in memory) | peak RSS {full_rss:.0f} MB | targets <= 60 s, <= 4096 MB")

    # 2. The same S samples by every method.
    s = loop_samples
    x, y = images[:s].float(), labels[:s]  # float pixels on the stored 0-255 scale (vmap's input): the model normalizes
    t_loop, want = timed(lambda: loop_grads(model, x, y))
    t_vmap, got_vmap = timed(lambda: vmap_grads(model, x, y)) if vmap else (None, None)

    def factors_only():
        return [gc.layer_factors(model, x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, s, batch_size)]

    def projected():
        where = gc.factor_of(model)
        out = []
        for a, b, _, _ in factors_only():
            out.append(sum(gc.project_param(a, b, where, p, factors) for p in names))
        return torch.cat(out)

    def materialized():
        out = {name: torch.empty(s, *p.shape) for name, p in model.named_parameters()}
        where = gc.factor_of(model)
        for i in range(0, s, batch_size):
            a, b, _, _ = gc.layer_factors(model, x[i:i + batch_size], y[i:i + batch_size])
            for name in names:
                j, kind = where[name]
                if kind == "weight":  # b_i a_i^T written straight into the result
                    torch.mul(b[j][:, :, None], a[j][:, None, :], out=out[name][i:i + batch_size])
                else:
                    out[name][i:i + batch_size] = b[j]
        return out

    t_fac, _ = timed(factors_only, repeat=3)
    t_proj, _ = timed(projected, repeat=3)
    t_mat, got = timed(materialized, repeat=3)
    err = max((got[name] - want[name]).abs().max().item() for name in names)
    err_vmap = max((got_vmap[name] - want[name]).abs().max().item() for name in names) if vmap else float("nan")

    print(f"\n{s} samples, per-sample gradients of the loss, same model and samples:")
    print(f"{'method':<46} {'ms/sample':>10} {'vs loop':>9}")
    rows = [("python loop, backward per sample (the source)", t_loop),
            ("layer factors (a_i, b_i), exact [grad_collect]", t_fac),
            (f"factors projected to K={k} (whole model)", t_proj),
            ("materialized [S, *param.shape] from factors", t_mat)]
    if vmap:
        rows.append(("torch.func vmap(grad), all parameters", t_vmap))
    for name, t in rows:
        print(f"{name:<46} {1e3 * t / s:>10.3f} {t_loop / t:>8.1f}x")
    print(f"max |difference| to the loop's gradients: materialized {err:.2e}, vmap {err_vmap:.2e}")
    print(f"peak RSS {peak_rss_mb():.0f} MB (after the {s}-sample comparison, which holds several full gradient sets)")
    print(f"\nspeed ratio (layer factors vs loop) {t_loop / t_fac:.1f}x (target >= 20x) | "
          f"all {len(labels):,} projected to K={k}: {seconds:.1f} s, peak RSS {full_rss:.0f} MB")


if __name__ == "__main__":
    rundir.main(app)
