"""The HTTP side of ``prn serve``: a FastAPI app over one ``InspectionService``.

Routes: ``GET /`` (the page, ``static/``), ``POST /predict`` (multipart field ``files``, or
``file`` as ``curl -F file=@a.png`` habitually sends, one or several images; ``?overlay=1``,
``?mask=1``, ``?min_region_area=N``), ``POST /corrections`` (a verdict marked wrong: the
result's id, its label and, for a missed defect, the painted mask), ``GET /corrections``,
``GET /corrections.zip``, ``GET /health``, ``GET /model``, ``GET /model/held-out/N`` (a
held-out good image the calibration names, the only files of the run it serves), and FastAPI's ``/docs`` and
``/openapi.json``.
Every error is JSON, ``{"error": "<what is wrong>", "status": N}``. An image that cannot be read
does not fail a request that holds others: its result is ``{"name": ..., "error": ...}`` (200);
only a request with no readable image is a 422.

Uploads stay in memory (the body is counted against ``max_request_bytes`` as it arrives, so
nothing larger is ever held) and nothing a client sends is used as a path. Only a correction
writes to disk, into the corrections folder (``prn.serve.corrections``). With a token every
request must carry it: ``Authorization: Bearer TOKEN``, or the cookie that opening
``/?token=TOKEN`` once in a browser sets, so the page's own requests carry it too.

    >>> app = create_app(InspectionService(Predictor("runs/demo/latest")), token=None)
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.background import BackgroundTask
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Receive, Scope, Send

import prn
from prn.errors import DataError, PRNError
from prn.serve.corrections import TEXT_MAX_CHARS, CorrectionError, clean_text
from prn.serve.service import InspectionService, NotCalibratedError, Upload

FIELD = "files"
FIELDS = (FIELD, "file")  # the documented name, and the one curl users habitually type
TOKEN_COOKIE = "prn_token"
STATIC = Path(__file__).parent / "static"  # package data (pyproject.toml)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


class TokenGuard:
    """ASGI middleware: no request passes without the token (header or cookie), static files and
    docs included. ``GET /?token=T`` with the right token sets the cookie and drops the token
    from the address bar."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token.encode()

    def _ok(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if scope["path"] == "/" and request.method == "GET" and "token" in request.query_params:
            if not self._ok(request.query_params["token"]):
                return await error(401, "wrong token")(scope, receive, send)
            response = RedirectResponse("./", status_code=303)
            # HttpOnly: page scripts never see it; Strict: other sites cannot send it along
            response.set_cookie(TOKEN_COOKIE, self.token.decode(), httponly=True, samesite="strict")
            return await response(scope, receive, send)
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if self._ok(bearer) or self._ok(request.cookies.get(TOKEN_COOKIE)):
            return await self.app(scope, receive, send)
        message = ("this server needs its token: send 'Authorization: Bearer TOKEN', or open "
                   "/?token=TOKEN once in the browser" if not auth else "wrong token")
        await error(401, message, {"WWW-Authenticate": "Bearer"})(scope, receive, send)


class _InMemoryParser(MultiPartParser):
    # The whole body is bounded by max_request_bytes before parsing, so keep every part in
    # memory rather than letting large ones roll over to temporary files on disk.
    spool_max_size = 1 << 62


async def _bounded(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused (413) as soon as it passes ``limit`` bytes."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise HTTPException(413, f"request body is over the limit of {limit} bytes "
                                     f"(--max-request-mb)")
        yield chunk


async def read_form(request: Request, limit: int, max_files: int, max_fields: int, what: str,
                    urlencoded: bool = False):
    """A multipart form (or, with ``urlencoded``, a plain one), held in memory and refused as soon
    as its body passes ``limit`` bytes; the caller closes it. ``what`` says what to send, for the
    415 message."""
    kind = request.headers.get("content-type", "")
    if urlencoded and kind.lower().startswith("application/x-www-form-urlencoded"):
        return await FormParser(request.headers, _bounded(request, limit)).parse()
    if not kind.lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"send {what} as multipart/form-data (got content type {kind or 'none'!r})")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes is over the limit of "
                                 f"{limit} bytes (--max-request-mb)")
    parser = _InMemoryParser(request.headers, _bounded(request, limit),
                             max_files=max_files, max_fields=max_fields)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"bad multipart body: {exc.message}") from exc


