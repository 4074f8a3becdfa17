#!/usr/bin/env python3
"""An independent HBONE client: TLS 1.3 mutual auth, ALPN h2, one HTTP/2 CONNECT.

Written only against the HBONE wire format (stdlib `ssl`/`socket` + the `h2` package); it
shares no code with the mesh, so the mesh's server can be checked against a peer it did not write.

    hbone_client.py --connect IP:PORT --authority A --cert F --key F --ca F [--send TEXT]

Prints exactly one JSON line and exits 0:
    {"status": 200, "reply": "...", ...}        a response arrived (any status)
    {"error": "tls" | "closed" | "reset" | "timeout" | "connect" | "h2", "detail": "..."}
Exits non-zero only on usage errors.
"""

import argparse
import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class Failure(Exception):
    def __init__(self, kind, detail, **extra):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.extra = extra


def split_hostport(text):
    """'1.2.3.4:80' or '[fd00::1]:80' -> (host, port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {text!r}")
        return host, int(rest)
    host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host:
        raise ValueError(f"bad address {text!r} (use IP:PORT or [IPv6]:PORT)")
    return host, int(port)


def uri_sans(cert):
    return [v for (k, v) in cert.get("subjectAltName", ()) if k == "URI"] if cert else []


def make_context(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # HBONE peers are named by SPIFFE URI SANs, not DNS names: no hostname check, no SNI.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=args.ca)
    ctx.load_cert_chain(certfile=args.cert, keyfile=args.key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class Client:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.timeout
        self.sock = None
        self.conn = None
        self.closed = False  # peer closed the transport

    def remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Failure("timeout", f"no answer within {self.args.timeout}s")
        return left

    def open(self):
        host, port = split_hostport(self.args.connect)
        try:
            raw = socket.create_connection((host, port), timeout=self.remaining())
        except OSError as e:
            raise Failure("connect", f"TCP connect to {self.args.connect}: {e}")
        ctx = make_context(self.args)
        try:
            raw.settimeout(self.remaining())
            self.sock = ctx.wrap_socket(raw, server_hostname=None, do_handshake_on_connect=False)
            self.sock.do_handshake()
        except ssl.SSLError as e:
            raise Failure("tls", f"handshake: {e}")
        except socket.timeout:
            raise Failure("timeout", "TLS handshake timed out")
        except OSError as e:
            raise Failure("closed", f"during TLS handshake: {e}")
        self.tls_info = {
            "tls_version": self.sock.version(),
            "alpn": self.sock.selected_alpn_protocol(),
            "server_uri_sans": uri_sans(self.sock.getpeercert()),
        }
        if self.sock.selected_alpn_protocol() != "h2":
            raise Failure("alpn", f"server selected ALPN {self.sock.selected_alpn_protocol()!r}, want 'h2'",
                          **self.tls_info)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.initiate_connection()
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if not data:
            return
        try:
            self.sock.sendall(data)
        except (ssl.SSLError, OSError) as e:
            # A server that refused us may already have closed; its alert (the reason) may
            # still be readable.
            kind = "tls" if isinstance(e, ssl.SSLError) else "closed"
            detail = f"write: {e}"
            try:
                self.sock.settimeout(1)
                self.sock.recv(1)
            except ssl.SSLError as alert:
                kind, detail = "tls", f"{detail}; then read: {alert}"
            except OSError:
                pass
            raise Failure(kind, detail, **self.tls_info)

    def read_events(self):
        """Reads once from the socket and returns h2 events ([] never means EOF: EOF raises)."""
        try:
            self.sock.settimeout(self.remaining())
            data = self.sock.recv(65536)
        except socket.timeout:
            raise Failure("timeout", f"no answer within {self.args.timeout}s", **self.tls_info)
        except ssl.SSLError as e:
            # TLS 1.3: a server refusing our certificate says so only after our handshake
            # "completed", so the refusal shows up here, on the first read.
            raise Failure("tls", f"read: {e}", **self.tls_info)
        except OSError as e:
            raise Failure("closed", f"read: {e}", **self.tls_info)
        if not data:
            raise Failure("closed", "connection closed by peer", **self.tls_info)
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            raise Failure("h2", f"protocol error: {e}", **self.tls_info)
        self.flush()
        return events

    def run(self):
        self.open()
        sid = self.conn.get_next_available_stream_id()
        # Classic CONNECT (RFC 9113 8.5): :method and :authority only.
        self.conn.send_headers(sid, [(":method", "CONNECT"), (":authority", self.args.authority)])
        self.flush()

        status = None
        resp_headers = []
        reply = bytearray()
        ended = False
        want_reply = self.args.send is not None
        sent = False
        while True:
            done = status is not None and (status != 200 or not want_reply or ended or (sent and b"\n" in reply))
            if done:
                break
            for ev in self.read_events():
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    resp_headers = [[k, v] for (k, v) in ev.headers]
                    status = int(dict(ev.headers).get(":status", "0"))
                    if status == 200 and want_reply and not sent:
                        self.send_body(sid, self.args.send.encode())
                        sent = True
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    reply += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    self.flush()
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    ended = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    if status is None:
                        raise Failure("reset", f"stream reset before a response (code {ev.error_code})",
                                      **self.tls_info)
                    ended = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    if status is None:
                        raise Failure("closed", f"GOAWAY before a response (code {ev.error_code})",
                                      **self.tls_info)
                    ended = True
        out = {"status": status, "headers": resp_headers, **self.tls_info}
        if want_reply:
            out["reply"] = reply.decode("utf-8", "replace")
        self.goodbye(sid)
        return out

    def send_body(self, sid, data):
        # Small payloads: the initial window (64 KiB) always has room; loop for safety anyway.
        while data:
            n = min(len(data), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if n <= 0:
                for _ in self.read_events():
                    pass
                continue
            self.conn.send_data(sid, data[:n])
            data = data[n:]
        self.flush()

    def goodbye(self, sid):
        try:
            try:
                self.conn.end_stream(sid)
            except h2.exceptions.H2Error:
                pass
            self.conn.close_connection()
            self.flush()
            self.sock.close()
        except Exception:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connect", required=True, help="IP:PORT of the HBONE listener")
    p.add_argument("--authority", required=True, help=":authority of the CONNECT (IP:PORT)")
    p.add_argument("--cert", required=True, help="client certificate chain, PEM")
    p.add_argument("--key", required=True, help="client private key, PEM")
    p.add_argument("--ca", required=True, help="trust anchors for the server, PEM")
    p.add_argument("--send", help="text to send through the tunnel after a 200 (reads back one line)")
    p.add_argument("--timeout", type=float, default=10.0, help="overall deadline, seconds")
    args = p.parse_args()
    try:
        split_hostport(args.connect)
    except ValueError as e:
        p.error(str(e))
    if args.send is not None:
        args.send = args.send.encode().decode("unicode_escape")  # allow "WHO hi\n" from a shell

    try:
        out = Client(args).run()
    except Failure as f:
        out = {"error": f.kind, "detail": f.detail, **f.extra}
    except (ssl.SSLError, OSError) as e:  # anything not classified above
        out = {"error": "tls" if isinstance(e, ssl.SSLError) else "closed", "detail": repr(e)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
