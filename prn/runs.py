"""Run folders: where a run's files go and what every run writes first.

Shared by PRN's fit and the models that train nothing (prn.baselines), so neither imports the
other's API. A run folder holds ``config.yaml`` (the config as run, input size resolved),
``split.json`` (the exact file lists, held-out fold included), ``environment.json`` (versions),
``timings.json`` and ``status.json``.

``status.json`` says what became of the run: ``started`` (with the process id and host) when its
folder is made, then ``finished``, ``failed`` (with the error) or ``interrupted`` when the fit
that made it ends (``records_outcome``). The ``latest`` link moves to a run as soon as its folder
is made, so it can point at a run that failed before its first checkpoint; loading such a run
(``prn test runs/.../latest``) then says so, with the error and the newest run beside it that
has a checkpoint (``why_no_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
import socket
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from prn import __version__, allocator
from prn.config import PRNConfig
from prn.data.datasets import original_hw
from prn.data.layouts import load_index
from prn.data.split import Split, drop_copies, few_shot_split, hold_out_validation
from prn.errors import DataError, UsageError
from prn.report import check_out_folder, shown_path

def category_name(cfg: PRNConfig) -> str:
    """The category's display name: cfg.data.category, else the root's folder name when the root is
    itself a category folder (like ../shared/data/kolektorsdd), else the dataset's name."""
    if cfg.data.category:
        return cfg.data.category
    root = Path(cfg.data.root)
    if cfg.data.root and any((root / sub).is_dir() for sub in ("train", "Train")):
        return root.resolve().name
    return cfg.data.dataset


def new_run_dir(cfg: PRNConfig, name: str | None = None, parent: str | Path | None = None) -> Path:
    """Make a new, empty run folder ``<parent>/<time>`` (``-1``, ``-2``... when taken) and point
    ``<parent>/latest`` at it. parent defaults to ``<output_dir>/<dataset>/<category>``."""
    if parent is None:
        parent = check_out_folder(Path(cfg.runtime.output_dir) / cfg.data.dataset / category_name(cfg), "output_dir")
    parent = Path(parent)
    base = parent / (name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir, i = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)  # exist_ok=False: two runs started in the same second differ
            break
        except FileExistsError:
            if not run_dir.exists():
                raise  # a file stands where a parent folder should be
            run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    point_latest(run_dir)
    return run_dir


LATEST = "latest"


def point_latest(run_dir: Path) -> Path:
    """Point ``latest`` beside ``run_dir`` at it: a relative symlink, replaced atomically so a
    reader never sees it missing; where links cannot be made (some Windows and network file
    systems), a text file ``LATEST`` holding the folder's name. Returns the link or file."""
    parent, link = run_dir.parent, run_dir.parent / LATEST
    tmp = parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        marker = parent / LATEST.upper()
        marker.write_text(run_dir.name + "\n")
        return marker
    (parent / LATEST.upper()).unlink(missing_ok=True)  # a stale fallback would contradict the link
    return link


def check_run_dir(run_dir: str | Path, *, overwrite: bool = False) -> Path:
    """A folder a new run may be written to: absent or empty. One holding an earlier run
    (its config.yaml) is emptied only with overwrite; any other non-empty folder is refused, so a
    mistyped path never deletes files prn did not write."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir}: exists and is not a folder")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return run_dir
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"--run-dir {run_dir}: the folder holds files and is not a prn run; "
                         f"give a new or empty folder")
    if not overwrite:
        raise UsageError(f"--run-dir {run_dir}: holds an earlier run; give a new folder, continue it "
                         f"with --resume {run_dir}, or replace it with --overwrite")
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return run_dir


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The processor's model name and family (Linux's /proc/cpuinfo; elsewhere what ``platform``
    knows). Recorded because a CPU fit repeats exactly on one machine but not on another instruction
    set (BENCHMARKS.md, "Weights averaged over the last steps ..."); parsed by hand, no library
    gives it portably without a new dependency."""
    fallback = platform.processor() or platform.machine()
    try:
        first = Path(cpuinfo).read_text().split("\n\n", 1)[0]  # the first processor's block
    except OSError:
        return fallback
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    name = fields.get("model name") or fallback
    return f"{name} (family {fields['cpu family']})" if "cpu family" in fields else name


