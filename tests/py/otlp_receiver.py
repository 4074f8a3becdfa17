#!/usr/bin/env python3
"""An OTLP/gRPC trace collector for tests, independent of the mesh's code: the official
opentelemetry-proto messages served with grpcio. Listens on 127.0.0.1 (port from argv[1],
default 0 = any), prints `listening <port>` once, then one JSON object per span received:
{"service", "name", "kind", "trace_id", "span_id", "parent_span_id", "status", "attributes"}
(ids in lowercase hex, "" when absent; attribute values as their plain Python values).
Stdout is flushed after every line so a test can read spans as they arrive. Stops on stdin EOF
(the test dropping its end), so a killed test leaves nothing behind."""
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

lock = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for rs in request.resource_spans:
            service = next(
                (value(a.value) for a in rs.resource.attributes if a.key == "service.name"), None
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    line = json.dumps(
                        {
                            "service": service,
                            "name": s.name,
                            "kind": s.kind,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "status": s.status.code,
                            "attributes": {a.key: value(a.value) for a in s.attributes},
                        }
                    )
                    with lock:
                        print(line, flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    with lock:
        print(f"listening {bound}", flush=True)
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
