"""The web server of ``rrstub ui``: the page and its JSON API (aiohttp).

Every handler that touches a recording runs in a worker thread: replay
work never runs on the event loop, so one tab's long seek never stalls
another tab or the live console.  The API is documented in ``API_HELP``
(``rrstub ui --help`` prints it, ``GET /api`` answers it).
"""
from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import json
import os
import signal
import sys
import threading
from typing import Callable, Optional

from aiohttp import WSMsgType, web

from rrstub.ui.apihelp import API_HELP
from rrstub.ui.tasks import CropTask, LiveTask, free_path
from rrstub.ui.tree import branch_tree
from rrstub.ui.view import RecordingView, Superseded, ViewError

STATIC = os.path.join(os.path.dirname(__file__), "static")
WORKERS = 16



class UiState:
    def __init__(self, paths: list[str], warn: Callable[[str], None], read_ahead: bool = True):
        self.warn = warn
        self.read_ahead = read_ahead
        self.views: dict[str, RecordingView] = {}
        self.jobs: dict[str, CropTask] = {}
        self.lives: dict[str, LiveTask] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="rrstub-ui")
        self._lock = threading.Lock()
        self._counts = {"r": 0, "j": 0, "l": 0}
        for p in paths:
            self.open(p)

    def _next(self, kind: str) -> str:
        with self._lock:
            n = self._counts[kind]
            self._counts[kind] += 1
            return f"{kind}{n}"

    def open(self, path: str) -> RecordingView:
        ap = os.path.abspath(path)
        for v in self.views.values():
            if v.path == ap:
                return v
        view = RecordingView(self._next("r"), path, warn=self.warn)
        self.views[view.id] = view
        if view.error is None and self.read_ahead:
            threading.Thread(target=view.prefetch, name=f"rrstub-ui-prefetch-{view.id}", daemon=True).start()
        else:
            self.warn(f"{path}: {view.error}")
        return view

    def open_paths(self) -> dict[str, str]:
        return {v.path: v.id for v in self.views.values()}

    def close(self) -> None:
        for task in list(self.lives.values()):
            task.stop()
        for task in list(self.lives.values()) + list(self.jobs.values()):
            try:
                task.proc.wait(timeout=20)
            except Exception:
                task.kill()
        for v in self.views.values():
            v.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def _int(request: web.Request, name: str, default: Optional[int] = None) -> int:
    text = request.query.get(name)
    if text is None:
        if default is None:
            raise web.HTTPBadRequest(text=json.dumps({"error": f"{name}= is missing"}),
                                     content_type="application/json")
        return default
    try:
        return int(text, 0)
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"{name}={text!r} is not a number"}),
                                 content_type="application/json") from None


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the request body is not JSON"}),
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the request body must be a JSON object"}),
                                 content_type="application/json")
    return body


