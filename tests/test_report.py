"""report.py: tables (mean +- sample std over seeds, run count) from a results.jsonl and a sweep's trials.jsonl written
here, corrupt and partial lines reported and skipped, config.json filling in options a record lacks, the plot file,
the ablations' noise rule; `reproduce --dry-run` lists its commands and every option they use is in the --help
of the script that gets it."""

import json
import shlex
import statistics

import pytest
from click.testing import CliRunner as ClickRunner
from typer.testing import CliRunner

import common
import report
import sweep
from conftest import ROOT

ACC = {("glonet", 6): [0.981, 0.983, 0.979], ("glonet", 24): [0.984, 0.982, 0.986], ("mlp", 6): [0.98, 0.978, 0.976],
       ("mlp", 24): [0.893]}


def write_results(out_dir):
    """results.jsonl as rundir.Run.finish writes it (rundir.append_jsonl), plus a corrupt line, a partial one and another script's."""
    lines = []
    for (model, layers), accs in ACC.items():
        for seed, acc in enumerate(accs):
            run_dir = out_dir / "train_glonet" / f"{model}-{layers}-{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "config.json").write_text(json.dumps({"script": "train_glonet", "features": 256, "lr": 0.001}))
            lines.append(json.dumps({"time": "t", "script": "train_glonet", "run_dir": str(run_dir), "tag": None, "seed": seed,
                                     "model": model, "layers": layers, "test_acc": acc}))
    lines.insert(3, '{"script": "train_glonet", "run_dir": "/x", "test_a')  # torn by a kill
    lines.insert(5, json.dumps({"script": "train_glonet", "test_acc": 0.5}))  # no run_dir
    lines.append(json.dumps({"script": "svm_gabor", "run_dir": "/y", "seed": 0, "raw_test_acc": 0.96, "gabor_test_acc": 0.99}))
    (out_dir / "results.jsonl").write_text("\n".join(lines) + "\n")


def invoke(*args):
    result = CliRunner().invoke(report.app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_table_means_stds_counts_skipped_lines_and_plot(tmp_path):
    write_results(tmp_path)
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    result = invoke("--out-dir", tmp_path, "--by", "model,layers,features", "--out", md, "--plot", png)
    for (model, layers), accs in ACC.items():
        mean = 100 * statistics.mean(accs)
        spread = f" +- {100 * statistics.stdev(accs):.2f}%" if len(accs) > 1 else ""  # sample std; none for one run
        # features comes from each run's config.json (the results lines lack it)
        assert f"| {model} | {layers} | 256 | {len(accs)} | {mean:.2f}%{spread} |" in result.stdout, result.stdout
    assert md.read_text() == result.stdout
    assert png.stat().st_size > 5000
    assert f"{tmp_path / 'results.jsonl'}:4: not valid JSON" in result.stderr
    assert f"{tmp_path / 'results.jsonl'}:6: partial record (no run_dir)" in result.stderr
    assert "left out 1 run(s) without a numeric test_acc (scripts: svm_gabor)" in result.stderr

    svm = invoke("--out-dir", tmp_path, "--script", "svm_gabor", "--metric", "gabor_test_acc")
    assert "| svm_gabor | 1 | 99.00% |" in svm.stdout

    rows = report.aggregate(report.load_records(tmp_path, script="train_glonet")[0], ["layers"], "test_acc")
    assert [r["group"]["layers"] for r in rows] == ["6", "24"] and [r["n"] for r in rows] == [6, 4]


def test_sweep_trials_latest_line_failed_trials_and_no_double_counting(tmp_path):
    write_results(tmp_path)
    sweep_dir = tmp_path / "sweeps" / "s"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"script": "/repo/train_glonet.py"}))
    first = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])  # this run is also a sweep trial
    trials = [{"options": {"model": "glonet", "layers": "6"}, "seed": 0, "status": "ok", "run_dir": first["run_dir"],
               "config": {"script": "train_glonet"}, "final": {"test_acc": first["test_acc"]}},
              {"options": {"model": "glonet", "layers": "100"}, "seed": 0, "status": "failed", "config": None, "final": None},
              {"options": {"model": "glonet", "layers": "100"}, "seed": 0, "status": "failed", "config": None, "final": None}]
    (sweep_dir / "trials.jsonl").write_text("\n".join(json.dumps(t) for t in trials) + '\n{"options": {"mod')
    result = invoke("--out-dir", tmp_path, "--script", "train_glonet", "--by", "model,layers")
    assert "| glonet | 6 | 3 | 0 |" in result.stdout  # counted once although listed twice
    assert "| glonet | 100 | 0 | 1 | n/a |" in result.stdout  # the failed trial's latest line only
    assert f"{sweep_dir / 'trials.jsonl'}:4: not valid JSON" in result.stderr
    only = invoke("--sweep", sweep_dir, "--by", "layers")
    assert "| 6 | 1 | 0 | 98.10% |" in only.stdout and "| 100 | 0 | 1 | n/a |" in only.stdout

    empty = CliRunner().invoke(report.app, ["--out-dir", str(tmp_path / "nothing")])
    assert isinstance(empty.exception, common.UserError) and "nothing to report" in str(empty.exception)