def environment() -> dict:
    import timm
    import torchvision
    return {
        "prn": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "numpy": np.__version__, "cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "allocator": allocator.in_use(),
    }


def make_split(cfg: PRNConfig) -> Split:
    """The few-shot split of A.2, then the held-out validation/calibration fold of the training data,
    each image file of the dataset counted once (``drop_copies``: said on stderr, listed in split.json)."""
    index = load_index(cfg)
    kept, pairs = drop_copies(index.train + index.test)
    if pairs:
        kept = set(kept)
        index = dataclasses.replace(index, train=[s for s in index.train if s in kept],
                                    test=[s for s in index.test if s in kept])
        named = ", ".join(f"{shown_path(copy.image_path, index.root)} = {shown_path(first.image_path, index.root)}"
                          for copy, first in pairs[:5])
        more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
        print(f"prn: {len(pairs)} image(s) of {index.root} have the same bytes as another and are left out, "
              f"so that each counts once (split.json lists them under copies): {named}{more}", file=sys.stderr)
    split = few_shot_split(index, cfg.data.seen_anomalies, cfg.data.split_seed, dagm=cfg.data.dataset == "dagm")
    split = hold_out_validation(split, cfg.data.val_anomaly_count(), cfg.data.val_normal_fraction,
                                cfg.data.val_normal_min, cfg.data.split_seed)
    return dataclasses.replace(split, copies=[copy for copy, _ in pairs])


def resolve_input_size(cfg: PRNConfig, split: Split) -> PRNConfig:
    """With cfg.model.keep_aspect, fix image_hw from the first training image: the long side
    image_size, the short side scaled alike and rounded to a multiple of 32 (at least 32; of 32 per
    tile with ``tiles``)."""
    if not cfg.model.keep_aspect or any(cfg.model.image_hw):
        return cfg
    h, w = original_hw(split.train_normal[0])
    long = max(h, w)
    step = 32 * cfg.model.tiles
    short = max(step, int(round(min(h, w) * cfg.model.image_size / long / step)) * step)
    hw = (cfg.model.image_size, short) if h >= w else (short, cfg.model.image_size)
    return cfg.replace(image_hw=hw)


def resolve_detail(cfg: PRNConfig, split: Split) -> PRNConfig:
    """Fix the pre-process's filter (``resize_detail``, prn.preprocess.Detail) before any image is
    read: "auto" becomes the side the seen defects (trained and held out) are on
    (``prn.preprocess.defect_side``), and a ``detail_width`` of 0 the width for the first training
    image's resize step (``prn.preprocess.detail_width``). The run's config.yaml keeps the result,
    so test, predict, serve and export filter alike."""
    from prn.preprocess import defect_side, detail_width

    m = cfg.model
    if m.resize_detail == "off" or (m.resize_detail != "auto" and m.detail_width):
        return cfg
    mode = m.resize_detail
    if mode == "auto":
        side = defect_side(split.train_anomalous + split.val_anomalous, cfg.data.max_image_pixels)
        mode = side["mode"]
        print(f"prn: resize_detail auto -> {mode} ({side['why']})", file=sys.stderr)
    width = m.detail_width or detail_width(original_hw(split.train_normal[0]), m.input_hw)
    if mode != "off" and not width:  # the step gave none (a width of 1 asked for is the user's own)
        print(f"prn: resize_detail {mode}: no filter, the training images are resized by a step under 2",
              file=sys.stderr)
    return cfg.replace(resize_detail=mode, detail_width=width)


