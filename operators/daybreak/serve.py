"""Online serving of the champion with the MLflow scoring protocol, hot-swapping on alias moves.

A background thread polls the champion alias. When it moves, the new version is loaded and
warmed up off the request path, then swapped in with one reference assignment. A request takes
the current model once at its start, so it finishes on the model it started with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from daybreak import registry
from daybreak.context import RunContext
from daybreak.spec import Spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    version: str
    model: Any
    loaded_at: float


class ModelHolder:
    def __init__(self, spec: Spec, ctx: RunContext):
        self.spec, self.ctx = spec, ctx
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Load the champion if it changed. Returns True when a new version went live."""
        with self._lock:
            cl = registry.client(self.ctx)
            mv = registry.alias_version(cl, self.spec.model.name, self.spec.promotion.alias)
            if mv is None or (self.current and self.current.version == str(mv.version)):
                return False
            version = str(mv.version)
            model = registry.load_model(self.ctx, self.spec.model.name, version)
            self._warm_up(model)
            self.current = Loaded(version, model, time.time())
            log.info("serving %s v%s", self.spec.model.name, version)
            return True

    def _warm_up(self, model: Any) -> None:
        """One prediction on the logged input example before the model takes traffic."""
        example = getattr(model, "input_example", None)
        if example is not None:
            model.predict(example)

    def watch(self) -> None:
        while not self._stop.wait(self.spec.serving.poll_seconds):
            try:
                self.refresh()
                self.last_error = None
            except Exception as e:  # keep serving the current model whatever the registry does
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("champion refresh failed, still serving %s: %s",
                            self.current.version if self.current else None, self.last_error)

    def stop(self) -> None:
        self._stop.set()


def create_app(spec: Spec, ctx: RunContext, token: str | None = None) -> Any:
    holder = ModelHolder(spec, ctx)
    registry.setup_tracking(ctx, spec.name)
    try:
        holder.refresh()
    except Exception as e:
        holder.last_error = f"{type(e).__name__}: {e}"
        log.warning("no champion loaded yet: %s", holder.last_error)
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=holder.watch, name="champion-watch", daemon=True)
        thread.start()
        yield
        holder.stop()

    app = FastAPI(title="daybreak", version="1", lifespan=lifespan)
    app.state.holder = holder

    def _auth(request: Request) -> None:
        if token and request.headers.get("authorization") != f"Bearer {token}":
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    @app.get("/ping")
    def ping() -> Any:
        if holder.current is None:
            return JSONResponse({"status": "no model"}, status_code=503)
        return {"status": "ok"}

    @app.get("/health")
    def health() -> Any:
        cur = holder.current
        return JSONResponse({
            "status": "ok" if cur else "no model",
            "model": spec.model.name,
            "alias": spec.promotion.alias,
            "version": cur.version if cur else None,
            "loaded_at": cur.loaded_at if cur else None,
            "last_error": holder.last_error,
        }, status_code=200 if cur else 503)

    @app.get("/version")
    def version() -> Any:
        cur = holder.current
        return {"model": spec.model.name, "alias": spec.promotion.alias, "version": cur.version if cur else None}

    @app.post("/invocations")
    async def invocations(request: Request) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import infer_and_parse_data

        _auth(request)
        cur = holder.current  # taken once: this request finishes on this model
        if cur is None:
            raise HTTPException(status_code=503, detail="no champion model loaded yet")
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(status_code=400, detail="body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(status_code=400,
                                detail="body must be an object with 'dataframe_split', 'dataframe_records' or 'inputs'")
        try:
            frame = infer_and_parse_data(body, cur.model.metadata.get_input_schema())
            preds = cur.model.predict(frame)
        except MlflowException as e:
            raise HTTPException(status_code=400, detail=e.message) from None
        except (ValueError, KeyError, TypeError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        out = preds.tolist() if hasattr(preds, "tolist") else list(preds)
        return JSONResponse({"predictions": out}, headers={"X-Model-Version": cur.version})

    return app


def serve(spec: Spec, ctx: RunContext, host: str | None = None, port: int | None = None,
          token: str | None = None) -> None:
    import uvicorn

    app = create_app(spec, ctx, token=token)
    uvicorn.run(app, host=host or spec.serving.host, port=port or spec.serving.port, log_level="info")
