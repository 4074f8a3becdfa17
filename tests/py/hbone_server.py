#!/usr/bin/env python3
"""An independent HBONE server: TLS 1.3 mutual auth, ALPN h2, HTTP/2 CONNECT -> echo.

Written only against the HBONE wire format (stdlib `ssl`/`socket` + the `h2` package); it
shares no code with the mesh, so the mesh's client can be checked against a peer it did not write.

    hbone_server.py --listen IP:PORT --cert F --key F --ca F --record FILE

Prints `listening` once bound. Appends one JSON line to FILE per request received:
    {"event": "request", "tls_version", "alpn", "sni", "sni_callback_called", "peer_uri_sans",
     "cipher", "headers": [[name, value], ...], "stream_id"}
and one line per connection that never got that far:
    {"event": "handshake_failed", "error": "..."}   TLS refused (either side)
    {"event": "no_request", ...tls fields...}       TLS done, closed without any request
Answers CONNECT with 200 and echoes the stream's bytes back (ending the stream when the peer
ends it); anything else gets 400. Inbound header validation is off so that whatever the client
sent is recorded exactly (the test asserts on it, not the h2 library).
"""

import argparse
import json
import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions

RECORD_LOCK = threading.Lock()
SNI_LOCK = threading.Lock()
SNI_SEEN = {}  # id(ssl socket) -> server name the client sent (None if none)


def record(path, obj):
    line = json.dumps(obj)
    with RECORD_LOCK:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()


def split_hostport(text):
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {text!r}")
        return host, int(rest)
    host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host:
        raise ValueError(f"bad address {text!r} (use IP:PORT or [IPv6]:PORT)")
    return host, int(port)


def sni_callback(sslsock, server_name, ctx):
    with SNI_LOCK:
        SNI_SEEN[id(sslsock)] = server_name
    return None  # continue the handshake


def make_context(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=args.ca)
    ctx.load_cert_chain(certfile=args.cert, keyfile=args.key)
    ctx.set_alpn_protocols(["h2"])
    ctx.sni_callback = sni_callback
    return ctx


def uri_sans(cert):
    return [v for (k, v) in cert.get("subjectAltName", ()) if k == "URI"] if cert else []


class Conn:
    def __init__(self, sock, args, tls):
        self.sock = sock
        self.args = args
        self.tls = tls
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8",
                                        validate_inbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.pending = {}  # stream id -> bytearray waiting for flow-control window
        self.end_after = set()  # streams the peer ended: end ours once pending is flushed
        self.requests = 0

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self, sid):
        buf = self.pending.get(sid)
        while buf:
            n = min(len(buf), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if n <= 0:
                break
            self.h2.send_data(sid, bytes(buf[:n]))
            del buf[:n]
        if not buf and sid in self.end_after:
            self.end_after.discard(sid)
            self.pending.pop(sid, None)
            try:
                self.h2.end_stream(sid)
            except h2.exceptions.H2Error:
                pass

    def on_request(self, ev):
        self.requests += 1
        headers = [[k, v] for (k, v) in ev.headers]
        record(self.args.record, {"event": "request", **self.tls, "headers": headers, "stream_id": ev.stream_id})
        method = dict(ev.headers).get(":method")
        if method == "CONNECT":
            self.h2.send_headers(ev.stream_id, [(":status", "200")])
            self.pending[ev.stream_id] = bytearray()
        else:
            self.h2.send_headers(ev.stream_id, [(":status", "400")], end_stream=True)

    def serve(self):
        self.h2.initiate_connection()
        self.flush()
        while True:
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                return
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                record(self.args.record, {"event": "h2_error", **self.tls, "error": str(e)})
                self.flush()
                return
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    self.on_request(ev)
                elif isinstance(ev, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if ev.stream_id in self.pending:
                        self.pending[ev.stream_id] += ev.data
                        self.pump(ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    if ev.stream_id in self.pending:
                        self.end_after.add(ev.stream_id)
                        self.pump(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    self.pending.pop(ev.stream_id, None)
                    self.end_after.discard(ev.stream_id)
                elif isinstance(ev, h2.events.WindowUpdated):
                    for sid in list(self.pending):
                        self.pump(sid)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.flush()
                    return
            self.flush()


def handle(raw, addr, ctx, args):
    tls = None
    sock = None
    try:
        raw.settimeout(30)
        sock = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as e:
            record(args.record, {"event": "handshake_failed", "peer": f"{addr[0]}:{addr[1]}", "error": str(e)})
            return
        with SNI_LOCK:
            called = id(sock) in SNI_SEEN
            sni = SNI_SEEN.pop(id(sock), None)
        cipher = sock.cipher()
        tls = {
            "peer": f"{addr[0]}:{addr[1]}",
            "tls_version": sock.version(),
            "alpn": sock.selected_alpn_protocol(),
            "sni": sni,
            "sni_callback_called": called,
            "cipher": cipher[0] if cipher else None,
            "peer_uri_sans": uri_sans(sock.getpeercert()),
        }
        sock.settimeout(None)
        conn = Conn(sock, args, tls)
        try:
            conn.serve()
        except (ssl.SSLError, OSError) as e:
            record(args.record, {"event": "connection_error", **tls, "error": str(e)})
        if conn.requests == 0:
            record(args.record, {"event": "no_request", **tls})
    except Exception as e:  # never let one connection take the server down
        record(args.record, {"event": "internal_error", "error": repr(e), **(tls or {})})
    finally:
        try:
            (sock or raw).close()
        except Exception:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="IP:PORT to listen on (0.0.0.0:15008, [::]:15008)")
    p.add_argument("--cert", required=True, help="server certificate chain, PEM")
    p.add_argument("--key", required=True, help="server private key, PEM")
    p.add_argument("--ca", required=True, help="trust anchors for client certificates, PEM")
    p.add_argument("--record", required=True, help="file to append one JSON line per request to")
    args = p.parse_args()
    try:
        host, port = split_hostport(args.listen)
    except ValueError as e:
        p.error(str(e))
    ctx = make_context(args)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    print("listening", flush=True)
    while True:
        raw, addr = srv.accept()
        threading.Thread(target=handle, args=(raw, addr, ctx, args), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