def make_app(state: UiState) -> web.Application:
    routes = web.RouteTableDef()

    def not_found(message: str) -> web.HTTPNotFound:
        return web.HTTPNotFound(text=json.dumps({"error": message}), content_type="application/json")

    def view_of(request: web.Request) -> RecordingView:
        v = state.views.get(request.match_info["rid"])
        if v is None:
            raise not_found(f"no open recording {request.match_info['rid']!r}: GET /api/recordings lists them")
        return v

    async def blocking(fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return web.json_response(await loop.run_in_executor(state.pool, fn, *args))
        except Superseded:
            return _error(409, "superseded")
        except ViewError as e:
            return _error(422 if str(e).startswith("rrstub: ") else 400, str(e))

    @routes.get("/")
    async def index(request):
        return web.FileResponse(os.path.join(STATIC, "index.html"))

    @routes.get("/api")
    async def api(request):
        return web.json_response({"help": API_HELP})

    @routes.get("/api/recordings")
    async def recordings(request):
        return web.json_response({"recordings": [{"id": v.id, "path": v.path, "name": v.name, "error": v.error}
                                                 for v in state.views.values()]})

    @routes.post("/api/open")
    async def open_recording(request):
        body = await _body(request)
        path = body.get("path")
        if not isinstance(path, str) or not path:
            return _error(400, "give the recording's path: {\"path\": ...}")
        if not os.path.exists(path):
            return _error(404, f"{path}: no such file")
        loop = asyncio.get_running_loop()
        v = await loop.run_in_executor(state.pool, state.open, path)
        return web.json_response({"id": v.id, "error": v.error})

    @routes.get("/api/rec/{rid}")
    async def info(request):
        return await blocking(view_of(request).info)

    @routes.get("/api/rec/{rid}/state")
    async def state_at(request):
        v = view_of(request)
        pos = _int(request, "pos")
        quick = request.query.get("quick", "0") not in ("0", "", "false")
        return await blocking(v.state, pos, request.query.get("client", "anonymous"), quick)

    @routes.get("/api/rec/{rid}/progress")
    async def progress(request):
        v = view_of(request)
        p = v.progress.get(request.query.get("client", "anonymous"))
        return web.json_response(p or {"busy": False, "what": "", "at": None, "target": None})

    @routes.get("/api/rec/{rid}/resolve")
    async def resolve(request):
        v = view_of(request)
        name = request.query.get("marker", "")
        client = request.query.get("client", "anonymous") + "/resolve"
        return await blocking(lambda: {"position": v.resolve(name, client)})

    @routes.post("/api/rec/{rid}/markers")
    async def add_marker(request):
        v = view_of(request)
        body = await _body(request)
        name, pos = body.get("name"), body.get("pos")
        if not isinstance(name, str) or not isinstance(pos, int):
            return _error(400, "give {\"name\": TEXT, \"pos\": INSTRUCTION}")
        return await blocking(v.add_marker, name.strip(), pos, str(body.get("client", "anonymous")) + "/marker")

    @routes.post("/api/rec/{rid}/crop")
    async def crop(request):
        v = view_of(request)
        if v.error is not None:
            return _error(422, v.error)
        body = await _body(request)
        start, stop = body.get("from"), body.get("to")
        if not isinstance(start, str) or not isinstance(stop, str) or not start or not stop:
            return _error(400, "give the markers to crop between: {\"from\": \"m1\", \"to\": \"m3\"}")
        output = body.get("output") or free_path(v.path, "crop")
        if os.path.exists(output):
            return _error(400, f"{output} exists: give another output file")
        job = CropTask(state._next("j"), v.path, start, stop, os.path.abspath(output))
        state.jobs[job.id] = job
        return web.json_response({"job": job.id, "output": job.output})

    @routes.get("/api/jobs/{jid}")
    async def job(request):
        j = state.jobs.get(request.match_info["jid"])
        if j is None:
            return _error(404, f"no job {request.match_info['jid']!r}")
        return web.json_response(j.describe())

    @routes.post("/api/rec/{rid}/live")
    async def live(request):
        v = view_of(request)
        if v.error is not None:
            return _error(422, v.error)
        body = await _body(request)
        pos = body.get("pos")
        if not isinstance(pos, int):
            return _error(400, "give the position to go live from: {\"pos\": INSTRUCTION}")
        try:
            v.check_position(pos)
        except ViewError as e:
            return _error(400, str(e))
        output = body.get("output") or free_path(v.path, "live")
        if os.path.exists(output):
            return _error(400, f"{output} exists: give another branch file")
        task = LiveTask(state._next("l"), v.path, pos, os.path.abspath(output))
        state.lives[task.id] = task
        return web.json_response({"live": task.id, "output": task.output})

    def live_of(request: web.Request) -> LiveTask:
        task = state.lives.get(request.match_info["lid"])
        if task is None:
            raise not_found(f"no live run {request.match_info['lid']!r}")
        return task

    @routes.get("/api/live/{lid}")
    async def live_info(request):
        return web.json_response(live_of(request).describe())

    @routes.post("/api/live/{lid}/input")
    async def live_input(request):
        task = live_of(request)
        body = await _body(request)
        data = body.get("data")
        if not isinstance(data, str):
            return _error(400, "give the text to type: {\"data\": TEXT}")
        try:
            task.send(data.encode())
        except (BrokenPipeError, OSError):
            return _error(409, "the live run has ended")
        return web.json_response({"sent": len(data)})

    @routes.post("/api/live/{lid}/stop")
    async def live_stop(request):
        live_of(request).stop()
        return web.json_response({"stopping": True})

    @routes.get("/api/live/{lid}/ws")
    async def live_ws(request):
        task = live_of(request)
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def listen(kind, value):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        with task._lock:
            task.listeners.append(listen)
            backlog = bytes(task.console)
        await ws.send_json({"type": "output", "data": decoder.decode(backlog)})
        for line in list(task.lines):
            await ws.send_json({"type": "status", "text": line})
        if not task.running:
            queue.put_nowait(("ended", task.status))

        async def pump():
            while True:
                kind, value = await queue.get()
                if kind == "output":
                    await ws.send_json({"type": "output", "data": decoder.decode(value)})
                elif kind == "status":
                    await ws.send_json({"type": "status", "text": value})
                else:
                    await ws.send_json({"type": "ended", "status": value, "text": task.message()})
                    return
        sender = asyncio.ensure_future(pump())
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    m = json.loads(msg.data)
                except json.JSONDecodeError:
                    await ws.send_json({"type": "status", "text": "rrstub ui: a message that is not JSON was ignored"})
                    continue
                if m.get("type") == "input" and isinstance(m.get("data"), str):
                    try:
                        task.send(m["data"].encode())
                    except (BrokenPipeError, OSError):
                        await ws.send_json({"type": "status", "text": "the live run has ended: input not sent"})
                elif m.get("type") == "stop":
                    task.stop()
        finally:
            sender.cancel()
            if listen in task.listeners:
                task.listeners.remove(listen)
        return ws

    @routes.get("/api/rec/{rid}/tree")
    async def tree(request):
        v = view_of(request)
        loop = asyncio.get_running_loop()
        return web.json_response(await loop.run_in_executor(state.pool, branch_tree, v.path, state.open_paths()))

    app = web.Application(client_max_size=1 << 20)
    app.add_routes(routes)
    app.router.add_static("/static/", STATIC)
    return app


def serve_ui(paths: list[str], host: str, port: int, *, open_browser: bool = False, read_ahead: bool = True,
             log: Callable[[str], None], ready: Callable[[str], None] = lambda url: None) -> None:
    """Serve until SIGINT/SIGTERM; ``ready(url)`` once listening."""
    state = UiState(paths, warn=log, read_ahead=read_ahead)

    async def main():
        app = make_app(state)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound}/"
        ready(url)
        if open_browser:
            _open_browser(url, log)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log("stopping: live runs are stopped (their branches kept)")
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        state.close()


def _open_browser(url: str, log: Callable[[str], None]) -> None:
    import webbrowser
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        log(f"--open: no desktop browser found here; open {url} yourself")
        return
    if not browser.open(url):
        log(f"--open: the browser did not start; open {url} yourself")
