#!/usr/bin/env python3
"""An independent ZDS peer whose messages come from Istio's published zds.proto, compiled at
run time with grpcio-tools' bundled protoc into a temporary directory: nothing here knows the
mesh's own Rust types. Used by tests/tests/zds_interop.rs.

    zds_peer.py PROTO agent SOCKET     bind SOCKET (SOCK_SEQPACKET), wait for ztunnel's hello, send
                                       add (with this process's netns fd) / add / keep /
                                       snapshot_sent / del, one ack each; print a JSON report
    zds_peer.py PROTO ztunnel SOCKET   connect to SOCKET, say hello, ack every request (the add for
                                       uid "nack-me" with an error), print one JSON line per
                                       request until the agent closes

Prints "ready" on a line of its own when the socket is bound (agent) or the hello is sent
(ztunnel). Exits non-zero with a message on stderr when the peer breaks the protocol.
"""

import importlib
import json
import os
import shutil
import socket
import sys
import tempfile

MAX_MESSAGE = 1024
TIMEOUT = 10.0


def compile_proto(proto_path):
    """Returns the zds_pb2 module generated from Istio's file by protoc (grpcio-tools)."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="zds-peer-")
    include = os.path.dirname(os.path.abspath(proto_path))
    rc = protoc.main(
        ["protoc", f"-I{include}", f"--python_out={out}", os.path.basename(proto_path)]
    )
    if rc != 0:
        sys.exit(f"protoc failed on {proto_path} (exit {rc})")
    sys.path.insert(0, out)
    module = importlib.import_module(os.path.splitext(os.path.basename(proto_path))[0] + "_pb2")
    return module, out


def fail(what):
    sys.stderr.write(f"zds_peer: {what}\n")
    sys.exit(2)


def recv_one(sock):
    """One packet and the fds that came with it; refuses truncation like Istio's peers."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 4, socket.MSG_CMSG_CLOEXEC)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        fail("truncated message")
    return data, fds


def netns_link(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


def run_agent(pb, path):
    """Python holds the agent's side; the test's ZtunnelSession connects."""
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(TIMEOUT)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT)

    data, fds = recv_one(conn)
    if fds:
        fail("hello came with an fd")
    hello = pb.ZdsHello()
    hello.ParseFromString(data)
    report = {"hello_version": pb.Version.Name(hello.version), "hello_hex": data.hex(), "acks": []}

    netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    report["netns"] = netns_link(netns)

    def exchange(req, fd=None):
        raw = req.SerializeToString()
        socket.send_fds(conn, [raw], [fd] if fd is not None else [])
        data, fds = recv_one(conn)
        if fds:
            fail("ack came with an fd")
        resp = pb.WorkloadResponse()
        resp.ParseFromString(data)
        if resp.WhichOneof("payload") != "ack":
            fail(f"response is not an ack: {data.hex()}")
        report["acks"].append({"sent": req.WhichOneof("payload"), "sent_hex": raw.hex(),
                               "error": resp.ack.error})

    add = pb.WorkloadRequest()
    add.add.uid = "pod-uid-1"
    add.add.workload_info.name = "web-7f9c"
    add.add.workload_info.namespace = "shop"
    add.add.workload_info.service_account = "web-sa"
    exchange(add, netns)

    add2 = pb.WorkloadRequest()
    add2.add.uid = "pod-uid-2"
    add2.add.workload_info.name = "db-0"
    add2.add.workload_info.namespace = "data"
    add2.add.workload_info.service_account = "db"
    exchange(add2, netns)

    keep = pb.WorkloadRequest()
    keep.keep.uid = "pod-uid-3"
    exchange(keep)

    snap = pb.WorkloadRequest()
    snap.snapshot_sent.SetInParent()
    exchange(snap)

    # `del` is a Python keyword: the field is reached through getattr.
    dele = pb.WorkloadRequest()
    getattr(dele, "del").uid = "pod-uid-1"
    exchange(dele)
    conn.close()
    srv.close()
    os.unlink(path)
    print(json.dumps(report), flush=True)


def run_ztunnel(pb, path):
    """Python holds ztunnel's side; the test's AgentSession serves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    hello = pb.ZdsHello(version=pb.V1)
    sock.send(hello.SerializeToString())
    print("ready", flush=True)
    while True:
        data, fds = recv_one(sock)
        if not data and not fds:
            return  # the agent closed the session
        req = pb.WorkloadRequest()
        req.ParseFromString(data)
        kind = req.WhichOneof("payload")
        seen = {"kind": kind, "hex": data.hex(), "fds": len(fds)}
        if kind == "add":
            seen.update(uid=req.add.uid, has_info=req.add.HasField("workload_info"),
                        name=req.add.workload_info.name,
                        namespace=req.add.workload_info.namespace,
                        service_account=req.add.workload_info.service_account)
        elif kind in ("keep", "del"):
            seen["uid"] = getattr(req, kind).uid
        if fds:
            seen["netns"] = [netns_link(fd) for fd in fds]
            seen["netns_inode"] = [os.fstat(fd).st_ino for fd in fds]
            for fd in fds:
                os.close(fd)
        ack = pb.WorkloadResponse()
        ack.ack.error = "nack requested by the test" if seen.get("uid") == "nack-me" else ""
        if kind == "add" and len(fds) != 1:
            ack.ack.error = f"add came with {len(fds)} fds"
        sock.send(ack.SerializeToString())
        print(json.dumps(seen), flush=True)


def main():
    if len(sys.argv) != 4 or sys.argv[2] not in ("agent", "ztunnel"):
        fail(__doc__)
    pb, out = compile_proto(sys.argv[1])
    try:
        if sys.argv[2] == "agent":
            run_agent(pb, sys.argv[3])
        else:
            run_ztunnel(pb, sys.argv[3])
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
