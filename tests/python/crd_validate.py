#!/usr/bin/env python3
"""Validates custom resources against the openAPIV3Schema of their upstream CRDs, offline.

usage: crd_validate.py --crds FILE [--crds FILE ...] DOC_FILE...

Every document in DOC_FILEs whose apiVersion's group is one of the CRDs' groups is validated
against that CRD's schema for its version; other documents (built-in kinds) are skipped and
counted. "Strict" like the API server's field validation: `additionalProperties: false`
wherever a schema lists `properties` and does not preserve unknown fields.
`x-kubernetes-int-or-string` becomes anyOf integer/string. CEL rules
(`x-kubernetes-validations`) are not evaluated.

Prints one line per problem and a summary `validated N skipped M`; exits 1 on any problem
(including a custom resource whose kind or version no CRD serves).
"""
import argparse
import sys

import jsonschema
import yaml


def strict(schema):
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "patternProperties", "definitions"):
            out[k] = {name: strict(s) for name, s in v.items()}
        elif k == "x-kubernetes-validations":
            continue
        else:
            out[k] = strict(v)
    if out.pop("x-kubernetes-int-or-string", False):
        base = {k: v for k, v in out.items() if k not in ("type",)}
        return {"anyOf": [{"type": "integer"}, {"type": "string"}], **base}
    preserve = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crds", action="append", required=True)
    ap.add_argument("docs", nargs="+")
    a = ap.parse_args()
    schemas = {}
    groups = set()
    for path in a.crds:
        for crd in load_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            groups.add(spec["group"])
            for v in spec["versions"]:
                key = (spec["group"], v["name"], spec["names"]["kind"])
                root = strict(v["schema"]["openAPIV3Schema"])
                # The API server serves these on every object; Istio's schemas omit them.
                props = root.setdefault("properties", {})
                props.setdefault("apiVersion", {"type": "string"})
                props.setdefault("kind", {"type": "string"})
                props.setdefault("metadata", {"type": "object"})
                schemas[key] = root
    problems = 0
    validated = skipped = 0
    for path in a.docs:
        try:
            docs = load_docs(path)
        except yaml.YAMLError as e:
            print(f"{path}: not YAML: {e}")
            problems += 1
            continue
        for doc in docs:
            if not isinstance(doc, dict):
                print(f"{path}: a document is not a mapping")
                problems += 1
                continue
            api_version = str(doc.get("apiVersion", ""))
            group, _, version = api_version.rpartition("/")
            kind = doc.get("kind", "")
            name = (doc.get("metadata") or {}).get("name", "?")
            what = f"{path}: {kind} {name} ({api_version})"
            if group not in groups:
                skipped += 1
                continue
            schema = schemas.get((group, version, kind))
            if schema is None:
                print(f"{what}: no CRD serves this kind and version")
                problems += 1
                continue
            errors = sorted(
                jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
            )
            for e in errors:
                where = ".".join(str(p) for p in e.absolute_path) or "(root)"
                print(f"{what}: {where}: {e.message}")
            problems += len(errors)
            validated += 1
    print(f"validated {validated} skipped {skipped}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