def test_ablation_noise_rule():
    def row(config, values):
        mean, std = report.mean_std(values)
        return {"group": {"config": config}, "n": len(values), "mean": mean, "std": std, "values": values, "failed": 0}

    rows = [row("baseline", [0.970, 0.972, 0.974]), row("kaiming", [0.980, 0.981, 0.982]), row("xavier", [0.969, 0.975, 0.972]),
            row("cosine", [0.99])]
    verdicts = {v["config"]: v for v in report.noise_verdicts(rows)}
    assert verdicts["kaiming"]["exceeds"] and abs(verdicts["kaiming"]["diff"] - 0.009) < 1e-9
    assert not verdicts["xavier"]["exceeds"] and not verdicts["cosine"]["enough"]
    text = report.ablation_markdown(rows)
    assert "| kaiming | `--init kaiming` | 3 | 98.10% +- 0.10% | +0.90 (2 SE 0.26) | yes |" in text, text
    assert "- xavier: +0.00 points against the baseline, within the seed noise" in text


def test_reproduce_dry_run_lists_commands_and_every_option_exists(tmp_path):
    proc = invoke("reproduce", "--quick", "--dry-run", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "runs")
    listed = [line for line in proc.stdout.splitlines() if line.startswith("python ")]
    plan = report.reproduce_plan(True, tmp_path / "data", tmp_path / "runs")
    assert listed == ["python " + shlex.join(j["cmd"]) for j in plan] and len(listed) >= 10
    assert not (tmp_path / "runs").exists()  # nothing ran

    helps = {}

    def options_of(script):  # the script's own --help output, in-process
        if script not in helps:
            command = sweep.script_command(ROOT / script)
            result = ClickRunner().invoke(command, ["--help"], terminal_width=250, prog_name=script)
            assert result.exit_code == 0, result.output
            helps[script] = result.output
        return helps[script]

    def check(script, words):
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in options_of(script), f"{script} --help lacks {word}"

    full = report.reproduce_plan(False, tmp_path / "data", tmp_path / "runs", gpu=True)  # with the GPU-only All-CNN-T job
    for job in plan + full:
        cmd = job["cmd"]
        if cmd[0] != "sweep.py":
            check(cmd[0], cmd[1:])
            continue
        target, words = cmd[1], cmd[2:]
        check("sweep.py", words)  # grid and config values do not start with --
        for flag, value in zip(words, words[1:]):
            if flag == "--grid":
                check(target, ["--" + value.split("=")[0]])
            elif flag == "--config":
                check(target, shlex.split(value.split("=", 1)[1]))
        # and sweep.py itself accepts them (each value parsed by the target's own command; nothing runs)
        grid, _ = sweep.parse_grid([v for f, v in zip(words, words[1:]) if f == "--grid"], ROOT / target, allow_empty=True)
        sweep.parse_configs([v for f, v in zip(words, words[1:]) if f == "--config"], ROOT / target, grid)
    assert {"allcnn", "fgsm", "depth", "ablations"} <= {j["name"] for j in full}


