"""``prn serve``: a trained model as an HTTP service with a web page (needs the ``serve`` extra:
``pip install 'prn[serve]'``, i.e. fastapi, uvicorn, python-multipart and
fastapi-offline for /docs offline).

    >>> from prn.serve import serve
    >>> serve("runs/demo/latest", host="127.0.0.1", port=8000)      # blocks; Ctrl-C stops it
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
from dataclasses import replace
from pathlib import Path

from prn.errors import PRNError, UsageError

REQUIRED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
            "fastapi_offline": "fastapi-offline"}
TOKEN_ENV = "PRN_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16


def missing_dependencies() -> list[str]:
    """The serve extra's packages that are not installed (their pip names)."""
    return [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]


def require_dependencies() -> None:
    missing = missing_dependencies()
    if missing:
        raise PRNError(f"prn serve needs {', '.join(missing)}: pip install 'prn[serve]' "
                       f"(or pip install {' '.join(missing)})")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_binding(host: str, token: str | None) -> None:
    """Only this machine may reach a server without a token."""
    if is_loopback(host):
        return
    if token is None:
        raise UsageError(f"--host {host} lets other machines reach the service; give it a token "
                         f"(--token or the {TOKEN_ENV} environment variable), e.g. "
                         f"python -c \"import secrets; print(secrets.token_urlsafe(24))\"")
    if len(token) < MIN_TOKEN_CHARS:
        raise UsageError(f"the token must have at least {MIN_TOKEN_CHARS} characters to guard a "
                         f"service other machines can reach")


def check_port(host: str, port: int) -> None:
    """The port can be listened on, checked before the model is loaded: uvicorn would find out
    only after it, and say so among its log lines."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"--port must be a port number from 1 to 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"--host {host}: not an address of this machine ({exc})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): another program, "
                             f"or another prn serve, may hold it; stop it or choose another --port") from exc


def default_corrections_folder(checkpoint: str | Path) -> Path:
    """Where corrections go unless told: ``RUN/corrections`` for a run folder or a checkpoint in
    its ``checkpoints/``, else ``corrections/`` beside the checkpoint file."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / "corrections"
    return (p.parent.parent if p.parent.name == "checkpoints" else p.parent) / "corrections"


def build_app(checkpoint: str | Path, *, device: str | None = None, threshold: float | None = None,
              token: str | None = None, max_request_bytes: int | None = None,
              max_pixels: int | None = None, max_images: int | None = None,
              min_region_area: int | None = None, corrections: str | Path | None | bool = None,
              engine: str = "torch"):
    """Load the model once and return the FastAPI app serving it.

    ``corrections``: the folder the page's corrections go to (None: ``default_corrections_folder``;
    False: corrections off, nothing written and no upload kept). ``engine``: "torch" or "onnx"
    (onnxruntime on the run's exported graph, ``prn.deploy.engine``)."""
    require_dependencies()
    from prn.deploy.predict import Predictor
    from prn.postprocess import MIN_REGION_AREA
    from prn.runtime import ModelThread
    from prn.serve.app import create_app
    from prn.serve.corrections import CorrectionStore, model_description
    from prn.serve.service import InspectionService, Limits

    import torch
    threads = torch.get_num_threads()

    def load() -> Predictor:
        # POST /model/reload calls this again: the same path, re-resolved (a moved 'latest' link
        # or a replaced checkpoint is picked up), the same device and threshold override
        return Predictor(checkpoint, device=device, threshold=threshold, engine=engine, engine_threads=threads)

    # the model is loaded, run and reloaded in one thread (prn.runtime.ModelThread: torch is slower
    # called from many threads than from one)
    model_thread = ModelThread(torch_threads=1 if engine == "onnx" else None)
    predictor = model_thread.run(load)
    defaults = Limits(max_pixels=predictor.cfg.data.max_image_pixels)
    given = {"max_request_bytes": max_request_bytes, "max_pixels": max_pixels, "max_images": max_images}
    limits = replace(defaults, **{k: v for k, v in given.items() if v is not None})
    # an image over the limit is told what set it: this server's option or the model's config
    source = ("--max-pixels" if max_pixels is not None
              else "the model's max_image_pixels; --max-pixels sets another")
    store = None
    if corrections is not False:
        folder = default_corrections_folder(checkpoint) if corrections in (None, True) else Path(corrections)
        store = CorrectionStore(folder, model_description(predictor))
    service = InspectionService(predictor, limits, pixel_limit_source=source, corrections=store, loader=load,
                                min_region_area=MIN_REGION_AREA if min_region_area is None else min_region_area,
                                model_thread=model_thread)
    return create_app(service, token=token)


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, log_level: str = "info", **options) -> None:
    """Serve until interrupted. ``token`` defaults to $PRN_SERVE_TOKEN; binding anything but
    the loopback interface needs one. ``options``: see ``build_app``."""
    token = token or os.environ.get(TOKEN_ENV) or None
    check_binding(host, token)
    check_port(host, port)
    app = build_app(checkpoint, token=token, **options)
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level)
