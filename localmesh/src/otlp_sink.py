"""An OTLP/gRPC trace receiver for the demo and the bench: accepts TraceService/Export on the
given address and appends one JSON line per span to a file (trace id, span id, parent id,
name, kind, attributes), so the demo can print a trace and the bench can count spans.

usage: otlp_sink.py LISTEN_ADDR OUT_FILE [--count-only]   (e.g. 0.0.0.0:4317 /tmp/spans.jsonl)
With --count-only (the bench) OUT_FILE holds just the number of spans received so far.
Needs the PyPI packages grpcio and opentelemetry-proto (`cargo xtask deps`).
"""

import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path, count_only):
        self.path = path
        self.count_only = count_only
        self.count = 0
        self.out = None if count_only else open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def Export(self, request, context):
        if self.count_only:
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with self.lock:
                self.count += n
                with open(self.path, "w", encoding="utf-8") as f:
                    f.write(f"{self.count}\n")
            return trace_service_pb2.ExportTraceServiceResponse()
        lines = []
        for rs in request.resource_spans:
            service = {a.key: value(a.value) for a in rs.resource.attributes}.get(
                "service.name"
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(
                        json.dumps(
                            {
                                "service": service,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent_span_id": s.parent_span_id.hex(),
                                "name": s.name,
                                "kind": s.kind,
                                "attributes": {
                                    a.key: value(a.value) for a in s.attributes
                                },
                            }
                        )
                    )
        with self.lock:
            self.out.write("".join(line + "\n" for line in lines))
            self.out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    addr, path = sys.argv[1], sys.argv[2]
    count_only = sys.argv[3:] == ["--count-only"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
        Sink(path, count_only), server
    )
    if server.add_insecure_port(addr) == 0:
        sys.exit(f"otlp_sink: cannot listen on {addr}")
    server.start()
    print(f"otlp_sink: listening on {addr}, spans to {path}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1)


if __name__ == "__main__":
    main()
