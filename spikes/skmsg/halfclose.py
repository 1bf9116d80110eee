"""Spike check (not part of the product): how a reader sees its peer's FIN and RST through the
redirect. Run as root with spike-loader attached to /sys/fs/cgroup/unified/spike for PORT:
`halfclose.py PORT` reads with a Python timeout (poll, then a non-blocking recv);
`halfclose.py PORT blocking` reads blocking, with SO_RCVTIMEO, as many clients do.
"""
import os, socket, struct, sys, threading, time
port = int(sys.argv[1])
with open("/sys/fs/cgroup/unified/spike/cgroup.procs", "w") as f: f.write(str(os.getpid()))
for mode in ("fin", "rst", "data+fin"):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port)); srv.listen()
    c = socket.create_connection(("127.0.0.1", port)); p, _ = srv.accept()
    c.sendall(b"ping"); assert p.recv(10) == b"ping"
    if len(sys.argv) > 2:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 3, 0))
    else:
        c.settimeout(3)
    def close():
        time.sleep(0.3)
        if mode == "rst": p.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if mode == "data+fin": p.sendall(b"bye")
        p.close()
    threading.Thread(target=close).start()
    t = time.time()
    try:
        r = c.recv(10)
        if r and mode == "data+fin": r += b"|" + c.recv(10)
    except Exception as e: r = repr(e)
    print(f"{mode}: recv -> {r!r} after {time.time()-t:.2f}s")
    c.close(); srv.close()
