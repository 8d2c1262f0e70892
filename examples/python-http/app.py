"""A tiny HTTP app that records when it started.

kiln snapshots the app after it is ready, so every microVM started from the
image answers with the start time of the build, not of its own start: that
is how the example tests prove a clone did not re-run the app's start-up.
"""
import json
import os
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED_AT = time.time()
# Stand-in for real start-up work (loading a model, warming a cache).
time.sleep(float(os.environ.get("STARTUP_SECONDS", "2")))
READY_AT = time.time()
COUNTER = 0


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        global COUNTER
        COUNTER += 1
        body = json.dumps({
            "app": "python-http",
            "startedAt": STARTED_AT,
            "readyAt": READY_AT,
            "now": time.time(),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "requests": COUNTER,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print("%s %s" % (self.address_string(), fmt % args), flush=True)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    print("python-http listening on :%d (started %.3f)" % (port, STARTED_AT), flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
