"""``prn benchmark``: fit and test every category with the protocol of A.2, write paper-style tables.

Two uses:
- a dataset table (Tables 1, 2, 8-10): one row per category and a mean row, for ``--model prn`` or
  ``--model patchcore`` on the same splits, metrics and output format;
- an ablation table (Tables 4-7): ``--ablation table4`` etc. runs each variant of that table over
  the categories and writes one row per variant (the mean over categories).

No checkpoint is ever chosen on test data: each fit runs its full schedule and the last weights
are tested once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prn.runs import category_name
from prn.config import PRNConfig
from prn.data.layouts import list_categories
from prn.report import json_safe, markdown_table, mean_metrics, write_results

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
    if cfg.dataset in ("ksdd2", "folder"):
        return [cfg.category]
    found = list_categories(cfg.dataset, cfg.root)
    return found or [cfg.category]


def fit_and_test(cfg: PRNConfig, model: str, run_dir: Path, progress: bool) -> dict:
    from prn import api
    t0 = time.perf_counter()
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose {', '.join(MODELS)}")
    api.fit(cfg, run_dir=run_dir, progress=progress, model=model)
    fit_seconds = time.perf_counter() - t0
    metrics = api.test(run_dir, overlays=0, progress=progress)
    metrics["fit_seconds"] = fit_seconds
    return metrics


def run_benchmark(cfg: PRNConfig, *, model: str = "prn", categories: list[str] | None = None,
                  out_dir: str | Path | None = None, ablation: str | None = None,
                  progress: bool = True) -> str:
    """Fit and test each category (and each ablation variant); return the markdown table."""
    cats = categories_of(cfg, categories)
    tag = ablation or model
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / "benchmark" / cfg.dataset / tag
    out.mkdir(parents=True, exist_ok=True)
    if ablation and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    variants = ABLATIONS[ablation] if ablation else [(model, {})]
    per_variant: dict[str, dict[str, dict]] = {}
    for name, changes in variants:
        rows: dict[str, dict] = {}
        for cat in cats:
            c = cfg.replace(category=cat, **changes)
            label = category_name(c)
            run_dir = out / "runs" / _slug(name) / label
            rows[label] = fit_and_test(c, model, run_dir, progress)
        per_variant[name] = rows
    if ablation:
        # One row per variant: its mean over the categories (the paper's Tables 4-7).
        table = {name: mean_metrics(rows) for name, rows in per_variant.items()}
        labels = ", ".join(next(iter(per_variant.values())))
        title = f"{ablation} on {cfg.dataset} ({labels}), model {model}"
        options = dict(with_mean=False, first_column="Variant")
    else:
        table = per_variant[model]
        title = f"{model} on {cfg.dataset}"
        options = {}
    write_results(out, table, title=title, **options)
    (out / "per_category.json").write_text(json.dumps(json_safe(per_variant), indent=2))
    cfg.save(out / "config.yaml")
    return markdown_table(table, **options)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower()
