//! The Kubernetes manifests under deploy/k8s: memory sized by smoe's own
//! plan (deploy/k8s/memory.py), and valid against the Kubernetes API's
//! schemas (kubernetes-validate from PyPI, which `.ci/run` installs; where
//! it is missing that half fails under CI=true and otherwise skips).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;

const MANIFESTS: &[&str] = &["deploy/k8s/deployment.yaml", "deploy/k8s/service.yaml"];

#[test]
fn deployment_memory_is_the_plan_for_its_args() {
    let deployment = std::fs::read_to_string(repo().join(MANIFESTS[0])).unwrap();
    // The model, cache and context the manifest's comment and args name.
    let (config, budget, ctx, parallel) = (
        "fixtures/configs/Qwen3-30B-A3B/config.json",
        "8GiB",
        "4096",
        "4",
    );
    assert!(deployment.contains(&format!(
        "memory.py {config} --ram-budget {budget} --ctx {ctx} --parallel {parallel}"
    )));
    assert!(deployment.contains(&format!("--ram-budget={budget}\n")));
    assert!(deployment.contains(&format!("--ctx={ctx}\n")));
    assert!(deployment.contains(&format!("--parallel={parallel}\n")));
    let out = Command::new("python3")
        .arg(repo().join("deploy/k8s/memory.py"))
        .args(["--smoe", env!("CARGO_BIN_EXE_smoe"), "--json"])
        .arg(repo().join(config))
        .args(["--ram-budget", budget, "--ctx", ctx, "--parallel", parallel])
        .output()
        .expect("python3 is needed for deploy/k8s/memory.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The budget in whole expert records.
    let cache = plan["expert_cache_bytes"].as_u64().unwrap();
    assert!(cache <= 8 << 30 && cache > (8 << 30) / 100 * 99, "{plan}");
    let memory = format!("memory: \"{}\"", plan["memory"].as_str().unwrap());
    // The request and the limit.
    assert_eq!(deployment.matches(&memory).count(), 2, "want {memory}");
}

#[test]
fn manifests_pass_the_kubernetes_schema_check() {
    let Some(validate) = tool(
        "SMOE_TEST_KUBERNETES_VALIDATE",
        repo().join("target/ci/venv/bin/kubernetes-validate"),
        "kubernetes-validate",
    ) else {
        return;
    };
    let files: Vec<PathBuf> = MANIFESTS.iter().map(|m| repo().join(m)).collect();
    let out = Command::new(validate)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One verdict per document, each valid.
    assert_eq!(
        stdout.matches(" passed for resource ").count(),
        files.len(),
        "{stdout}"
    );
}
