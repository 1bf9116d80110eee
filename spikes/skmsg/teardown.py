"""Spike check (not part of the product): what happens to redirected bytes that the reader has
not read yet when the sockhash goes away (the loader exits, as a re-run or clean-up of `init`
would drop the map). Run as root, with nothing else on PORT, from this directory:
`teardown.py PORT`. Starts the loader (bound 1) itself.
"""
import os, socket, subprocess, sys, time
port = int(sys.argv[1])
here = os.path.dirname(os.path.abspath(__file__))
os.makedirs("/sys/fs/cgroup/unified/spike", exist_ok=True)
with open("/sys/fs/cgroup/unified/spike/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
loader = subprocess.Popen([f"{here}/loader/target/release/spike-loader",
                           f"{here}/ebpf/target/bpfel-unknown-none/release/spike-ebpf",
                           "/sys/fs/cgroup/unified/spike", str(port), "1"], stderr=subprocess.PIPE, text=True)
assert loader.stderr.readline().startswith("attached"), "loader did not attach"
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen()
client = socket.create_connection(("127.0.0.1", port)); peer, _ = srv.accept()
sent = client.send(b"x" * 65536)
print("sent while redirected:", sent)
os.system(f"ss -tmn 'sport = :{port}' | tail -1")
loader.terminate(); loader.wait()
time.sleep(0.5)  # the map's release is deferred (RCU, a workqueue)
print("loader gone")
client.sendall(b"y" * 10)
client.shutdown(socket.SHUT_WR)
peer.settimeout(3)
got = b""
while True:
    try:
        d = peer.recv(1 << 20)
    except socket.timeout:
        print("read timed out"); break
    if not d:
        break
    got += d
print(f"the reader got {got.count(b'x')} of {sent} redirected bytes, then {got.count(b'y')} of 10 sent after;",
      "in order" if got == b"x" * sent + b"y" * 10 else "OUT OF ORDER")