def test_claim_verdicts_are_computed_from_the_measurements():
    def runs(rows):  # [(fields, final)] -> the records a job leaves
        return {"records": [report.Record("t", "s", f"/r{i}", dict(f), final=dict(m)) for i, (f, m) in enumerate(rows)]}

    # a sweep's records hold their options as the strings typed (trials.jsonl: "layers": "6")
    depth = [({"model": m, "layers": str(d), "seed": 0}, {"test_acc": a, **({"layers_for_acc": k} if m == "glonet" else {})})
             for m, d, a, k in (("glonet", 6, 0.983, 5), ("glonet", 24, 0.984, 6), ("glonet", 50, 0.9825, 9),
                                ("mlp", 6, 0.9818, 0), ("mlp", 24, 0.893, 0), ("mlp", 50, 0.1135, 0))]
    done = {"mlp": runs([({"seed": s}, {"test_acc": a}) for s, a in enumerate((0.9828, 0.9815, 0.9829))]),
            "production-mlp": runs([]),
            "cnn": runs([({"seed": s}, {"test_acc": a}) for s, a in enumerate((0.9907, 0.9890, 0.9916))]),
            "depth": runs(depth),
            "svm": runs([({"seed": 0}, {"raw_test_acc": 0.9637, "gabor_test_acc": 0.9893})]),
            "fgsm": runs([({}, {"eps": 64, "clean_acc": 0.99, "fgsm_acc": 0.2, "iterative_acc": 0.01})]),
            "clusters": runs([({"grad_ari": 0.0, "grad_ari_direction": 0.6}, {"grad_array": "net.3.weight"})])}
    claims = {c["claim"]: c for c in report.evaluate_claims(done)}
    verdict = lambda text: next(c["passed"] for name, c in claims.items() if name.startswith(text))  # noqa: E731
    assert verdict("MLP 784-512-10") is True and verdict("CNN >= 99%") is True  # mean 99.04% >= 99%
    assert "2 of 3 runs pass alone" in claims["CNN >= 99% (the production-pipeline project; train_cnn.py defaults)"]["measured"]
    assert verdict("GloNet depth 50") is True and verdict("MLP depth 6") is True and verdict("MLP depth 24") is False
    assert not any(name.startswith("GloNet depth 100") for name in claims)  # a depth quick mode does not run is not listed
    assert verdict("the plain MLP degrades") is True and verdict("GloNet does not degrade") is True
    assert verdict("GloNet: only the first") is False  # k = 9 at depth 50
    assert "values 6, 9" in claims["GloNet: only the first 4-8 layers matter, depth >= 24 (GloNets paper)"]["measured"]  # a count, not %
    assert verdict("Gabor") is True and verdict("FGSM") is True and verdict("per-sample-gradient clusters") is False
    assert verdict("FC 784-256-128-10") is None and verdict("All-CNN-T") is None  # not measured / not run
    assert claims["FC 784-256-128-10, dropout 0.2, early stopping (the production-pipeline project)"]["measured"] == "not measured"
    assert claims["All-CNN-T on CIFAR-10, 100 epochs (the self-learning project)"]["measured"].startswith("not run")
    # one number moved across a rule's line flips exactly that verdict
    done["depth"]["records"][2].final["layers_for_acc"] = 8
    done["svm"]["records"][0].final["gabor_test_acc"] = 0.96
    claims = {c["claim"]: c for c in report.evaluate_claims(done)}
    assert verdict("GloNet: only the first") is True and verdict("Gabor") is False


