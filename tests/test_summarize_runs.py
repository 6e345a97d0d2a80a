"""benchmarks/summarize_runs.py: the mean +- sd rows of BENCHMARKS.md's seed tables."""

import json
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "summarize_runs.py"


def make_run(folder: Path, image_auroc: float, fit_seconds: float) -> None:
    folder.mkdir(parents=True)
    metrics = {"image_auroc": image_auroc, "pixel_auroc": 0.99, "recall": None, "seconds_per_image": 0.05}
    (folder / "results.json").write_text(json.dumps({"categories": {"c": metrics}}))
    (folder / "timings.json").write_text(json.dumps({"fit_seconds": fit_seconds}))


def test_one_row_per_variant_and_set_with_the_seeds_mean_and_sd(tmp_path, capsys):
    variant = tmp_path / "lr"
    make_run(variant / "bsdata_s0", 0.97, 300)
    make_run(variant / "bsdata_s1", 0.99, 500)
    make_run(variant / "kolektorsdd_s0", 0.995, 400)
    (variant / "kolektorsdd_s1").mkdir()  # not tested: left out
    load_script(SCRIPT).main([str(variant)])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| lr |")]
    assert rows[0].startswith("| lr | bsdata | 2 | 98.0 +- 1.4 | 99.0 +- 0.0 | - |")
    assert rows[0].endswith("| 50 +- 0 | 400 +- 141 |")
    assert rows[1].startswith("| lr | kolektorsdd | 1 | 99.5 | 99.0 | - |") and rows[1].endswith("| 50 | 400 |")


def test_a_missing_folder_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script(SCRIPT).main([str(tmp_path / "nowhere")])
    assert "nowhere: not a folder" in capsys.readouterr().err


def test_per_size_figures_get_a_table_of_their_own(tmp_path, capsys):
    variant = tmp_path / "v"
    for seed, (n, recall) in enumerate([(3, 0.2), (2, 0.4)]):
        make_run(variant / f"bsdata_s{seed}", 0.97, 300)
        results = variant / f"bsdata_s{seed}" / "results.json"
        payload = json.loads(results.read_text())
        payload["categories"]["c"].update({"size_n[< 0.05 %]": n, "size_auroc[< 0.05 %]": 0.9,
                                           "size_recall[< 0.05 %]": recall, "pixels_n[< 16 px]": n,
                                           "pixels_auroc[< 16 px]": 0.8, "pixels_recall[< 16 px]": recall})
        results.write_text(json.dumps(payload))
    load_script(SCRIPT).main([str(variant)])
    out = capsys.readouterr().out.splitlines()
    assert "| v | bsdata | < 0.05 % | 5 | 90.0 +- 0.0 | 30.0 +- 14.1 |" in out
    assert "| v | bsdata | < 16 px | 5 | 80.0 +- 0.0 | 30.0 +- 14.1 |" in out
    assert out.index("| variant | data | defect pixels at the input | defects | I | recall |") > out.index(
        "| v | bsdata | < 0.05 % | 5 | 90.0 +- 0.0 | 30.0 +- 14.1 |")


def test_no_size_table_without_per_size_figures(tmp_path, capsys):
    make_run(tmp_path / "v" / "bsdata_s0", 0.97, 300)
    load_script(SCRIPT).main([str(tmp_path / "v")])
    assert "defect area" not in capsys.readouterr().out


def test_how_many_thresholds_one_held_out_image_set_is_counted_where_recorded(tmp_path, capsys):
    for seed, said in enumerate([1.0, 0.0, None]):
        make_run(tmp_path / "v" / f"kolektorsdd_s{seed}", 0.99, 300)
        if said is not None:
            results = tmp_path / "v" / f"kolektorsdd_s{seed}" / "results.json"
            payload = json.loads(results.read_text())
            payload["categories"]["c"]["threshold_from_one_image"] = said
            results.write_text(json.dumps(payload))
    make_run(tmp_path / "v" / "bsdata_s0", 0.97, 300)  # tested before the field: no line
    load_script(SCRIPT).main([str(tmp_path / "v")])
    out = capsys.readouterr().out.splitlines()
    assert "- v, kolektorsdd: on 1 of 2 runs" in out and not any(line.startswith("- v, bsdata") for line in out)
