//! The Kubernetes manifests in `deploy/kubernetes/`: yamllint clean; every built-in kind
//! valid against the Kubernetes OpenAPI schemas with unknown fields rejected
//! (kubernetes-validate --strict) from 1.25 to 1.37; and, since kubernetes-validate has no
//! schema for the Prometheus Operator CRDs (ServiceMonitor, PodMonitor) or for
//! Kustomization, those are checked here by structure, as is what the schemas cannot say:
//! the DaemonSet is not privileged, runs as non-root with exactly the systemd unit's three
//! capabilities, mounts every host path read-only, and the monitors select it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::run_text;
use optimus_tests::env::{find_tool, skip, workspace_root};
use serde_json::Value;

const VERSIONS: [&str; 4] = ["1.25.0", "1.29.0", "1.33.0", "1.37.0"];

fn dir() -> PathBuf {
    workspace_root().join("deploy/kubernetes")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// A tool from the venv `cargo xtask setup` makes (`target/python/bin`), else from PATH.
fn python_tool(name: &str) -> Option<PathBuf> {
    let venv = workspace_root().join("target/python/bin").join(name);
    if venv.is_file() {
        return Some(venv);
    }
    find_tool(name)
}

/// Every document of every manifest, as JSON, by file name (through the venv's PyYAML).
fn documents(python: &PathBuf) -> Vec<(String, Value)> {
    const DUMP: &str = "import json, sys, yaml\n\
        for f in sys.argv[1:]:\n\
        \x20   for d in yaml.safe_load_all(open(f)):\n\
        \x20       if d is not None:\n\
        \x20           print(json.dumps({'file': f.rsplit('/', 1)[-1], 'doc': d}))\n";
    let (ok, text) = run_text(Command::new(python).arg("-c").arg(DUMP).args(manifests()));
    assert!(ok, "parsing the manifests: {text}");
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["file"].as_str().unwrap().to_owned(), v["doc"].clone())
        })
        .collect()
}

fn kind<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[test]
fn manifests_lint_validate_and_hold_least_privilege() {
    let (Some(validate), Some(yamllint), Some(python)) = (
        python_tool("kubernetes-validate"),
        python_tool("yamllint"),
        python_tool("python3"),
    ) else {
        let _ = skip(
            "manifests_lint_validate_and_hold_least_privilege",
            "kubernetes-validate or yamllint missing: `cargo xtask setup --for test` installs them",
        );
        return;
    };
    let (ok, text) = run_text(
        Command::new(&yamllint)
            .arg("--strict")
            .arg("--config-file")
            .arg(dir().join(".yamllint"))
            .arg(dir()),
    );
    assert!(ok, "yamllint deploy/kubernetes:\n{text}");
    for version in VERSIONS {
        let (ok, text) = run_text(
            Command::new(&validate)
                .args(["--strict", "--no-warn", "-k", version])
                .args(manifests()),
        );
        assert!(ok, "kubernetes-validate --strict -k {version}:\n{text}");
        for file in ["daemonset.yaml", "service.yaml", "namespace.yaml"] {
            assert!(
                text.lines()
                    .any(|l| l.contains(file) && l.contains("passed")),
                "{file} not validated against {version}:\n{text}"
            );
        }
    }

    let docs = documents(&python);
    let ds = kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true, "privileged container");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let unit =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/optimus.service")).unwrap();
    let unit_caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .unwrap()
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        unit_caps,
        "the DaemonSet's capabilities differ from the systemd unit's"
    );
    for key in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(c["resources"][key][res].is_string(), "no {key}.{res}");
        }
    }
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 9947);

    // Host paths: the required four, each mounted read-only; the agent's roots point at
    // the mounts.
    let volumes: Vec<(&str, &str)> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let path = v["hostPath"]["path"]
                .as_str()
                .unwrap_or_else(|| panic!("a volume that is not a hostPath: {v}"));
            (v["name"].as_str().unwrap(), path)
        })
        .collect();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount_of = |host: &str| -> &str {
        let name = volumes
            .iter()
            .find(|(_, p)| *p == host)
            .unwrap_or_else(|| panic!("no hostPath volume of {host}"))
            .0;
        let m = mounts
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("volume {name} is not mounted"));
        assert_eq!(m["readOnly"], true, "{host} is mounted writable");
        m["mountPath"].as_str().unwrap()
    };
    for m in mounts {
        assert_eq!(m["readOnly"], true, "writable mount {m}");
    }
    let args = strings(&c["args"]);
    assert_eq!(args[0], "run");
    assert_eq!(mount_of("/sys/kernel/btf"), "/sys/kernel/btf");
    assert!(
        args.contains(&format!("--proc-root={}", mount_of("/proc")).as_str()),
        "{args:?}"
    );
    let powercap = mount_of("/sys/class/powercap");
    assert!(
        args.contains(&format!("--powercap-root={powercap}").as_str()),
        "{args:?}"
    );
    // The powercap zones are symlinks to ../../devices/virtual/powercap/...: that target
    // is mounted where the links lead from the powercap mount.
    assert_eq!(
        mount_of("/sys/devices/virtual/powercap"),
        format!(
            "{}/devices/virtual/powercap",
            powercap.trim_end_matches("/class/powercap")
        )
    );
    assert_eq!(mount_of("/run/libvirt"), "/run/libvirt");

    // The Service, ServiceMonitor and PodMonitor all find the DaemonSet's pods, by the
    // port it names.
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selects = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    assert!(selects(&ds["spec"]["selector"]["matchLabels"], pod_labels));
    let svc = kind(&docs, "Service");
    assert!(selects(&svc["spec"]["selector"], pod_labels));
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    for (monitor, endpoints, target_labels) in [
        ("ServiceMonitor", "endpoints", &svc["metadata"]["labels"]),
        ("PodMonitor", "podMetricsEndpoints", pod_labels),
    ] {
        let m = kind(&docs, monitor);
        assert_eq!(m["apiVersion"], "monitoring.coreos.com/v1", "{monitor}");
        assert!(
            selects(&m["spec"]["selector"]["matchLabels"], target_labels),
            "{monitor} selects nothing"
        );
        let ep = &m["spec"][endpoints][0];
        assert_eq!(ep["port"], "metrics", "{monitor}");
        assert_eq!(ep["path"], "/metrics", "{monitor}");
        for key in m["spec"].as_object().unwrap().keys() {
            assert!(
                ["selector", endpoints, "namespaceSelector", "jobLabel"].contains(&key.as_str()),
                "{monitor}: unexpected spec.{key}"
            );
        }
    }

    // The kustomization applies every manifest but the alternative PodMonitor, whose
    // namespace must allow what the agent needs.
    let k = kind(&docs, "Kustomization");
    let resources = strings(&k["resources"]);
    let mut listed: Vec<&str> = resources.clone();
    listed.push("podmonitor.yaml");
    listed.push("kustomization.yaml");
    listed.sort_unstable();
    let files: Vec<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, files, "kustomization.yaml resources");
    let ns = kind(&docs, "Namespace");
    assert_eq!(k["namespace"], ns["metadata"]["name"]);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}