def test_every_claim_names_a_reproduce_job_and_a_known_rule():
    jobs = {j["name"] for j in report.reproduce_plan(False, "d", "o", gpu=True)}
    for c in report.CLAIMS:
        assert c["job"] in jobs, c["claim"]
        assert c["rule"] is None or c["rule"][0] in (*report.OPS, "within", "between"), c["claim"]
        assert report.rule_text(c)


def write_runs(out_dir, runs):
    """runs: (script, options, seed, test_acc, time); config.json lists its options as Run.save_config writes them."""
    lines = []
    for i, (script, options, seed, acc, when) in enumerate(runs):
        run_dir = out_dir / script / f"run{i}"
        run_dir.mkdir(parents=True)
        config = {"script": script, **options, "seed": seed, "quiet": True, "out_dir": "x", "created": when,
                  "options": sorted([*options, "seed", "quiet", "out_dir"]), "script_sha256": "a" if i % 2 else "b",
                  "git": {"commit": "c1" if i < 3 else "c2", "dirty": i == 0, "root": "/r"}}
        (run_dir / "config.json").write_text(json.dumps(config))
        lines.append(json.dumps({"time": when, "script": script, "run_dir": str(run_dir), "seed": seed, "test_acc": acc}))
    (out_dir / "results.jsonl").write_text("\n".join(lines) + "\n")


def test_options_that_differ_split_groups_reruns_of_a_seed_count_once_and_several_scripts(tmp_path):
    glonet = lambda layers, epochs: {"model": "glonet", "layers": layers, "epochs": epochs}  # noqa: E731
    write_runs(tmp_path, [
        ("train_glonet", glonet(6, 3), 0, 0.97, "2026-12-01T10:00:00"),
        ("train_glonet", glonet(6, 3), 1, 0.95, "2026-12-01T10:01:00"),
        ("train_glonet", glonet(6, 20), 0, 0.99, "2026-12-01T10:02:00"),
        ("train_glonet", glonet(24, 3), 0, 0.96, "2026-12-01T10:03:00"),
        ("train_glonet", glonet(24, 3), 0, 0.50, "2026-12-01T09:00:00"),  # an earlier run of seed 0: left out
        ("train_glonet", glonet(24, 3), 0, 0.94, "2026-12-01T10:05:00"),  # the latest run of seed 0: counted
        ("train_mlp", {"hidden": [16]}, 0, 0.90, "2026-12-01T10:06:00"),
        ("my_mlp", {"hidden": [16]}, 0, 0.80, "2026-12-01T10:07:00"),
    ])
    split = invoke("--out-dir", tmp_path, "--script", "train_glonet", "--by", "model")
    assert "also grouped by epochs, layers" in split.stderr
    assert "| glonet | 3 | 6 | 2 | 96.00% +- 1.41% |" in split.stdout, split.stdout  # seeds 0 and 1
    assert "| glonet | 20 | 6 | 1 | 99.00% |" in split.stdout  # one run: no spread
    assert "| glonet | 3 | 24 | 1 | 94.00% |" in split.stdout  # 3 runs of seed 0: the latest only
    assert "left out 2 earlier run(s)" in split.stderr and "seed 0: 3 runs" in split.stderr
    assert "different versions of their script" in split.stderr  # script_sha256 differs within a group

    code = invoke("--out-dir", tmp_path, "--script", "train_glonet", "--by", "git_commit,git_dirty", "--pool", "epochs,layers")
    assert "| c1 | true | 1 | 97.00% |" in code.stdout and "| c1 | false | 2 | 97.00% +- 2.83% |" in code.stdout, code.stdout
    assert "| c2 | false | 1 | 94.00% |" in code.stdout  # (3, 24) seed 0: the latest of its 3 runs

    pooled = invoke("--out-dir", tmp_path, "--script", "train_glonet", "--by", "model", "--pool", "epochs,layers")
    assert "| glonet | 4 | 96.25% +- 2.22% |" in pooled.stdout, pooled.stdout  # 0.97, 0.95, 0.99 and the latest 0.94
    assert "Pooled over epochs (3, 20); layers (6, 24) (--pool)." in pooled.stdout
    assert "also grouped" not in pooled.stderr

    for words in (["--script", "train_mlp,my_mlp"], ["--script", "train_mlp", "--script", "my_mlp.py"]):
        both = invoke("--out-dir", tmp_path, *words)
        assert "| my_mlp | 1 | 80.00% |" in both.stdout and "| train_mlp | 1 | 90.00% |" in both.stdout, both.stdout
        assert "glonet" not in both.stdout