async def read_uploads(request: Request, service: InspectionService) -> list[Upload]:
    """The images of a multipart request (field ``files`` or ``file``), checked against the
    limits."""
    limits = service.limits
    form = await read_form(request, limits.max_request_bytes, limits.max_images, limits.max_images,
                           f"images in the field {FIELD!r}")
    try:
        uploads = []
        for name, value in form.multi_items():
            if name not in FIELDS:
                raise HTTPException(400, f"unexpected form field {name!r}; send images in the "
                                         f"field {FIELD!r} (or {FIELDS[1]!r})")
            if not isinstance(value, UploadFile):
                raise HTTPException(400, f"form field {name!r} must hold files, got text")
            uploads.append(Upload(value.filename or "", await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise HTTPException(400, f"no images: send one or more files in the form field {FIELD!r}")
    return uploads


class _Static(StaticFiles):
    """Package files, revalidated on every load so a browser never shows a page or script of
    an older version (or a page it fetched before the token cookie was dropped)."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


CORRECTION_FIELDS = ("result", "label", "kind", "mask", "operator", "note", "page_threshold", "page_verdict")


async def read_correction(request: Request, service: InspectionService) -> dict:
    """The fields of a correction form: text fields and at most one file, ``mask``."""
    form = await read_form(request, service.limits.max_request_bytes, 1, len(CORRECTION_FIELDS),
                           "a correction (fields result, label and, for a defect, the file mask)",
                           urlencoded=True)
    try:
        fields: dict = {}
        for name, value in form.multi_items():
            if name not in CORRECTION_FIELDS:
                raise HTTPException(400, f"unexpected form field {name!r}; a correction has "
                                         f"{', '.join(CORRECTION_FIELDS)}")
            if name in fields:
                raise HTTPException(400, f"form field {name!r} is given twice")
            if (name == "mask") != isinstance(value, UploadFile):
                raise HTTPException(400, f"form field {name!r} must be "
                                         f"{'a PNG file' if name == 'mask' else 'text'}")
            fields[name] = await value.read() if name == "mask" else value
    finally:
        await form.close()
    if not fields.get("result"):
        raise HTTPException(400, "form field 'result' is missing: the id /predict gave the image")
    return fields


def _page_facts(fields: dict) -> dict:
    """What the page showed when the operator corrected it: its threshold and verdict."""
    threshold = fields.get("page_threshold")
    try:
        threshold = None if threshold in (None, "") else float(threshold)
    except ValueError:
        raise HTTPException(400, f"form field 'page_threshold' must be a number, got {threshold!r}") from None
    verdict = clean_text(fields.get("page_verdict"), "form field 'page_verdict'")
    return {"threshold": threshold, "verdict": verdict}


def add_correction_routes(app: FastAPI, service: InspectionService, guarded: bool) -> None:
    """POST /corrections, GET /corrections, GET /corrections.zip (prn.serve.corrections)."""

    @app.post("/corrections", status_code=201, openapi_extra=CORRECTION_BODY,
              summary="Correct a verdict: store the image (and its painted mask) in the corrections folder")
    async def correct(request: Request):
        fields = await read_correction(request, service)
        who = {"operator": clean_text(fields.get("operator"), "form field 'operator'"),
               "client": request.client.host if request.client else None,
               "user_agent": (request.headers.get("user-agent") or "")[:TEXT_MAX_CHARS] or None,
               "token": guarded}
        details = dict(mask_png=fields.get("mask"), kind=fields.get("kind") or None, who=who,
                       page=_page_facts(fields), note=clean_text(fields.get("note"), "form field 'note'"))
        return await run_in_threadpool(service.correct, fields["result"], fields.get("label"), **details)

    @app.get("/corrections", summary="Every correction stored so far, oldest first")
    async def corrections():
        store = _store(service)
        records = await run_in_threadpool(store.records)
        return {"folder": str(store.folder), "count": len(records), "corrections": records}

    @app.get("/corrections.zip", summary="The corrections folder as a zip (images, masks, records)")
    async def corrections_zip():
        store = _store(service)
        fd, name = tempfile.mkstemp(suffix=".zip")
        os.close(fd)
        await run_in_threadpool(store.write_zip, name)
        return FileResponse(name, media_type="application/zip", filename="prn-corrections.zip",
                            background=BackgroundTask(os.unlink, name))


def _store(service: InspectionService):
    if service.corrections is None:
        raise HTTPException(404, "corrections are off on this server (prn serve --no-corrections)")
    return service.corrections


CORRECTION_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["result", "label"],
    "properties": {"result": {"type": "string", "description": "the id /predict gave the image"},
                   "label": {"type": "string", "enum": ["good", "defective"]},
                   "kind": {"type": "string", "description": "defect kind (default missed)"},
                   "mask": {"type": "string", "format": "binary",
                            "description": "PNG, white = defect, at the image's size (defective only)"},
                   "operator": {"type": "string"}, "note": {"type": "string"},
                   "page_threshold": {"type": "number"}, "page_verdict": {"type": "string"}}}}}}}


def create_app(service: InspectionService, *, token: str | None = None) -> FastAPI:
    """The service's app; with ``token`` every request must carry it."""
    app = FastAPI(title="prn inspection service", version=prn.__version__, docs_url=None,
                  redoc_url=None,
                  description="Anomaly scores, decisions, heat maps and defect masks from one "
                              "trained prn model.")
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        problems = "; ".join(f"{' '.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error(400, problems)

    @app.exception_handler(DataError)
    async def _data(request, exc):
        return error(422, str(exc))

    @app.exception_handler(NotCalibratedError)
    async def _not_calibrated(request, exc):
        return error(409, str(exc))

    @app.exception_handler(CorrectionError)
    async def _correction(request, exc):
        return error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # the traceback goes to the server's log, not the client
        return error(500, f"internal error ({type(exc).__name__}); see the server's log")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health", summary="Liveness: the model is loaded")
    async def health():
        # model_generation: the page asks this, cheaply, to learn of a reload between uploads
        return {"status": "ok", "model": service.predictor.loaded.kind, "model_generation": service.generation}

    @app.get("/model", summary="The model, its thresholds, versions, metrics and the limits")
    async def model():
        return service.model_info()

    @app.get("/model/held-out/{index}", summary="A held-out good image the calibration names (a suspect, or the "
                                               "one whose score is the threshold), to look at or score")
    async def held_out(index: int):
        try:
            return FileResponse(service.held_out_file(index), headers={"Cache-Control": "no-cache"})
        except DataError as exc:  # nothing outside the calibration's named images is served
            return error(404, str(exc))

    @app.post("/model/reload", summary="Load the model again from the path the server started with "
                                       "(e.g. after 'latest' was pointed at a retrained run)")
    async def reload_model():
        try:
            return await run_in_threadpool(service.reload)
        except PRNError as exc:  # nothing was swapped: say so, with why the new one did not load
            return error(409, f"the model was not reloaded, the one loaded before keeps serving: {exc}")

    @app.post("/predict", summary="Score one or several images (multipart field 'files')",
              openapi_extra=MULTIPART_BODY)
    async def predict(request: Request,
                      overlay: bool = Query(False, description="add a heat-map and contour PNG (base64)"),
                      mask: bool = Query(False, description="add the binary defect mask PNG (base64)"),
                      min_region_area: int | None = Query(
                          None, ge=1, description="list regions of at least this many pixels "
                                                  "(default: the server's --min-region-area)")):
        t0 = time.perf_counter()
        uploads = await read_uploads(request, service)
        # decoding, the model and PNG encoding are CPU work: off the event loop
        results = await run_in_threadpool(service.inspect, uploads, overlay=overlay, mask=mask,
                                          min_region_area=min_region_area)
        # the recent images' look against the calibration's (prn.deploy.drift): a line's client
        # hears when its photos changed, which its false rejects may not show
        return {"results": results, "milliseconds": (time.perf_counter() - t0) * 1000,
                "appearance": service.appearance(), "model_generation": service.generation}

    add_correction_routes(app, service, token is not None)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        # FastAPI's default page loads Swagger UI from a CDN; the same files from the
        # fastapi-offline package keep it working offline, on a line PC.
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - docs",
                                   swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger/favicon.png")

    import fastapi_offline
    swagger = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/static/swagger", _Static(directory=str(swagger)), name="swagger")
    app.mount("/static", _Static(directory=str(STATIC)), name="static")
    if token is not None:
        app.add_middleware(TokenGuard, token=token)
    return app