def start_run(cfg: PRNConfig, run_dir: str | Path | None,
              split: Split | None) -> tuple[Path, Split, PRNConfig]:
    """Split the data (unless given), fix the input size, make the run folder and write config,
    split and versions. Returns the run folder, the split and the config as written."""
    if not run_dir:  # before the data is read: new_run_dir checks the whole path again
        check_out_folder(cfg.runtime.output_dir, "output_dir")
    split = split or make_split(cfg)
    if not split.train_normal:
        raise DataError(f"{cfg.data.root}: no defect-free training images found")
    cfg = resolve_detail(resolve_input_size(cfg, split), split)
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    split.save(run_dir / "split.json")
    (run_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
    mark_started(run_dir)
    return run_dir, split, cfg


def note(run_dir: Path, key: str, value) -> None:
    path = run_dir / "timings.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))


# ----------------------------------------------------------------------------- status.json

STATUS = "status.json"
_ERROR_MAX_CHARS = 500
_watching: list[list[Path]] = []  # the run folders started inside each active records_outcome


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def read_status(run_dir: str | Path) -> dict | None:
    """The run's status.json, or None when it has none (runs of older prn versions) or it is
    unreadable."""
    try:
        data = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_status(run_dir: Path, **fields) -> None:
    data = read_status(run_dir) or {}
    data.update(fields)
    tmp = run_dir / f".{STATUS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, run_dir / STATUS)  # a reader never sees half a file


def mark_started(run_dir: Path) -> None:
    """status.json: ``started`` by this process on this host; ``records_outcome`` ends it."""
    _write_status(run_dir, state="started", pid=os.getpid(), host=socket.gethostname(),
                  started=_now())
    if _watching:
        _watching[-1].append(run_dir)


def _mark_ended(run_dir: Path, exc: BaseException | None) -> None:
    if exc is None:
        fields = {"state": "finished"}
    else:
        error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:_ERROR_MAX_CHARS]
        fields = {"state": "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                  "error": error}
    try:
        _write_status(run_dir, ended=_now(), **fields)
    except OSError:
        pass  # never hide the run's own error behind one about its status file


def records_outcome(function):
    """Decorate a function that makes runs (``api.fit``): every run folder it starts
    (``start_run``) is marked ``finished`` in its status.json when the function returns, or
    ``failed`` / ``interrupted`` with the error when it raises (the error is raised on)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started: list[Path] = []
        _watching.append(started)
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:
            for run_dir in started:
                _mark_ended(run_dir, exc)
            raise
        finally:
            _watching.remove(started)
        for run_dir in started:
            _mark_ended(run_dir, None)
        return result
    return wrapper


def _process_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this host is alive (None: cannot tell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except (OSError, ValueError, TypeError, OverflowError):
        return None
    return True


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints" / name).is_file() for name in ("model.pt", "last.pt"))


def newest_run_with_checkpoint(parent: Path, exclude: Path | None = None) -> Path | None:
    """The most recently started run folder in ``parent`` that has a checkpoint."""
    found = []
    try:
        children = list(parent.iterdir())
    except OSError:
        return None
    for child in children:
        if child.is_symlink() or not child.is_dir() or child.name.startswith("."):
            continue
        if exclude is not None and child.resolve() == exclude.resolve():
            continue
        config = child / "config.yaml"
        if config.is_file() and _has_checkpoint(child):
            found.append((config.stat().st_mtime, child.name, child))
    return max(found)[2] if found else None


def why_no_checkpoint(checkpoint: str | Path) -> str:
    """For a missing checkpoint of a run folder: what became of the run, from its status.json,
    and the newest run beside it that has a checkpoint, as text to append to the "not found"
    message (it starts with ": "); "" when the path is not in a run folder."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name != "checkpoints":
        return ""
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file():
        return ""
    real = run_dir.resolve()
    shown = f"the run {real.name}" + (f" (that {run_dir.name} points at)" if run_dir.is_symlink() else "")
    status = read_status(run_dir) or {}
    state = status.get("state")
    if state == "failed":
        what = f"{shown} failed before its first checkpoint ({status.get('error', 'no error recorded')})"
    elif state == "interrupted":
        what = f"{shown} was interrupted before its first checkpoint"
    elif state == "finished":
        what = f"{shown} finished, but its checkpoint files are gone"
    elif state == "started":
        pid, host = status.get("pid"), status.get("host")
        alive = _process_alive(pid) if host == socket.gethostname() and isinstance(pid, int) else None
        if alive:
            what = f"{shown} is still running (process {pid}) and has no checkpoint yet"
        elif alive is False:
            what = (f"{shown} has no checkpoint: its process ({pid}) ended without writing one or "
                    f"recording an error (killed, or out of memory?)")
        else:
            what = f"{shown} was started on {host} at {status.get('started')} and has no checkpoint yet"
    else:
        what = f"{shown} has no checkpoint (and no {STATUS} saying what became of it)"
    newest = newest_run_with_checkpoint(run_dir.parent, exclude=real)
    hint = (f"; the newest run there with a checkpoint is {run_dir.parent / newest.name}"
            if newest else "")
    return f": {what}{hint}"
