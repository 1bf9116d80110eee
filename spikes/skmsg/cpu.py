"""Spike harness (not part of the product): CPU per request of the same sidecar with and without
the sk_msg redirect of its in-pod leg.

Run as root from this directory after building ebpf/ and loader/ (README.md):

    python3 cpu.py SIDECAR_BINARY [BOUND] [ROUNDS]

BOUND is the loader's (0: none, 1: the peer's receive buffer). It starts an nginx upstream
(`return 200`) on 127.0.0.1:18181 on CPU 0, the loader for port 15105 on the cgroup
/sys/fs/cgroup/unified/spike, and two sidecars `run --target` on CPU 1, one on :15105
(redirected) and one on :15101 (plain TCP), both in that cgroup; then, ROUNDS times, oha at
5k req/s with 50 keep-alive connections for 4 s against each (alternating which goes first),
from inside the cgroup on CPU 0. CPU is each sidecar's schedstat run time over the slice,
divided by the requests oha completed. Prints per-round numbers, the median ratio, and the
loader's counters (a redirect that falls back to TCP would show there).
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CGROUP = "/sys/fs/cgroup/unified/spike"
sidecar = os.path.abspath(sys.argv[1])
bound = sys.argv[2] if len(sys.argv) > 2 else "1"
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10

import socket

for port in (18181, 15105, 15101):
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", port))
    except OSError as e:
        sys.exit(f"127.0.0.1:{port} is taken ({e}): stop what listens there first")
    finally:
        probe.close()

os.makedirs(CGROUP, exist_ok=True)
with open(f"{CGROUP}/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))

work = tempfile.mkdtemp(prefix="skmsg-cpu-")
conf = f"""daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {work}; proxy_temp_path {work};
  fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work};
  server {{ listen 127.0.0.1:18181; keepalive_requests 1000000; location / {{ return 200 "ok\\n"; }} }} }}
"""
with open(f"{work}/nginx.conf", "w") as f:
    f.write(conf)

procs = []


def start(args, **kw):
    p = subprocess.Popen(args, **kw)
    procs.append(p)
    return p


def wait_http(port):
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing answers on :{port}")


def run_time_ns(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


try:
    loader_log = open(f"{work}/loader.log", "w")
    start(
        [f"{HERE}/loader/target/release/spike-loader",
         f"{HERE}/ebpf/target/bpfel-unknown-none/release/spike-ebpf", CGROUP, "15105", bound],
        stderr=loader_log,
    )
    start(["taskset", "-c", "0", "nginx", "-c", f"{work}/nginx.conf"])
    wait_http(18181)
    time.sleep(0.5)  # the loader attaches before the sidecars open their first connection
    sidecars = {}
    for port in (15105, 15101):
        sidecars[port] = start(
            ["taskset", "-c", "1", sidecar, "run", "--target", "http://127.0.0.1:18181",
             "--outbound", f"127.0.0.1:{port}", "--admin", "none"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_http(port)
    ratios, per = [], {15105: [], 15101: []}
    for r in range(rounds):
        order = (15105, 15101) if r % 2 == 0 else (15101, 15105)
        for port in order:
            pid = sidecars[port].pid
            before = run_time_ns(pid)
            out = subprocess.run(
                ["taskset", "-c", "0", "oha", "-z", "4s", "-q", "5000", "-c", "50", "--no-tui",
                 "--output-format", "json", f"http://127.0.0.1:{port}/"],
                check=True, capture_output=True, text=True,
            ).stdout
            spent = run_time_ns(pid) - before
            codes = json.loads(out)["statusCodeDistribution"]
            ok = codes.get("200", 0)
            if ok == 0 or len(codes) != 1:
                sys.exit(f"round {r} port {port}: status codes {codes}")
            per[port].append(spent / ok / 1000)
        ratios.append(per[15105][-1] / per[15101][-1])
        print(f"round {r}: redirected {per[15105][-1]:.2f} µs/req, plain {per[15101][-1]:.2f} µs/req, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"bound {bound}: median redirected/plain {statistics.median(ratios):.3f} "
          f"(redirected {statistics.median(per[15105]):.2f}, plain {statistics.median(per[15101]):.2f} µs/req)")
    time.sleep(5.5)  # one more line of the loader's counters
finally:
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    loader_log.close()
    with open(f"{work}/loader.log") as f:
        lines = [line.strip() for line in f if line.startswith("inserted")]
    print("loader:", lines[-1] if lines else "(no counters)")
    shutil.rmtree(work, ignore_errors=True)