def test_categorical_plot_draws_points_with_error_bars_inside_0_100(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn, errorbar = [], Axes.errorbar

    def record(self, x, y, yerr=None, **kwargs):
        drawn.append({"x": list(x), "y": list(y), "yerr": yerr, "linestyle": kwargs.get("linestyle")})
        return errorbar(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", record)
    rows = [{"group": {"script": name}, "n": 3, "mean": mean, "std": 0.05, "failed": 0}
            for name, mean in (("train_mlp", 0.99), ("train_cnn", 0.02))]
    report.plot(rows, ["script"], "test_acc", tmp_path / "s.png")
    (line,) = drawn
    assert line["linestyle"] == "none"  # categories are not joined by a line
    low, high = line["yerr"]
    for y, lo, hi in zip(line["y"], low, high):
        assert y - lo >= 0 and y + hi <= 100 + 1e-9
    assert high[0] == pytest.approx(1.0) and low[1] == pytest.approx(2.0)  # clipped at 100% and at 0%
    report.plot([{**r, "group": {"layers": str(i)}} for i, r in enumerate(rows, 1)], ["layers"], "test_acc", tmp_path / "n.png")
    assert drawn[-1]["linestyle"] == "-"  # a numeric x stays a line


# ----------------------------------------------------------------------------- bad input: one line, exit 2
GLONET_RUNS = [("train_glonet", {"model": m, "layers": d, "epochs": 3}, s, 0.9 + d / 1000 + s / 100, f"2026-12-01T10:0{i}:00")
               for i, (m, d, s) in enumerate((("glonet", 6, 0), ("glonet", 6, 1), ("glonet", 24, 0), ("mlp", 6, 0)))]


@pytest.mark.parametrize("args, words", [
    (["--by", "model,modle"], ["--by modle", "model", "layers", "epochs", "script"]),
    (["--by", "model", "--pool", "epoch"], ["--pool epoch", "epochs"]),
    (["--script", "train_glonet,train_glonett"], ["--script train_glonett", "train_glonet", "train_mlp"]),
    (["--metric", "test_ac"], ["--metric test_ac", "test_acc"]),
])
def test_unknown_keys_scripts_and_metrics_exit_2_naming_what_exists(tmp_path, args, words):
    from conftest import assert_user_error
    from test_common import run_in_process

    write_runs(tmp_path, [*GLONET_RUNS, ("train_mlp", {"hidden": [16]}, 0, 0.9, "2026-12-01T10:09:00")])
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"torn')  # a note on stderr that the refusal comes before
    assert_user_error(run_in_process(report, "--out-dir", tmp_path, *args), *words)


def test_plot_labels_each_point_with_n_and_states_the_fixed_settings(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    write_runs(tmp_path, GLONET_RUNS)
    png = tmp_path / "p.png"
    invoke("--out-dir", tmp_path, "--by", "model,layers", "--plot", png)
    assert png.stat().st_size > 5000
    (ax,) = saved[-1].axes
    assert sorted(t.get_text() for t in ax.texts) == ["n=1", "n=1", "n=2"]  # glonet 6 (seeds 0, 1), glonet 24, mlp 6
    assert "held fixed: script=train_glonet, epochs=3" in ax.get_title() and "n = runs averaged" in ax.get_title()

    invoke("--out-dir", tmp_path, "--by", "model", "--pool", "layers", "--plot", png)
    assert "pooled over layers (6, 24)" in saved[-1].axes[0].get_title()
    assert sorted(t.get_text() for t in saved[-1].axes[0].texts) == ["n=1", "n=3"]
