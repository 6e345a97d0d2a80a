"""``prn benchmark``: fit and test every category with the protocol of A.2, write paper-style tables.

Two uses:
- a dataset table (Tables 1, 2, 8-10): one row per category and a mean row, for ``--model prn`` or
  ``--model patchcore`` on the same splits, metrics and output format;
- an ablation table (Tables 4-7): ``--ablation table4`` etc. runs each variant of that table over
  the categories and writes one row per variant (the mean over categories).

No checkpoint is ever chosen on test data: each fit runs its full schedule and the last weights
are tested once.

``jobs`` > 1 (``prn benchmark --jobs J``) runs the fits side by side, each (variant, category) in
a process of its own (``python -m prn.benchmark JOB.json``), at most J at a time, on the CUDA
devices in turn (or the CPU, its cores shared out); a job that fails is reported in the table
folder (``failed.json``, results.md) and the others finish. Under torchrun (prn.distributed)
every fit is instead trained by all the processes and rank 0 tests and writes the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from prn import distributed
from prn.runs import category_name
from prn.config import PRNConfig
from prn.data.layouts import list_categories
from prn.errors import PRNError, UsageError
from prn.report import check_out_folder, json_safe, markdown_table, mean_metrics, write_results

class JobsFailed(PRNError):
    """Some jobs of ``run_benchmark(jobs=J)`` failed; the table of the others is written and
    is ``.table``."""

    def __init__(self, message: str, table: str):
        super().__init__(message)
        self.table = table


def _strategies(ea: int, hea: int, hoa: int, ta: int) -> dict:
    return dict(extended_anomalies=bool(ea), heterologous_anomalies=bool(hea),
                homologous_anomalies=bool(hoa), target_areas=bool(ta))


# The ablations of the paper, each a list of (row name, config changes).
ABLATIONS: dict[str, list[tuple[str, dict]]] = {
    # Table 4: modules on the skip connections of the U-Net.
    "table4": [
        ("U-Net", dict(use_prototypes=False, use_attention=False, use_fusion=False)),
        ("U-Net+MP+MF", dict(use_prototypes=True, use_attention=False, use_fusion=True)),
        ("U-Net+MSA+MF", dict(use_prototypes=False, use_attention=True, use_fusion=True)),
        ("U-Net+MP+MSA", dict(use_prototypes=True, use_attention=True, use_fusion=False)),
        ("PRN (MP+MSA+MF)", dict(use_prototypes=True, use_attention=True, use_fusion=True)),
    ],
    # Table 5: anomaly generation strategies (EA, HEA, HOA, TA switched on or off).
    "table5": [(name, _strategies(*flags)) for name, flags in (
        ("EA+TA", (1, 0, 0, 1)), ("EA+HEA+TA", (1, 1, 0, 1)), ("EA+HOA+TA", (1, 0, 1, 1)),
        ("HEA+HOA+TA", (0, 1, 1, 1)), ("EA+HEA+HOA", (1, 1, 1, 0)), ("EA+HEA+HOA+TA", (1, 1, 1, 1)))],
    # Table 6: ratio of prototypes to normal training images (1.0: every image is a prototype).
    "table6": [(f"PRN {int(r * 100)}%", dict(prototype_ratio=r)) for r in (0.05, 0.1, 0.2, 1.0)],
    # Table 7: number of seen anomalies.
    "table7": [(f"{k} seen", dict(seen_anomalies=k)) for k in (1, 5, 10)],
}


MODELS = ("prn", "patchcore", "prototypes")


def categories_of(cfg: PRNConfig, categories: list[str] | None) -> list[str]:
    if categories:
        return list(categories)
    if cfg.data.dataset in ("ksdd2", "folder"):
        return [cfg.data.category]
    found = list_categories(cfg.data.dataset, cfg.data.root)
    return found or [cfg.data.category]


def fit_and_test(cfg: PRNConfig, model: str, run_dir: Path, progress: bool) -> dict:
    """Fit and test one category; under torchrun every rank fits and rank 0 alone tests ({} on
    the others)."""
    from prn import api
    t0 = time.perf_counter()
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose {', '.join(MODELS)}")
    api.fit(cfg, run_dir=run_dir, progress=progress, model=model)
    if not distributed.is_main():
        return {}
    fit_seconds = time.perf_counter() - t0
    metrics = api.test(run_dir, overlays=0, progress=progress)
    metrics["fit_seconds"] = fit_seconds
    return metrics


def job_devices(n: int, device: str, cuda_count: int) -> list[str]:
    """The device of each of ``n`` jobs: with device "auto", the CUDA devices in turn (the CPU
    when there are none); any other device for every job."""
    if device != "auto":
        return [device] * n
    pool = [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    return [pool[i % len(pool)] for i in range(n)]


def run_jobs(tasks: list[tuple[str, str, PRNConfig, Path]], model: str, jobs: int, out: Path,
             progress: bool) -> tuple[dict, dict]:
    """Each task (variant, label, config, run folder) fitted and tested in a process of its own,
    ``jobs`` at a time. Returns ({(variant, label): metrics}, {(variant, label): error message})."""
    import torch
    devices = job_devices(len(tasks), tasks[0][2].runtime.device, torch.cuda.device_count())
    threads = max(1, distributed.usable_cpus() // min(jobs, len(tasks)))  # the CPU's cores shared by the jobs at once
    folder = out / "jobs"
    folder.mkdir(parents=True, exist_ok=True)

    def launch(i: int) -> tuple[dict | None, str | None]:
        name, label, cfg, run_dir = tasks[i]
        stem = folder / f"{_slug(name)}__{label}"
        spec = {"config": cfg.replace(device=devices[i]).to_dict(), "model": model,
                "run_dir": str(run_dir), "threads": threads, "result": str(stem) + ".result.json"}
        Path(spec["result"]).unlink(missing_ok=True)
        (stem.with_suffix(".json")).write_text(json.dumps(spec, indent=1))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)  # a job is one process, whatever launched this one
        with open(str(stem) + ".log", "w") as log:
            code = subprocess.run([sys.executable, "-m", "prn.benchmark", str(stem.with_suffix(".json"))],
                                  stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        result = Path(spec["result"])
        if result.is_file():
            data = json.loads(result.read_text())
            if "metrics" in data:
                return data["metrics"], None
            return None, data["error"]
        tail = Path(str(stem) + ".log").read_text().strip().splitlines()[-3:]
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return None, f"the job process ended ({how}) without a result: {' | '.join(tail)}"

    results, failures = {}, {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads that each wait on one process
        futures = {pool.submit(launch, i): i for i in range(len(tasks))}
        for done, future in enumerate(as_completed(futures), 1):
            name, label = tasks[futures[future]][:2]
            metrics, error = future.result()
            if error is None:
                results[(name, label)] = metrics
            else:
                failures[(name, label)] = error
            if progress:
                print(f"[{done}/{len(tasks)}] {name} {label} on {devices[futures[future]]}: "
                      f"{'done' if error is None else 'FAILED: ' + error}", flush=True)
    return results, failures


def run_benchmark(cfg: PRNConfig, *, model: str = "prn", categories: list[str] | None = None,
                  out_dir: str | Path | None = None, ablation: str | None = None,
                  progress: bool = True, jobs: int = 1) -> str:
    """Fit and test each category (and each ablation variant); return the markdown table.

    jobs > 1: that many fits side by side in processes of their own (see the module docstring);
    the table then holds the categories that finished, and failed.json the others."""
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    world = distributed.world()
    if jobs > 1 and world.distributed:
        raise UsageError("--jobs runs each category in a process of its own; under torchrun every "
                         "category is already trained by all the processes: use one or the other")
    cats = categories_of(cfg, categories)
    tag = ablation or model
    out = check_out_folder(Path(out_dir) if out_dir else Path(cfg.runtime.output_dir) / "benchmark" / cfg.data.dataset / tag)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if ablation and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    variants = ABLATIONS[ablation] if ablation else [(model, {})]
    tasks = []
    for name, changes in variants:
        for cat in cats:
            c = cfg.replace(category=cat, **changes)
            if ablation and c.model.defect_memory == "auto":
                # the paper's tables compare its own parts: the presets' memory of the seen defects
                # (ours) would join some rows and not others (no prototypes, one seen defect)
                c = c.replace(defect_memory="off")
            tasks.append((name, category_name(c), c, out / "runs" / _slug(name) / category_name(c)))
    failures: dict = {}
    if jobs > 1:
        done, failures = run_jobs(tasks, model, jobs, out, progress)
    else:
        done = {(name, label): fit_and_test(c, model, run_dir, progress) for name, label, c, run_dir in tasks}
    if not world.is_main:
        return ""
    per_variant: dict[str, dict[str, dict]] = {}
    for name, label, _, _ in tasks:
        if (name, label) in done:
            per_variant.setdefault(name, {})[label] = done[(name, label)]
    if ablation:
        # One row per variant: its mean over the categories (the paper's Tables 4-7).
        table = {name: mean_metrics(rows) for name, rows in per_variant.items()}
        labels = ", ".join(dict.fromkeys(label for _, label, _, _ in tasks))
        title = f"{ablation} on {cfg.data.dataset} ({labels}), model {model}"
        options = dict(with_mean=False, first_column="Variant")
    else:
        table = per_variant.get(model, {})
        title = f"{model} on {cfg.data.dataset}"
        options = {}
    write_results(out, table, title=title, **options)
    (out / "per_category.json").write_text(json.dumps(json_safe(per_variant), indent=2))
    cfg.save(out / "config.yaml")
    text = markdown_table(table, **options)
    failed = {f"{name} / {label}" if ablation else label: error for (name, label), error in failures.items()}
    (out / "failed.json").unlink(missing_ok=True)
    if failed:
        (out / "failed.json").write_text(json.dumps(failed, indent=2) + "\n")
        section = "\n## Failed\n\n" + "\n".join(f"- {k}: {v}" for k, v in failed.items()) + "\n"
        with (out / "results.md").open("a") as f:
            f.write(section)
        text += "\n" + section
        raise JobsFailed(f"{len(failed)} of {len(tasks)} jobs failed ({'; '.join(f'{k}: {v}' for k, v in failed.items())}); "
                         f"the table of the others is in {out / 'results.md'}, the logs in {out / 'jobs'}", text)
    return text


def _job(spec_path: str) -> int:
    """``python -m prn.benchmark JOB.json``: one fit and test of ``run_jobs``; writes the metrics,
    or the error, to the job's result file (the traceback goes to the job's log)."""
    import torch
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    try:
        metrics = fit_and_test(PRNConfig.from_dict(spec["config"]), spec["model"], Path(spec["run_dir"]),
                               progress=False)
        result, status = {"metrics": json_safe(metrics)}, 0
    except Exception as exc:  # noqa: BLE001 (reported to the parent, which goes on with the others)
        traceback.print_exc()
        result, status = {"error": f"{type(exc).__name__}: {exc}"}, 1
    Path(spec["result"]).write_text(json.dumps(result))
    return status


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower()


if __name__ == "__main__":
    sys.exit(_job(sys.argv[1]))
