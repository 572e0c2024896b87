"""The ASGI app ``segreport label`` serves: MONAI Label's own, plus handlers that turn a malformed
request into a 4xx with a ``detail`` (MONAI Label parses ``params`` itself, before any task runs, and
its invalid-input errors would otherwise reach the client as a bare 500), and a check of a training
request before it is queued (too few labelled studies: 422 now, not a failed task later)."""

from __future__ import annotations

import json

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

__all__ = ["app"]


@app.exception_handler(json.JSONDecodeError)
async def _malformed_json(request: Request, exc: json.JSONDecodeError):
    return JSONResponse(status_code=400, content={"detail": f"params is not valid JSON: {exc}"})


@app.exception_handler(MONAILabelException)
async def _monailabel_error(request: Request, exc: MONAILabelException):
    status = 400 if exc.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse(status_code=status, content={"detail": exc.msg})


@app.middleware("http")
async def _training_preflight(request: Request, call_next):
    parts = request.url.path.strip("/").split("/")
    if request.method == "POST" and len(parts) == 2 and parts[0] == "train":
        from monailabel.interfaces.utils.app import app_instance

        instance = app_instance()
        trainer = getattr(instance, "_trainers", {}).get(parts[1])
        if trainer is not None and hasattr(trainer, "labelled"):
            try:
                trainer.labelled(instance.datastore())
            except HTTPException as exc:
                return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail})
    return await call_next(request)

