//! Rendering the generator's model as the API server holds the objects. Part of [`super`].

use serde_json::{Value, json};

use super::{Phase, SynthNamespace, SynthPod, SynthPolicy, SynthService, TargetPort};

pub(super) fn policy_api_version() -> &'static str {
    "security.istio.io/v1"
}

/// The container port a named target port resolves to (every synthetic pod declares both).
pub(super) fn container_port(name: &str) -> u16 {
    match name {
        "grpc" => 9090,
        _ => 8080,
    }
}

pub(super) fn namespace_object(n: &SynthNamespace) -> Value {
    let mut labels = json!({"kubernetes.io/metadata.name": n.name});
    if n.ambient {
        labels["istio.io/dataplane-mode"] = json!("ambient");
    }
    if n.waypoint {
        labels["istio.io/use-waypoint"] = json!("waypoint");
    }
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": n.name, "labels": labels}})
}

pub(super) fn service_object(s: &SynthService) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| {
            let target = match &p.target {
                TargetPort::Number(n) => json!(n),
                TargetPort::Named(name) => json!(name),
            };
            json!({"name": p.name, "port": p.port, "targetPort": target, "protocol": "TCP",
                   "appProtocol": p.app_protocol})
        })
        .collect();
    let mut spec = json!({"selector": s.selector, "ports": ports});
    if s.headless {
        spec["clusterIP"] = json!("None");
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": s.name, "namespace": s.namespace,
                        "labels": {"app": s.name, "app.kubernetes.io/part-of": s.namespace}},
           "spec": spec})
}

pub(super) fn policy_object(p: &SynthPolicy) -> Value {
    json!({"apiVersion": policy_api_version(), "kind": p.kind,
           "metadata": {"name": p.name, "namespace": p.namespace},
           "spec": p.spec})
}

/// A pod as the API server holds it once scheduled and started: what the Deployment's
/// ReplicaSet, the scheduler and the kubelet have written, managedFields included (about 3 KB
/// of JSON, most of it nothing the mesh reads).
pub fn pod_object(p: &SynthPod) -> Value {
    const TIME: &str = "2026-11-30T06:00:00Z";
    let fields_meta = json!({"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {},
        "f:pod-template-hash": {}, "f:version": {}, "f:app.kubernetes.io/part-of": {}},
        "f:ownerReferences": {".": {}, "k:{\"uid\":\"0\"}": {}}},
        "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:imagePullPolicy": {},
            "f:name": {}, "f:ports": {".": {}, "k:{\"containerPort\":8080,\"protocol\":\"TCP\"}": {".": {},
            "f:containerPort": {}, "f:name": {}, "f:protocol": {}}, "k:{\"containerPort\":9090,\"protocol\":\"TCP\"}": {".": {},
            "f:containerPort": {}, "f:name": {}, "f:protocol": {}}}, "f:readinessProbe": {}, "f:resources": {},
            "f:terminationMessagePath": {}, "f:terminationMessagePolicy": {}}},
            "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {},
            "f:securityContext": {}, "f:serviceAccount": {}, "f:serviceAccountName": {},
            "f:terminationGracePeriodSeconds": {}}});
    let fields_status = json!({"f:status": {"f:conditions": {}, "f:containerStatuses": {},
        "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {".": {},
        "k:{\"ip\":\"0\"}": {".": {}, "f:ip": {}}}, "f:startTime": {}}});
    let node_index: usize = p
        .node
        .strip_prefix("node-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let host_ip = format!("172.18.{}.{}", node_index / 250, node_index % 250 + 2);
    let (phase, ready) = match p.phase {
        Phase::Running => ("Running", "True"),
        Phase::Pending => ("Pending", "False"),
        Phase::Succeeded => ("Succeeded", "False"),
    };
    let mut status = json!({"phase": phase, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "qosClass": "Burstable", "startTime": TIME,
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": ready, "lastProbeTime": null, "lastTransitionTime": TIME},
            {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": TIME},
            {"type": "Ready", "status": ready, "lastProbeTime": null, "lastTransitionTime": TIME},
            {"type": "ContainersReady", "status": ready, "lastProbeTime": null, "lastTransitionTime": TIME},
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": TIME}],
        "containerStatuses": [{"name": "app", "ready": ready == "True", "restartCount": 0,
            "image": format!("registry.example.com/{}/{}:1.4.2", p.namespace, p.owner),
            "imageID": format!("registry.example.com/{}/{}@sha256:{:0>64}", p.namespace, p.owner, p.hash),
            "containerID": format!("containerd://{:0>64}", p.uid.replace('-', "")),
            "started": ready == "True", "state": {"running": {"startedAt": TIME}}}]});
    if let Some(first) = p.ips.first() {
        status["podIP"] = json!(first);
        status["podIPs"] = Value::Array(p.ips.iter().map(|ip| json!({"ip": ip})).collect());
    }
    let owner_kind = if p.phase == Phase::Succeeded {
        "Job"
    } else {
        "ReplicaSet"
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": p.name, "namespace": p.namespace,
            "generateName": format!("{}-{}-", p.owner, p.hash),
            "creationTimestamp": TIME,
            "labels": p.labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": TIME, "prometheus.io/scrape": "true",
                            "prometheus.io/port": "15020"},
            "ownerReferences": [{"apiVersion": if owner_kind == "Job" { "batch/v1" } else { "apps/v1" },
                "kind": owner_kind, "name": format!("{}-{}", p.owner, p.hash), "uid": p.uid,
                "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": TIME, "fieldsType": "FieldsV1", "fieldsV1": fields_meta},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": TIME,
                 "fieldsType": "FieldsV1", "fieldsV1": fields_status, "subresource": "status"}]
        },
        "spec": {
            "nodeName": p.node, "serviceAccountName": p.service_account, "serviceAccount": p.service_account,
            "restartPolicy": if owner_kind == "Job" { "Never" } else { "Always" },
            "dnsPolicy": "ClusterFirst", "terminationGracePeriodSeconds": 30, "schedulerName": "default-scheduler",
            "securityContext": {}, "enableServiceLinks": true, "priority": 0, "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
            "containers": [{
                "name": "app", "image": format!("registry.example.com/{}/{}:1.4.2", p.namespace, p.owner),
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "grpc", "containerPort": 9090, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME",
                         "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                                   "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}]
        },
        "status": status
    })
}
