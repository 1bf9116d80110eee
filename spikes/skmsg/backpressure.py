"""Spike check (not part of the product): does a redirected connection keep TCP's flow control?

Run as root with spike-loader attached to /sys/fs/cgroup/unified/spike for PORT (see README.md):
`backpressure.py PORT [reverse]` (reverse: the accepted end writes, the connecting end never reads).
A client in that cgroup writes as fast as it can to a peer that never reads; without the
redirect the writes stop (EAGAIN) once the peer's receive buffer and the client's send buffer
are full. Prints how much was accepted and the peer socket's memory (ss -tm), then reads it all
back to check that nothing was lost or reordered behind the FIN.
"""
import os
import socket
import sys
import time

port = int(sys.argv[1])
with open("/sys/fs/cgroup/unified/spike/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen()
client = socket.create_connection(("127.0.0.1", port))
peer, _ = srv.accept()
if len(sys.argv) > 2 and sys.argv[2] == "reverse":
    client, peer = peer, client
client.setblocking(False)
sent, chunk, start = 0, bytes(range(256)) * 256, time.time()
while time.time() - start < 10:
    try:
        sent += client.send(chunk[sent % len(chunk) :])
    except BlockingIOError:
        print("writes stopped (EAGAIN)")
        break
    except OSError as e:
        print("writes failed:", e)
        break
print("accepted while the peer did not read:", sent, "bytes")
os.system(f"ss -tmn '( sport = :{port} or dport = :{port} )'")
client.setblocking(True)
client.shutdown(socket.SHUT_WR)
pattern = bytes(range(256)) * ((1 << 20) // 256 + 1)  # byte i of the stream is i % 256
got = 0
while True:
    data = peer.recv(1 << 20)
    if not data:
        break
    assert data == pattern[got % 256 : got % 256 + len(data)], f"bytes out of order at offset {got}"
    got += len(data)
print("read back", got, "bytes in order, then EOF")
assert got == sent
