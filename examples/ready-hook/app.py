"""An app that uses kiln's (and AWS Lambda MicroVMs') ready and validate
hooks.

The app serves on 8080 at once, but is not ready until its warm-up (here a
sleep plus building a table) finishes. kiln polls
POST /aws/lambda-microvms/runtime/v1/ready on the hooks port: 503 means
"not yet", 200 means "snapshot me now". Then, on a VM restored from that
snapshot, it calls POST /aws/lambda-microvms/runtime/v1/validate until it
answers 200 (503 again means "not yet"). The other
lifecycle hooks (run, resume, suspend, terminate) are answered with 200 and
logged, so the example also shows when they arrive.
"""
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED_AT = time.time()
HOOKS_PORT = int(os.environ.get("HOOKS_PORT", "9000"))
WARMUP_SECONDS = float(os.environ.get("WARMUP_SECONDS", "5"))
HOOK_PREFIX = "/aws/lambda-microvms/runtime/v1/"

state = {"ready": False, "readyAt": None, "table": None, "hooks": []}


def warm_up():
    time.sleep(WARMUP_SECONDS)
    state["table"] = {i: i * i for i in range(100000)}
    state["readyAt"] = time.time()
    state["ready"] = True
    print("warm-up done after %.1fs" % (state["readyAt"] - STARTED_AT), flush=True)


def reply(handler, code, obj):
    body = json.dumps(obj).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class App(BaseHTTPRequestHandler):
    def do_GET(self):
        if not state["ready"]:
            return reply(self, 503, {"error": "warming up"})
        reply(self, 200, {
            "app": "ready-hook",
            "startedAt": STARTED_AT,
            "readyAt": state["readyAt"],
            "now": time.time(),
            "tableSize": len(state["table"]),
            "hooks": state["hooks"][-10:],
        })

    def log_message(self, fmt, *args):
        pass


class Hooks(BaseHTTPRequestHandler):
    def do_POST(self):
        length = min(int(self.headers.get("Content-Length") or 0), 64 * 1024)
        payload = self.rfile.read(length) if length else b""
        if not self.path.startswith(HOOK_PREFIX):
            return reply(self, 404, {"error": "unknown hook"})
        hook = self.path[len(HOOK_PREFIX):]
        state["hooks"].append({"hook": hook, "at": time.time(), "payloadBytes": len(payload)})
        print("hook %s" % hook, flush=True)
        if hook == "ready":
            if state["ready"]:
                return reply(self, 200, {"ready": True})
            return reply(self, 503, {"ready": False})
        if hook == "validate":
            ok = state["ready"] and len(state["table"]) == 100000
            return reply(self, 200 if ok else 500, {"valid": ok})
        # run, resume, suspend, terminate
        reply(self, 200, {"hook": hook})

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    # Bind the app's port before anything can answer the ready hook: the
    # snapshot is taken as soon as ready says 200, and a clone must find
    # 8080 listening.
    app = ThreadingHTTPServer(("0.0.0.0", 8080), App)
    threading.Thread(target=warm_up, daemon=True).start()
    hooks = ThreadingHTTPServer(("0.0.0.0", HOOKS_PORT), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    print("ready-hook: app on :8080, hooks on :%d" % HOOKS_PORT, flush=True)
    app.serve_forever()
