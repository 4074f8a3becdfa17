#!/usr/bin/env python3
"""Parses Prometheus/OpenMetrics text from stdin with the official prometheus_client parser
and prints every sample as JSON: [{"name", "labels", "value", "type"}]. Independent of the
mesh's code: it is the parser a Prometheus user's tooling would use."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families as prom_parse

text = sys.stdin.read()
parse = om_parse if text.rstrip().endswith("# EOF") else prom_parse
out = []
for family in parse(text):
    for s in family.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value, "type": family.type})
print(json.dumps(out))
